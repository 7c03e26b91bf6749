"""Request bodies of the OpenAI endpoints: strict pydantic models and the helpers that explain a rejection.

Bad input never reaches the guard: no type coercion, no lone UTF-16 surrogates, content parts and tool calls
in OpenAI's shapes; every rejection names the field. Chat requests keep vendor fields as extras, which the route
sorts (``guard.server.passthrough``); unknown fields elsewhere are refused.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.schema import ForgetTarget


def _part(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one content-part type (``{"type": kind, kind: payload}``)."""
    return {"type": "object", "properties": {"type": {"const": kind}, kind: payload}, "required": ["type", kind],
            "additionalProperties": False}


_STR = {"type": "string"}
_PARTS = [_part("text", _STR), _part("refusal", _STR),
          _part("image_url", {"type": "object", "properties": {"url": _STR, "detail": _STR}, "required": ["url"]}),
          _part("input_audio", {"type": "object", "properties": {"data": _STR, "format": _STR},
                                "required": ["data", "format"]})]
_CONTENT_SCHEMA = {"anyOf": [_STR, {"type": "array", "items": {"anyOf": _PARTS}}, {"type": "null"}]}
_TOOL_CALL = {"type": "object", "additionalProperties": False, "required": ["id", "type", "function"], "properties": {
    "id": _STR, "type": {"const": "function"}, "function": {
        "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": _STR, "arguments": _STR}}}}
