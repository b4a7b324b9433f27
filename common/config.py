"""Typed, frozen config dataclasses: JSON in and out, strict keys, overrides by name."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict (tuples become lists, as JSON would)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def _coerce(tp, value):
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if tp in (int, float, str, bool):
        if tp is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        return tp(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build `cls` from a mapping; an unknown key is an error (no silent typos)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})


def from_json(cls: type[T], text: str) -> T:
    return from_dict(cls, json.loads(text))


def override(cfg: T, **changes) -> T:
    """A copy of `cfg` with the given fields changed (None values are ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return from_dict(type(cfg), {**dataclasses.asdict(cfg), **changes})


def save(cfg, path: str) -> None:
    """Write the config as JSON to a local path or `gs://` URL, atomically."""
    from common import storage

    storage.write_text(path, to_json(cfg))


def load(cls: type[T], path: str) -> T:
    from common import storage

    return from_json(cls, storage.read_text(path))


def positive_int(text: str) -> int:
    """An argparse `type=` for counts that must be >= 1 (a clear error otherwise)."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
