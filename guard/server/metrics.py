"""Prometheus metrics of the proxy: requests, refusals, stage timings and faults by kind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guard.types import GuardTrace

FAULT_KINDS: tuple[str, ...] = (
    "backend_unreachable", "backend_timeout", "backend_http_error", "backend_bad_response", "backend_stream_cut",
    "backend_stream_error", "backend_error", "detector_error", "detector_timeout", "output_check_error",
    "output_check_timeout", "guard_model_error", "guard_model_timeout", "request_timeout", "store_save_error",
    "store_reload_error", "store_rollback_refused", "store_foreign_task_refused", "store_save_conflict",
    "internal_error")


def _endpoint_of(path: str) -> str:
    """The metrics label of a request path."""
    if path.startswith("/v1/chat/"):
        return "chat"
    if path.startswith("/v1/completions"):
        return "completions"
    if path.startswith("/admin/"):
        return "admin"
    return "other"


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        """Create the counters and histograms."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guard_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.flagged = Counter("guard_flagged_total", "Prompts flagged by the detector", registry=r)
        self.refused = Counter("guard_refusals_total", "Answers replaced by a refusal", ["reason"], registry=r)
        self.split = Counter("guard_split_total", "Flagged prompts whose flagged parts were removed and whose rest the "
                             "target answered (GuardConfig.split_mixed)", registry=r)
        self.blocked_parts = Counter("guard_output_blocked_total", "Parts of answers the output check blocked, by "
                                     "part: content, json, reasoning, tool_call (each blocked choice counts its "
                                     "parts)", ["part"], registry=r)
        for part in ("content", "json", "reasoning", "tool_call"):
            self.blocked_parts.labels(part)
        self.logprobs_withheld = Counter("guard_logprobs_withheld_total", "Answers whose alternative tokens "
                                         "(top_logprobs) were withheld", registry=r)
        self.fail_open = Counter("guard_fail_open_total", "Requests let through by fail_open", registry=r)
        self.errors = Counter("guard_errors_total", "Guard stage failures", ["stage"], registry=r)
        self.faults = Counter("unlearn_guard_faults", "Faults by kind; each ended in an error response or a refusal",
                              ["kind"], registry=r)
        for kind in FAULT_KINDS:
            self.faults.labels(kind)
        self.shed = Counter("guard_shed", "Requests answered 429 at once: every upstream slot busy and the queue "
                            "full (server.max_concurrency, server.max_queue)", registry=r)
        self.store_reloads = Counter("guard_store_reloads_total", "Forget-store reloads after its directory changed",
                                     registry=r)
        self.store_forced_reloads = Counter("guard_store_forced_reloads_total", "Admin-forced reloads of an older or "
                                            "foreign forget store that a plain reload refuses", registry=r)
        self.store_generation = Gauge("guard_store_generation", "Generation of the forget store served", registry=r)
        self.store_reload_pending = Gauge("guard_store_reload_pending", "1 while a changed forget store on disk "
                                          "has not loaded yet (it is retried), else 0", registry=r)
        self.error_responses = Counter("guard_error_responses_total", "Error responses by endpoint, status and code",
                                       ["endpoint", "status", "code"], registry=r)
        self.stage = Histogram("guard_stage_seconds", "Time per guard stage", ["stage"], registry=r,
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("guard_request_seconds", "Whole request time", ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def fault(self, kind: str) -> None:
        """Count one fault of this kind."""
        self.faults.labels(kind).inc()

    def observe(self, trace: GuardTrace) -> None:
        """Record one finished request's trace."""
        if trace.flagged:
            self.flagged.inc()
        if trace.requires_refusal:
            self.refused.labels("guard").inc()
        if trace.parts_removed:
            self.split.inc()
        if trace.output_check_fired and trace.output_check_mode == "block":
            self.refused.labels("output_check").inc()
        if trace.output_check_mode == "block":
            for part in trace.blocked_parts:
                self.blocked_parts.labels(part).inc()
        if trace.logprobs_withheld:
            self.logprobs_withheld.inc()
        if trace.fail_open_used:
            self.fail_open.inc()
        for f in trace.faults:
            self.errors.labels(f.stage.value).inc()
            self.fault(f.metric)
        for stage, ms in trace.timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000.0)
