"""Output check: chunked leak checks with overlap; in block mode nothing leaked is released."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from detectors.types import Detection
from guard.config import GuardConfig
from guard.output_check import LeakCheckError, StreamChecker, check_text
from guard.types import GuardTrace

SECRET = "Port Kestrel"


def leak(text: str) -> Detection:
    hit = SECRET in text
    return Detection(flagged=hit, score=1.0 if hit else 0.0, threshold=0.5, target_ids=["p"] if hit else [])


def awaitable(fn: Callable[[str], Detection]) -> Callable[[str], Awaitable[Detection]]:
    async def call(text: str) -> Detection:
        return fn(text)
    return call


def run(deltas: list[str], mode: str = "block", every: int = 2, overlap: int = 64) -> tuple[str, bool, GuardTrace]:
    tr = GuardTrace()
    c = StreamChecker(awaitable(leak), GuardConfig(output_check=mode, check_every_tokens=every,
                                                   check_overlap_chars=overlap), tr)

    async def drive() -> tuple[str, bool, GuardTrace]:
        out = ""
        for d in deltas:
            r = await c.feed(d)
            if r is None:
                return out, True, tr
            out += r
        r = await c.finish()
        return (out, True, tr) if r is None else (out + r, False, tr)

    return asyncio.run(drive())


def check(fn: Callable[[str], Detection], text: str, config: GuardConfig, trace: GuardTrace) -> bool:
    return asyncio.run(check_text(awaitable(fn), text, config, trace))


def test_clean_stream_is_released_unchanged() -> None:
    deltas = ["The", " capital", " of", " France", " is", " Paris", "."]
    for mode in ("off", "log", "block"):
        out, blocked, _ = run(deltas, mode)
        assert (out, blocked) == ("".join(deltas), False)


def test_leak_blocks_and_is_never_released() -> None:
    deltas = ["She", " was", " born", " in", " Port", " Kes", "trel", " in", " 1950", "."]
    out, blocked, tr = run(deltas)
    assert blocked and SECRET not in out and tr.output_check_fired and tr.leak_target_ids == ["p"]


@pytest.mark.parametrize("every", [1, 2, 3, 5, 100])
def test_leak_across_chunk_boundaries_is_caught(every: int) -> None:
    deltas = [" born", " in", " Po", "rt", " Kes", "tr", "el", " yes"]
    out, blocked, _ = run(deltas, every=every, overlap=20)
    assert blocked and SECRET not in out


def test_log_mode_releases_but_records() -> None:
    out, blocked, tr = run([" born in Port", " Kestrel"], mode="log", every=1)
    assert not blocked and SECRET in out and tr.output_check_fired


def test_check_text_and_detector_failure() -> None:
    tr = GuardTrace()
    assert check(leak, "born in Port Kestrel", GuardConfig(), tr) is True
    assert check(leak, "born in Paris", GuardConfig(), GuardTrace()) is False

    def broken(text: str) -> Detection:
        raise RuntimeError("index offline")

    with pytest.raises(LeakCheckError):
        check(broken, "anything", GuardConfig(), GuardTrace())
