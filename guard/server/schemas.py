"""Request bodies of the OpenAI endpoints: strict pydantic models and the helpers that explain a rejection.

Bad input never reaches the guard: no type coercion, unknown fields refused, text-only content parts,
no lone UTF-16 surrogates; every rejection names the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from core.schema import ForgetTarget

_TEXT_PART = {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
              "required": ["type", "text"], "additionalProperties": False}
_CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}


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


_EMPTY_LIST = WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, _NULL]})


def _invalid(code: str, message: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose message pydantic reports as is (no 'Value error,' prefix)."""
    return PydanticCustomError(code, message, ctx or None)


class ChatMessageIn(BaseModel):
    """One OpenAI chat message; content is a string or a list of text parts (joined)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        json_schema_extra={"enum": ["system", "developer", "user", "assistant"]})  # 'tool' gets its own 400
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = Field(None, max_length=256)
    # Fields the OpenAI SDK puts on the assistant messages it returns, so clients echo them back:
    # accepted when empty; tool calls themselves are not supported by the guard.
    refusal: str | None = None
    tool_calls: Annotated[list[Any] | None, _EMPTY_LIST] = None
    tool_call_id: str | None = None
    function_call: Annotated[dict[str, Any] | None, _only(None)] = None
    audio: Annotated[dict[str, Any] | None, _only(None)] = None
    annotations: Annotated[list[Any] | None, _EMPTY_LIST] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _invalid("content_type", "must be a string, a list of text parts or null; got {got}",
                           got=type(v).__name__)
        for i, p in enumerate(v):
            if not isinstance(p, dict):
                raise _invalid("content_part", "part {i} must be an object with type 'text' and a string 'text'; "
                               "got {got}", i=i, got=type(p).__name__)
            if p.get("type") != "text":
                raise _invalid("content_part", "part {i} has type {t}; only 'text' parts are supported",
                               i=i, t=repr(p.get("type"))[:40])
            if not isinstance(p.get("text"), str):
                raise _invalid("content_part", "part {i}: 'text' must be a string; got {got}",
                               i=i, got=type(p.get("text")).__name__)
            extra = sorted(str(k) for k in p if k not in ("type", "text"))
            if extra:
                raise _invalid("content_part", "part {i} has unknown keys {keys}; accepted: type, text",
                               i=i, keys=str(extra[:5]))
        return v

    @field_validator("tool_calls", "annotations")
    @classmethod
    def _no_tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise _invalid("unsupported", "tool calls are not supported by the guard (send null or [])")
        return v

    @field_validator("function_call", "audio")
    @classmethod
    def _must_be_null(cls, v: dict[str, Any] | None) -> None:
        if v is not None:
            raise _invalid("unsupported", "is not supported by the guard (send null)")
        return None

    def text(self) -> str:
        """The message's text content."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class _GenRequest(BaseModel):
    """Fields shared by chat and text completions; known OpenAI hints are accepted, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: Int = Field(1, ge=1, le=1, description="Only 1 is supported.")
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


class ChatCompletionRequest(_GenRequest):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Annotated[bool | None, _only(False, None)] = None
    top_logprobs: Annotated[Int | None, _only(0, None)] = None
    response_format: Annotated[dict[str, Any] | None, _only({"type": "text"}, None)] = None
    tools: Annotated[list[Any] | None, _EMPTY_LIST] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _only("none", None)] = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise _invalid("unsupported", "only type 'text' is supported (no JSON mode or schema)")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise _invalid("unsupported", "tools are not supported by the guard")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is not None and v != "none":
            raise _invalid("unsupported", "tools are not supported by the guard (send null or 'none')")
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
