"""Pydantic configs of the guard: how to guard (GuardConfig) and how to serve (ServerConfig).

Each backend owns its config class (``guard.backends.backend_config(kind=...)`` picks it). Both load from YAML
with ``core.config.load_config`` and take ``key=value`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

OutputCheckMode = Literal["off", "log", "block"]
GuardMode = Literal["llm", "template", "refuse"]


class _Cfg(BaseModel):
    """Base: unknown keys are errors, so a typo in a YAML file does not pass silently."""

    model_config = ConfigDict(extra="forbid")


class GuardConfig(_Cfg):
    """How the guard behaves: CoT guard model use, output checking, timeouts and the failure policy."""

    guard_mode: GuardMode = Field("llm", description="What a flagged prompt gets. 'llm': a guard LLM writes the CoT "
                                  "instruction (or refuses); 'template': the per-target template instruction, and the "
                                  "target answers with it (no guard generation); 'refuse': the policy's refusal.")
    guard_max_new_tokens: int = Field(128, ge=32, le=1024, description="The guard model's token budget; with "
                                      "constrained decoding its instruction is capped at this less 20 characters, so "
                                      "the decision always closes within it.")
    guard_stop_at_refusal: bool = Field(True, description="Stop the guard model's generation as soon as it has "
                                        "decoded \"requires_refusal\": true: the refusal needs no instruction, so "
                                        "the refusal path costs the decision's few tokens instead of a whole answer.")
    guard_timeout_s: float = Field(30.0, gt=0, description="Guard generation later than this uses the template.")
    detector_timeout_s: float = Field(10.0, gt=0, description="A detector call later than this is a failure.")
    detector_batch_window_ms: float = Field(0.0, ge=0, le=1000, description="Async path (the server): how long an idle "
                                            "batcher waits for more texts before its call. 0: it calls on the next "
                                            "event-loop turn; under load batches still form, from the texts that "
                                            "arrive while the previous call runs.")
    detector_max_batch: int = Field(64, ge=1, le=4096, description="Async path: most texts per batched detector call.")
    detector_max_inflight: int = Field(1, ge=1, le=64, description="Async path: batched calls of each kind (prompt, "
                                       "output check) running at once; more texts wait and form the next batch.")
    output_check: OutputCheckMode = "block"
    check_every_tokens: int = Field(8, ge=1, description="Streamed chunks between two output checks.")
    check_overlap_chars: int = Field(256, ge=0, description="Each leak check sees the text since the last check plus "
                                                            "this many characters before it.")
    fail_open: bool = Field(False, description="On detector or guard-model failure, answer anyway (logged at "
                                               "WARNING every time). Default: fail closed.")
    max_new_tokens: int = Field(256, ge=1, description="Default answer length when the request names none.")
    refusal_message: str = "I'm sorry, but I can't help with that."
    refusal_reasons: dict[str, str] = Field(default_factory=lambda: {
        "privacy": "I don't share personal information about this person.",
        "copyright": "I can't reproduce or reveal details of this protected work.",
        "hazard": "I can't provide technical details on this topic.",
    })
    split_mixed: bool = Field(True, description="A flagged prompt whose last user turn asks several things "
                              "(sentences, lines, '..., and what ...?' clauses): the parts the detector flags on their "
                              "own are removed and, if the rest of the conversation then passes the detector as a "
                              "whole and still asks something, the target answers the rest after "
                              "partial_refusal_message (in every guard_mode; the output check still reads the answer "
                              "as about the flagged targets). Off, or when it does not apply: the whole prompt goes "
                              "the guard_mode's way. Not applied to raw completions, tools or JSON output.")
    partial_refusal_message: str = Field("I can't help with part of your message, so I have answered only the rest.",
                                         description="Opens an answer whose flagged part was removed (split_mixed), "
                                         "followed by the policies' refusal reasons.")
    fallback_requires_refusal: bool = Field(True, description="requires_refusal used when the guard LLM's output "
                                                              "is invalid and the template instruction is used.")
    system_prompt: str | None = Field(None, description="Default system prompt of the target when a flagged "
                                                        "request has none of its own.")


class ServerConfig(_Cfg):
    """The HTTP layer: bind address, keys, limits and the upstream."""

    # keys are secrets: a validation error must not print what was given
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("unlearn-guard", description="The model id reported by /v1/models and responses.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Client keys; empty: no client auth.")
    admin_key: SecretStr | None = Field(None, description="Key of /admin/*; unset: admin endpoints are disabled.")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(256, ge=1)
    max_prompt_chars: int = Field(100_000, ge=1, description="Most characters of message text (or prompt) per "
                                  "request; longer ones are refused with 400 before any model or detector runs.")
    max_tokens_cap: int = Field(2048, ge=1, description="Upper bound on max_tokens a client may ask for.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline of a whole non-streamed request, and of a "
                                     "stream's first delta, the wait for an upstream slot included (then 504); later "
                                     "deltas of a stream: each within this time.")
    max_concurrency: int = Field(4, ge=1, description="Target-model calls (answers or whole streams) running at "
                                 "once; more wait in the queue. Refusals decided before any target call never wait.")
    max_queue: int | None = Field(None, ge=0, description="Requests that may wait for an upstream slot; one more is "
                                  "answered 429 with Retry-After at once. None: 4 x max_concurrency; 0: no waiting.")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After (seconds) of a 429 sent when the queue is full.")
    public_metrics: bool = Field(False, description="Serve /metrics without a key even when client keys are set "
                                 "(default: with client keys, /metrics needs one too).")
    public_docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json without a key even when "
                              "client keys are set (default: with client keys, they need one too).")
    expose_trace: bool = Field(False, description="Add the guard trace to responses (field 'guard').")
    max_n: int = Field(8, ge=1, le=128, description="Most choices (n) per chat request; each is checked on its own.")
    non_text_content: Literal["forward", "reject"] = Field(
        "forward", description="Image, audio and file parts of messages: 'forward' sends them upstream unread (their "
        "text parts are scored; the guard does not inspect non-text content), 'reject' answers 400.")
    unknown_fields: Literal["reject", "forward"] = Field(
        "reject", description="Chat fields that are neither OpenAI's nor vLLM's known sampling fields: 'reject' "
        "answers 400 naming the field; 'forward' sends them upstream as they are, under the upstream's own rules "
        "(fields that would reach the model unscored stay refused: guard.server.passthrough.REFUSED).")
    store_path: Path | None = Field(None, description="Detector directory re-saved (atomically) after every admin "
                                    "change to the forget targets; unset: admin changes live in memory only.")
    watch_store: Path | None = Field(None, description="Detector directory to reload whenever its manifest changes "
                                     "(e.g. the store_path of an admin replica, on a shared volume); unset: no reload.")
    watch_interval_s: float = Field(5.0, gt=0, description="How often watch_store fully re-checks the store (retries, "
                                    "in-place edits); a new atomic save is seen sooner, by a 0.25 s stat() poll.")
    malloc_mmap_threshold_kb: int | None = Field(
        128, ge=1, le=32768, description="glibc only, set once by `unlearn-guard serve` at start: memory blocks of at "
        "least this size are mapped separately and handed back to the OS when freed, so the encoder's ever-changing "
        "batch shapes do not leave the heap growing (on the test machine: flat resident memory over 20,000 requests, "
        "for about 16% less peak throughput). None: glibc's default (a threshold that adapts upwards).")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: list[SecretStr]) -> list[SecretStr]:
        """An empty or padded client key would let anyone in with an empty Bearer token (or never match): refuse it."""
        for i, k in enumerate(keys):
            _check_key(k, f"api_keys[{i}]")
        return keys

    @field_validator("admin_key")
    @classmethod
    def _admin_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        """An empty admin key is a mistake, not "admin off" (that is: leave it unset); refuse it."""
        if key is not None:
            _check_key(key, "admin_key")
        return key

    @property
    def queue_limit(self) -> int:
        """How many requests may wait for an upstream slot (``max_queue``, default 4 x ``max_concurrency``)."""
        return 4 * self.max_concurrency if self.max_queue is None else self.max_queue


def _check_key(key: SecretStr, name: str) -> None:
    """ValueError naming the setting (never the key) when a key is empty, only whitespace, or padded with it."""
    v = key.get_secret_value()
    if not v.strip():
        raise ValueError(f"{name} is empty or only whitespace; leave it unset instead")
    if v != v.strip():
        raise ValueError(f"{name} starts or ends with whitespace, so no request could present it")
