"""The one "refuse to resume with other settings" check, shared by the builder, the trainer and
predict: the settings saved by the interrupted run against the ones given now."""
from __future__ import annotations

from typing import Iterable, Mapping

ABSENT = "<absent>"  # how a key that one side lacks is shown


class ResumeError(ValueError):
    """Work on disk that this run cannot continue (made with other settings)."""


def differences(saved: Mapping, current: Mapping, keys: Iterable[str] | None = None,
                _prefix: str = "") -> list[str]:
    """`"key: SAVED then, CURRENT now"` for every key whose value differs, sorted by key.

    keys: the keys compared (default: every key of either side). Nested mappings are compared
    key by key, named `outer.inner`; a key one side lacks shows as `<absent>`.
    """
    names = sorted(set(saved) | set(current)) if keys is None else list(keys)
    out = []
    for key in names:
        a, b = saved.get(key, ABSENT), current.get(key, ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, _prefix=f"{_prefix}{key}.")
        elif a != b:
            out.append(f"{_prefix}{key}: {a!r} then, {b!r} now")
    return out


def check_same_settings(saved: Mapping, current: Mapping, *, what: str, where: str,
                        keys: Iterable[str] | None = None, advice: str = "") -> None:
    """Raise `ResumeError` naming every differing key with both values; return when equal.

    The message reads `"{where}: {what} (k: A then, B now; ...); {advice}"`, e.g. where=the
    folder, what="the run was started with other settings", advice="resume with the same ones".
    """
    changed = differences(saved, current, keys)
    if changed:
        raise ResumeError(f"{where}: {what} (" + "; ".join(changed) + ")"
                          + (f"; {advice}" if advice else ""))
