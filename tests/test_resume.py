"""common.resume: the one "refuse to resume with other settings" check."""
from __future__ import annotations

import pytest

from common.resume import ResumeError, check_same_settings, differences


def test_equal_settings_pass_and_each_difference_is_named_with_both_values():
    saved = {"size": 64, "mode": "cell", "seed": 0, "seg": {"backend": "classical", "scale": 4}}
    check_same_settings(saved, dict(saved), what="w", where="here")  # no error
    now = {"size": 32, "mode": "cell", "seed": 1, "seg": {"backend": "classical", "scale": 2},
           "extra": True}
    with pytest.raises(ResumeError) as err:
        check_same_settings(saved, now, where="/out", what="holds a build with another config",
                            advice="choose another --out")
    msg = str(err.value)
    assert msg.startswith("/out: holds a build with another config (")
    assert msg.endswith("); choose another --out")
    for part in ("size: 64 then, 32 now", "seed: 0 then, 1 now", "seg.scale: 4 then, 2 now",
                 "extra: '<absent>' then, True now"):
        assert part in msg
    assert "mode" not in msg and "backend" not in msg
    assert isinstance(err.value, ValueError)  # the CLIs report ValueErrors as one clean line


def test_keys_limit_the_comparison():
    saved, now = {"backbone": "b0", "epochs": 3}, {"backbone": "b1", "epochs": 9}
    assert differences(saved, now, keys=("epochs",)) == ["epochs: 3 then, 9 now"]
    check_same_settings(saved, {"backbone": "b0", "epochs": 9}, keys=("backbone",), what="w",
                        where="x")
    with pytest.raises(ResumeError, match="backbone: 'b0' then, 'b1' now"):
        check_same_settings(saved, now, keys=("backbone",), what="w", where="x")
