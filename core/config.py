"""Pydantic configs loaded from YAML and overridden from the command line with ``key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from core.io import atomic_write_text

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is malformed; the message says which and what is accepted."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value (so ``1`` is an int)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lr=1e-4, lora.r=8)")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override set (nested dicts created)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Build a config of type ``cls`` from ``base``, then a YAML file, then ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = {**data, **loaded}
    data = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        fields = ", ".join(cls.model_fields)
        raise ConfigError(f"invalid {cls.__name__}: {msgs} (fields: {fields})") from e


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the effective config as YAML beside a result, atomically."""
    return atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
