"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from detectors.encoder import Encoder


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The embedded MiniLM encoder, loaded once per session; tests that need it skip when it is not installed."""
    try:
        return Encoder.load("minilm-l6")
    except Exception as e:  # noqa: BLE001 - the embedded encoder package is missing
        pytest.skip(f"embedded encoder unavailable: {e}")
