"""Which chat-completion fields the proxy forwards, guards or refuses, with vLLM's OpenAI server as the reference.

OpenAI's own fields are validated by :class:`~guard.server.schemas.ChatCompletionRequest` and forwarded; every
text they carry is scored (messages of every role, tool results, tool calls' names and arguments, tool definitions)
and every output is checked (each of the ``n`` choices, tool-call arguments, JSON output, log-probability
alternatives). Fields beyond OpenAI's are *vendor* fields:

* ``FORWARDED``: vLLM's sampling and decoding options, which change how the target writes but add no text the guard
  does not see: sent upstream as they are (vLLM applies them; an upstream that does not know one decides for itself:
  vLLM ignores unknown fields with a warning, OpenAI refuses them);
* ``REFUSED``: fields that would put text or a template in front of the model unscored, change how the
  conversation is rendered, or return text the output check cannot read: 400 with the reason;
* any other field: 400 ``unknown_field`` (``ServerConfig.unknown_fields='reject'``, the default), or forwarded as is
  with ``'forward'``, which leaves the field to the upstream's own rules (the refused ones stay refused).

``BOOKKEEPING`` fields (OpenAI's stored-completion and routing fields) are forwarded to an OpenAI-compatible upstream
and ignored by local backends.
"""

from __future__ import annotations

from typing import Any

FORWARDED: dict[str, str] = {
    "top_k": "sampling", "min_p": "sampling", "repetition_penalty": "sampling", "length_penalty": "sampling",
    "min_tokens": "length", "ignore_eos": "length", "stop_token_ids": "stopping",
    "include_stop_str_in_output": "stopping", "skip_special_tokens": "detokenising",
    "spaces_between_special_tokens": "detokenising", "truncate_prompt_tokens": "prompt length",
    "bad_words": "sampling", "allowed_token_ids": "sampling", "priority": "scheduling", "request_id": "bookkeeping",
    "structured_outputs": "constrained decoding (the output is still checked)",
    "guided_json": "constrained decoding", "guided_regex": "constrained decoding",
    "guided_choice": "constrained decoding", "guided_grammar": "constrained decoding",
    "guided_decoding_backend": "constrained decoding", "guided_whitespace_pattern": "constrained decoding",
    "return_tokens_as_token_ids": "log-probability format", "use_beam_search": "sampling",
}
"""vLLM sampling fields forwarded as they are (what each one changes)."""

BOOKKEEPING = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
"""OpenAI fields with no effect on the text: forwarded to an OpenAI-compatible upstream, ignored by local backends."""

REFUSED: dict[str, str] = {
    "documents": "vLLM renders documents into the prompt, where the guard cannot score them; put them in a message",
    "chat_template": "a client-supplied chat template decides what the model reads, past the guard's prompt assembly",
    "chat_template_kwargs": "template arguments can change what the model reads, past the guard's prompt assembly",
    "add_generation_prompt": "changes how the conversation is rendered (the guard's instruction must stay in force)",
    "continue_final_message": "continues a client-written assistant prefix instead of answering under the guard",
    "echo": "echoes the rendered prompt, the guard's instruction included",
    "mm_processor_kwargs": "multimodal preprocessing options are not inspected",
    "prompt_logprobs": "returns tokens of the rendered prompt, the guard's instruction included",
    "return_token_ids": "token ids are text the output check cannot read",
    "functions": "deprecated: send tools",
    "function_call": "deprecated: send tool_choice",
    "modalities": "audio output is not checked by the guard",
    "audio": "audio output is not checked by the guard",
    "prediction": "predicted-output text reaches the model unscored",
    "web_search_options": "search results reach the model unscored",
    "vllm_xargs": "free-form engine arguments are not inspected",
    "kv_transfer_params": "engine-internal transfer parameters are not accepted from clients",
    "cache_salt": "engine-internal cache parameters are not accepted from clients",
}
"""Vendor or OpenAI fields refused with 400, and why."""


class FieldRefused(ValueError):
    """A request field the proxy does not accept: its name, the error code and the reason."""

    def __init__(self, field: str, code: str, reason: str) -> None:
        """The field, the error code ('unsupported' or 'unknown_field') and the reason given to the client."""
        super().__init__(reason)
        self.field, self.code = field, code


def sort_extras(extras: dict[str, Any] | None, unknown: str = "reject") -> dict[str, Any]:
    """The vendor fields of a chat request to forward upstream; FieldRefused for a refused one, or for an unknown one
    unless ``unknown`` is 'forward'."""
    out: dict[str, Any] = {}
    for key, value in (extras or {}).items():
        if key in REFUSED:
            raise FieldRefused(key, "unsupported", f"{key} is not accepted by the guard: {REFUSED[key]}")
        if key in FORWARDED or key in BOOKKEEPING or unknown == "forward":
            out[key] = value
            continue
        raise FieldRefused(key, "unknown_field", f"unknown field '{key}'; the guard accepts OpenAI's chat fields and "
                           f"these vLLM fields: {', '.join(sorted(FORWARDED))} (server.unknown_fields='forward' sends "
                           "other fields upstream as they are)")
    return out
