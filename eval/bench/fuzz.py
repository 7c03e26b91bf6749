"""Fuzz the guard proxy's HTTP API from its own OpenAPI schema (schemathesis) and count server errors.

Every operation of ``/openapi.json`` is fuzzed in schemathesis's positive mode (inputs valid against
the schema) and negative mode (inputs that break it), against the ASGI app in process: the proxy with
the oracle detector and a scripted model, so what is measured is the HTTP layer's input handling, not
a model. Reports requests sent, distinct inputs, status codes per operation, and every 5xx with a curl
line to reproduce it. The property the service must hold: 0 responses with a 5xx status.

    python -m eval.bench.fuzz                              # 40 examples per operation and mode
    python -m eval.bench.fuzz --examples 2000 --out runs/fuzz.json
    UNLEARN_GUARD_FUZZ_EXAMPLES=500 pytest -s tests/test_reliability_input.py -k schemathesis
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger("fuzz")

ENV_EXAMPLES = "UNLEARN_GUARD_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 40
FUZZ_KEY = "sk-fuzz"


class FuzzConfig(BaseModel):
    """How much to fuzz."""

    examples: int = Field(DEFAULT_EXAMPLES, ge=1, description="Hypothesis examples per operation and mode.")
    modes: list[str] = Field(default_factory=lambda: ["positive", "negative"],
                             description="schemathesis generation modes: positive, negative.")
    seed: int | None = Field(0, description="Hypothesis seed (None: random).")


class FuzzReport(BaseModel):
    """What the fuzz run sent and what came back."""

    requests: int
    distinct_inputs: int
    server_errors: int
    status_counts: dict[str, int]
    per_operation: dict[str, dict[str, int]]
    failures: list[str] = Field(default_factory=list, description="Up to 20 5xx cases, as curl commands.")
    skipped: list[str] = Field(default_factory=list, description="Mode and operation pairs with nothing to generate.")
    seconds: float
    config: FuzzConfig

    def summary(self) -> str:
        """One line: the figures a reviewer asks for."""
        return (f"{self.requests} requests, {self.distinct_inputs} distinct inputs, {self.server_errors} 5xx "
                f"({self.seconds:.1f}s; statuses {dict(sorted(self.status_counts.items()))})")


def examples_from_env(default: int = DEFAULT_EXAMPLES) -> int:
    """Examples per operation and mode from $UNLEARN_GUARD_FUZZ_EXAMPLES (a positive integer), else ``default``."""
    raw = os.environ.get(ENV_EXAMPLES)
    if raw is None or not raw.strip():
        return default
    try:
        n = int(raw)
    except ValueError as e:
        raise ValueError(f"${ENV_EXAMPLES} must be a positive integer, got {raw!r}") from e
    if n < 1:
        raise ValueError(f"${ENV_EXAMPLES} must be a positive integer, got {n}")
    return n


def build_app() -> Any:
    """The proxy under test: oracle detector, scripted target and guard, one key for client and admin."""
    from core.schema import ForgetTarget
    from detectors.oracle import OracleDetector
    from guard.api import GuardedLLM
    from guard.backends.scripted import ScriptedBackend
    from guard.config import GuardConfig, ServerConfig
    from guard.server import create_app

    target = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick"],
                          policy="Do not reveal facts about Elara Voswick.", meta={"facts": {"born": "Port Kestrel"}})
    guard = ScriptedBackend(lambda m: json.dumps({"requires_refusal": True, "cot_instruction": "Decline."}),
                            json_schema=True)
    g = GuardedLLM(ScriptedBackend(), OracleDetector([target]), guard=guard, config=GuardConfig())
    return create_app(g, ServerConfig(api_keys=[FUZZ_KEY], admin_key=FUZZ_KEY, max_body_bytes=200_000))


def _input_key(case: Any) -> str:
    """A canonical text of everything a case sends (to count distinct inputs)."""
    parts = [case.method, case.path, case.path_parameters, case.query, case.headers, case.cookies, case.media_type]
    body = case.body
    parts.append(body if isinstance(body, str | int | float | bool | list | dict | type(None)) else repr(body))
    return json.dumps(parts, sort_keys=True, default=repr)


def run_fuzz(config: FuzzConfig | None = None, app: Any = None) -> FuzzReport:
    """Fuzz every operation of the app's OpenAPI schema; return the counts (5xx are recorded, not raised)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    cfg = config or FuzzConfig()
    for m in cfg.modes:
        if m not in ("positive", "negative"):
            raise ValueError(f"unknown fuzz mode {m!r}; accepted: positive, negative")
    app = app if app is not None else build_app()
    headers = {"Authorization": f"Bearer {FUZZ_KEY}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)  # keys set: the schema needs one
    statuses: Counter[str] = Counter()
    per_op: dict[str, Counter[str]] = {}
    seen: set[str] = set()
    failures: list[str] = []
    skipped: list[str] = []
    t0 = time.perf_counter()
    operations = [r.ok() for r in schema.get_all_operations()]
    for mode in cfg.modes:
        for op in operations:
            if mode == "negative" and not (len(op.body) or len(op.path_parameters) or len(op.query)):
                skipped.append(f"{mode} {op.method.upper()} {op.path}")  # no input of its own to break
                continue
            strategy = op.as_strategy(generation_mode=GenerationMode(mode), headers=headers)

            @settings(max_examples=cfg.examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=strategy)
            def one(case: Any) -> None:
                resp = case.call()
                code = str(resp.status_code)
                statuses[code] += 1
                per_op.setdefault(f"{case.method} {case.path}", Counter())[code] += 1
                seen.add(_input_key(case))
                if resp.status_code >= 500 and len(failures) < 20:
                    failures.append(f"{code}: {case.as_curl_command(headers=headers)}")

            if cfg.seed is not None:
                one = hseed(cfg.seed)(one)
            try:
                one()
            except Unsatisfiable:  # e.g. negative mode on an operation without any input to break
                skipped.append(f"{mode} {op.method.upper()} {op.path}")
    requests = sum(statuses.values())
    return FuzzReport(requests=requests, distinct_inputs=len(seen),
                      server_errors=sum(n for c, n in statuses.items() if c.startswith("5")),
                      status_counts=dict(statuses), per_operation={k: dict(v) for k, v in sorted(per_op.items())},
                      failures=failures, skipped=skipped, seconds=round(time.perf_counter() - t0, 2), config=cfg)


def main(argv: list[str] | None = None) -> int:
    """CLI: run the fuzzer, print the figures, optionally write the JSON report; exit 1 on any 5xx."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=None,
                   help=f"examples per operation and mode (default ${ENV_EXAMPLES} or {DEFAULT_EXAMPLES})")
    p.add_argument("--modes", default="positive,negative", help="comma-separated: positive, negative")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed; -1 for a random run")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = FuzzConfig(examples=args.examples if args.examples is not None else examples_from_env(),
                     modes=[m.strip() for m in args.modes.split(",") if m.strip()],
                     seed=None if args.seed == -1 else args.seed)
    report = run_fuzz(cfg)
    print(report.summary())
    for op, counts in report.per_operation.items():
        print(f"  {op}: {dict(sorted(counts.items()))}")
    for f in report.failures:
        print("  5xx:", f)
    if args.out:
        from core.io import atomic_write_json

        atomic_write_json(args.out, report.model_dump(mode="json"))
    return 1 if report.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
