"""common.quiet: TensorFlow's start-up lines are gone from a real command's stderr; the
command's own error still shows; --verbose or HPA_VERBOSE=1 brings the lines back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import quiet

ROOT = Path(__file__).resolve().parents[1]

# What TF 2.21 printed at start-up on this project's CPU machine (and cuInit's line on any
# machine without a GPU driver), as the console showed them.
SEEN = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796217908.220144    7852 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results due to floating-point round-off errors",
    "I0000 00:00:1796217908.223576    7852 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.",
    "I0000 00:00:1796217909.258513    7852 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796217921.221318    7852 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]
MARKERS = ("absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers",
           "failed call to cuInit", "This TensorFlow binary is optimized", "rebuild TensorFlow",
           "NodeDef mentions attribute", "`shuffle=True` was passed")


def test_the_known_lines_are_noise_and_others_are_not():
    assert all(quiet.is_noise(line) for line in SEEN)
    for line in ("train_tpu: error: preprocess.json: missing", "Traceback (most recent call last):",
                 "UserWarning: a real warning", "E0000 00:00:1.2 1 io.cc:3] cannot open shard.tfrec",
                 "WARNING: something else"):
        assert not quiet.is_noise(line), line


def _train_without_data(tmp_path, *extra, env_extra=None):
    """`python -m train_tpu` on an empty folder: imports TensorFlow, then exits 2 naming the
    missing preprocess.json (a real command, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != quiet.ENV}
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # as loud as TF gets: the quiet mode must still win
    env.update(env_extra or {})
    res = subprocess.run(
        [sys.executable, "-m", "train_tpu", "--data", str(tmp_path), "--mode", "cell",
         "--out", str(tmp_path / "run"), "--strategy", "cpu", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "preprocess.json: missing" in res.stderr  # the command's own error still shows
    return res.stderr


def _noise(text):
    return [ln for ln in text.splitlines() if any(m in ln for m in MARKERS)]


@pytest.fixture(scope="module")
def loud(tmp_path_factory):
    return _train_without_data(tmp_path_factory.mktemp("loud"), "--verbose")


def test_a_command_prints_no_startup_line(tmp_path, loud):
    err = _train_without_data(tmp_path)
    assert _noise(err) == [], err
    # the same command with --verbose does print them: the quiet run had something to hide
    assert len(_noise(loud)) >= 2, loud


def test_hpa_verbose_brings_the_lines_back(tmp_path, loud):
    err = _train_without_data(tmp_path, env_extra={quiet.ENV: "1"})
    assert len(_noise(err)) >= 2 and "absl::InitializeLog" in err, err


def test_a_failed_import_still_shows_its_error(tmp_path):
    """The stderr of TensorFlow's import is filtered, not dropped: a line that is not noise
    written while it loads (here by a stand-in package) reaches the console."""
    pkg = tmp_path / "tensorflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import os\nos.write(2, b'WARNING: All log messages before absl::InitializeLog() is "
        "called are written to STDERR\\n')\nos.write(2, b'real trouble while loading\\n')\n"
        "raise ImportError('broken install')\n")
    code = ("import sys; from common import quiet; quiet.quiet()\n"
            "try:\n    import tensorflow\nexcept ImportError as e:\n    print('caught', e, file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != quiet.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "real trouble while loading" in res.stderr and "caught broken install" in res.stderr
    assert "absl::InitializeLog" not in res.stderr, res.stderr
