"""OpenAI-compatible HTTP proxy in front of a GuardedLLM (FastAPI, a thin layer).

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (``stream: true`` as SSE ending with
``data: [DONE]``), ``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), and
``/admin/targets`` (GET, POST) / ``/admin/targets/{id}`` (DELETE) and ``/admin/store/reload`` (POST)
behind a separate admin key.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. A failed or late
detector answers 503 ``guard_unavailable`` (fail closed); a refused or blocked answer is a normal
completion with ``finish_reason: "content_filter"``; an error body never carries upstream or exception
text, nor the upstream's address. Blocking work runs in worker threads; calls of the target model are
bounded by ``max_concurrency`` slots and ``max_queue`` waiters (a full queue answers 429 with
``Retry-After``), the request deadline counts the wait, and refusals take no slot. Keys are compared with
``hmac.compare_digest`` and never logged; ``/metrics`` and the docs need a client key when keys are set.

Bad input never reaches the guard: request bodies are validated strictly (no type coercion, unknown
fields refused, text-only content parts, no lone UTF-16 surrogates, size limits) and every rejection is
a 4xx whose ``param`` names the field. Faults (upstream down, slow, garbage or cut off; detector or
guard model failing or late; a store that cannot be saved) end in an error or a refusal and are counted
in ``unlearn_guard_faults_total{kind}``. Admin changes are serialised by a lock and, with
``store_path``, saved atomically before the response, so concurrent changes are never lost; the
served store only moves forward (generations, see ``watch``).

Layout: ``schemas`` (request bodies), ``errors`` (OpenAI error body and handlers), ``auth`` (keys),
``metrics`` (Prometheus), ``limits`` (body size, upstream slots and queue), ``watch`` (store hot reload), ``tuning`` (malloc),
``state`` (what routes share), the routers ``openai``, ``health`` and ``admin``, and ``app``
(``create_app``, which wires them together).
"""

from guard.server.app import create_app
from guard.server.auth import _key_of, _matches
from guard.server.errors import ApiError, error_body, install_error_handlers
from guard.server.limits import BodyLimit
from guard.server.metrics import FAULT_KINDS, Metrics
from guard.server.schemas import ChatCompletionRequest, ChatMessageIn, CompletionRequest
from guard.server.state import ServerState, get_state
from guard.server.tuning import set_malloc_mmap_threshold
from guard.server.watch import StoreWatcher

__all__ = [
    "FAULT_KINDS", "ApiError", "BodyLimit", "ChatCompletionRequest", "ChatMessageIn", "CompletionRequest", "Metrics",
    "ServerState", "StoreWatcher", "_key_of", "_matches", "create_app", "error_body", "get_state",
    "install_error_handlers", "set_malloc_mmap_threshold",
]