_MESSAGE_SCHEMA = {"anyOf": [
    {"type": "object", "additionalProperties": False, "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]}, "content": _CONTENT_SCHEMA, "name": _STR}},
    {"type": "object", "additionalProperties": False, "required": ["role", "tool_calls"], "properties": {
        "role": {"const": "assistant"}, "content": {"anyOf": [_STR, {"type": "null"}]},
        "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
    {"type": "object", "additionalProperties": False, "required": ["role", "content", "tool_call_id"], "properties": {
        "role": {"const": "tool"}, "content": _CONTENT_SCHEMA, "tool_call_id": _STR}}]}
NON_TEXT_PARTS = ("image_url", "input_audio", "file", "video_url", "audio_url")
"""Content parts that carry no text: forwarded to the upstream as they are, never inspected
(``ServerConfig.non_text_content='reject'`` refuses them)."""

def _integral(v: Any) -> Any:
    """JSON Schema counts 1.0 as an integer: accept integral floats for int fields (strings and bools stay errors)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]
_NULL = {"type": "null"}


def _only(*values: Any) -> WithJsonSchema:
    """Advertise only these values (the validator explains why others are refused)."""
    return WithJsonSchema({"anyOf": [{"const": v} if v is not None else _NULL for v in values]})




def _invalid(code: str, message: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose message pydantic reports as is (no 'Value error,' prefix)."""
    return PydanticCustomError(code, message, ctx or None)


class FunctionCallIn(BaseModel):
    """The function of a tool call: its name and its arguments (a JSON string, as OpenAI sends them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=256)
    arguments: str


class ToolCallIn(BaseModel):
    """One tool call of an assistant turn, as the OpenAI SDK echoes it back."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    """One OpenAI chat message: content is a string, a list of content parts (text parts are scored, other parts
    pass through unread) or null; assistant turns may carry tool calls, tool turns answer one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    function_call: FunctionCallIn | None = Field(None, description="Deprecated single function call; scored and "
                                                 "forwarded.")
    # Fields the OpenAI SDK puts on the assistant messages it returns, so clients echo them back: accepted and not
    # forwarded (a refusal field is our own answer; annotations and audio references are the upstream's).
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None
    # The reasoning the proxy returned with an answer (vLLM's ``reasoning``, DeepSeek's ``reasoning_content``), echoed
    # back in the history: accepted, not forwarded (reasoning models' chat templates drop past thinking; a text that
    # reaches no model cannot open a turn there).
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _invalid("content_type", "must be a string, a list of content parts or null; got {got}",
                           got=type(v).__name__)
        for i, p in enumerate(v):
            if not isinstance(p, dict):
                raise _invalid("content_part", "part {i} must be an object with a 'type'; got {got}",
                               i=i, got=type(p).__name__)
            t = p.get("type")
            if t in ("text", "refusal"):
                if not isinstance(p.get(t), str):
                    raise _invalid("content_part", "part {i}: a {t} part needs a string '{t}'; got {got}",
                                   i=i, t=t, got=type(p.get(t)).__name__)
                extra = sorted(str(k) for k in p if k not in ("type", t, "cache_control"))
                if extra:
                    raise _invalid("content_part", "part {i} has unknown keys {keys}; accepted: type, {t}",
                                   i=i, keys=str(extra[:5]), t=t)
            elif t in NON_TEXT_PARTS:
                if not isinstance(p.get(t), dict | str):
                    raise _invalid("content_part", "part {i}: a {t} part needs its '{t}' object", i=i, t=t)
            else:
                raise _invalid("content_part", "part {i} has type {t}; accepted part types: text, refusal, {others}",
                               i=i, t=repr(t)[:40], others=", ".join(NON_TEXT_PARTS))
        return v

    @model_validator(mode="after")
    def _turn_shape(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise _invalid("tool_calls_role", "tool_calls belong on an assistant message (this one is {role})",
                           role=self.role)
        if self.role == "tool" and not self.tool_call_id:
            raise _invalid("tool_call_id", "a tool message needs tool_call_id (the id of the call it answers)")
        return self

    def to_message(self) -> dict[str, Any]:
        """The message as the guard and the upstream get it (developer turns count as system turns)."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.function_call is not None:
            m["function_call"] = self.function_call.model_dump()
        if m["content"] is None and not self.tool_calls and self.function_call is None:
            m["content"] = ""
        return m


class _GenRequest(BaseModel):
    """Fields shared by chat and text completions; known OpenAI hints are accepted, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: Int = Field(1, ge=1, le=1, description="Only 1 is supported on this endpoint.")
    stream: bool = False
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings.")
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # Accepted and ignored: bookkeeping and sampling hints that do not change what the guard does.
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    stream_options: dict[str, bool] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise _invalid("too_many", "at most 16 stop strings; got {n}", n=len(v))
        return v


class FunctionDef(BaseModel):
    """A tool's function: its name, description and JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    """One tool of ``tools`` (OpenAI and vLLM accept function tools)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: a named JSON schema for the output."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: 'text' (the default), 'json_object' or 'json_schema' with its schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _invalid("json_schema", "type 'json_schema' needs a json_schema object (name and schema)")
        return self


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(BaseModel):
    """``stream_options``: a final usage chunk (``include_usage``); vLLM's ``continuous_usage_stats`` is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatCompletionRequest(_GenRequest):
    """POST /v1/chat/completions body: OpenAI's fields, and vendor fields (vLLM's sampling options) as extras that
    the route sorts into forwarded, refused and unknown (``guard.server.passthrough``)."""

    # vendor fields are accepted as extras and sorted by the route; the schema advertises OpenAI's fields only
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"additionalProperties": False})

    messages: Annotated[list[ChatMessageIn], WithJsonSchema({"type": "array", "minItems": 1,
                                                             "items": _MESSAGE_SCHEMA})] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    n: Int = Field(1, ge=1, le=128, description="Choices per request, each checked on its own (server cap: max_n).")
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream_options: StreamOptions | None = None  # type: ignore[assignment]

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: Any) -> int | None:
        if v and not info.data.get("logprobs"):
            raise _invalid("logprobs", "top_logprobs needs logprobs: true")
        return v


class CompletionRequest(_GenRequest):
    """POST /v1/completions body."""

    prompt: str | list[str]
    max_tokens: Int | None = Field(16, ge=1)
    echo: Annotated[bool | None, _only(False, None)] = None
    logprobs: Annotated[Int | None, _only(0, None)] = None
    best_of: Int | None = Field(None, ge=1, le=1)
    suffix: Annotated[str | None, _only("", None)] = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise _invalid("unsupported", "echo is not supported by the guard")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _invalid("unsupported", "suffix (insertion) is not supported by the guard")
        return v


_MODELS: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                       "/v1/completions": CompletionRequest, "/admin/targets": ForgetTarget}


# pydantic puts the union member it tried into an error's location ('str', 'list[str]', 'function-after[...]').
_UNION_TAG = re.compile(r"^(?:str|int|float|bool|bytes|none|[a-z-]+\[.*\])$")


def _accepted_fields(path: str, loc: list[str]) -> list[str]:
    """The field names accepted where an unknown field was found (request path and location)."""
    model = _MODELS.get(path)
    if model is ChatCompletionRequest and len(loc) >= 3 and loc[0] == "messages":
        model = ChatMessageIn
    return sorted(model.model_fields) if model is not None else []


def _lone_surrogate(obj: Any, path: str = "") -> str | None:
    """Path of the first string holding a lone UTF-16 surrogate (JSON '\\ud800'), which is not Unicode text."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        if isinstance(k, str) and _lone_surrogate(k) is not None:
            return f"{path}.{k!r}" if path else repr(k)
        found = _lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def _diagnose_body(body: bytes) -> str:
    """Why a request body could not be parsed: not UTF-8, not JSON, or nested too deeply."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}); "
                "send JSON encoded as UTF-8")
    try:
        json.loads(text)
    except RecursionError:
        return "request body nests JSON arrays/objects too deeply; send a flat OpenAI request object"
    except ValueError as e:
        return f"request body is not valid JSON ({e})"
    return "request body could not be parsed; send a JSON object"


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined (for hand-written OpenAPI request bodies)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.split("/")[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)
