"""scripts/accel_check.py (`make accel-check`) at its smallest sizes on the CPU, in subprocesses:
the TF path end to end, its failure exits, and the no-TensorFlow path (TF import blocked by an
import hook, as on a machine without TensorFlow) on the jax backend when jax is installed."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "accel_check.py"
LAST = re.compile(r"^accel-check: (?P<device>[^,]+), train (?P<train>n/a|[\d.]+) ex/s, "
                  r"predict (?P<predict>n/a|[\d.]+) s/image, 559 images ~ (?P<hours>n/a|[\d.]+) h$")
# Runs a script with `import tensorflow` refused, as where TensorFlow is not installed (a
# sys.modules entry of None would not do: Keras then believes TF is loaded).
NO_TF = """
import runpy, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(args, env_extra=None, no_tf=False, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(env_extra or {})
    cmd = [sys.executable] + (["-c", NO_TF] if no_tf else []) + [str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc, lines


def result(lines, name):
    """The `[STATUS] name: text` line of one check -> (status, text); None when absent."""
    for ln in lines:
        m = re.match(r"^\[\s*(\w+)\s*\] " + re.escape(name) + r": (.*)$", ln)
        if m:
            return m.group(1), m.group(2)
    return None


def last(lines):
    m = LAST.match(lines[-1]) if lines else None
    assert m, f"last line not in the required form: {lines[-1:]}"
    return m


@pytest.fixture(scope="module")
def smallest_tf():
    if not has("tensorflow"):
        pytest.skip("TensorFlow is not installed")
    return run(["--smallest", "--device", "cpu"])


def test_smallest_tf_run_passes_and_measures(smallest_tf):
    proc, lines = smallest_tf
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status, text = result(lines, "training loss")
    assert status == "OK" and "small 32 px tiles" in text
    losses = [float(v) for v in re.findall(r"(\d+\.\d+)", text.split("loss per epoch")[1])]
    assert len(losses) == 2 and losses[-1] < losses[0]
    speed = result(lines, "training speed")[1]
    train, pipe, ratio = (float(v) for v in re.search(
        r"train ([\d.]+) ex/s.*alone ([\d.]+) ex/s, pipeline/train ([\d.]+)x", speed).groups())
    assert train > 0 and pipe > 0 and abs(ratio - pipe / train) < 0.01 * ratio + 0.01
    assert result(lines, "predict")[0] == "OK" and result(lines, "validate")[0] == "OK"
    stages = result(lines, "predict stages")[1]
    for stage in ("decode", "segment", "tiles", "score", "encode"):
        assert re.search(stage + r" \d+\.\d{3}", stages)
    assert result(lines, "projection")[0] == "INFO"  # on the CPU the 9 h limit is not judged
    m = last(lines)
    assert m["device"].startswith("CPU") and float(m["train"]) == pytest.approx(train, rel=0.01)
    hours = float(re.search(r"-> ([\d.]+) h", result(lines, "projection")[1]).group(1))
    assert float(m["hours"]) == pytest.approx(hours, abs=0.01) and float(m["predict"]) > 0
    assert "all checks passed" in lines[-2]


def test_bad_arguments_exit_2_before_any_work():
    proc, _ = run(["--epochs", "1"], timeout=120)
    assert proc.returncode == 2 and "--epochs must be >= 2" in proc.stderr
    proc, _ = run(["--tile", "0"], timeout=120)
    assert proc.returncode == 2


def test_missing_gpu_fails_with_the_required_last_line():
    if not has("tensorflow"):
        pytest.skip("TensorFlow is not installed")
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    proc, lines = run(["--device", "gpu", "--smallest"], timeout=300)
    assert proc.returncode == 1
    assert result(lines, "device")[0] == "FAIL"
    m = last(lines)
    assert m["train"] == "n/a" and m["predict"] == "n/a" and m["hours"] == "n/a"


def test_backend_only_names_why_tf_checks_did_not_run():
    # no GPU here: the backend section must refuse --device gpu, after skipping the TF checks
    if not has("jax") and not has("tensorflow"):
        pytest.skip("neither TensorFlow nor jax: no Keras backend to reach the device check")
    if has("tensorflow"):
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            pytest.skip("this machine has a GPU")
    proc, lines = run(["--backend-only", "--device", "gpu", "--smallest"],
                      env_extra={"JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 1
    assert result(lines, "tf training") == ("SKIP", "not run: --backend-only")
    assert result(lines, "device")[0] == "FAIL"
    last(lines)
    # --require-tensorflow turns the skipped TF checks into failures
    proc, lines = run(["--backend-only", "--require-tensorflow", "--device", "gpu", "--smallest"],
                      env_extra={"JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 1 and result(lines, "tf training")[0] == "FAIL"


def test_without_tensorflow_and_no_backend_fails_clearly():
    # TF refused and Keras told to use it: nothing can run, and the script says so
    proc, lines = run(["--smallest"], env_extra={"KERAS_BACKEND": "tensorflow"}, no_tf=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, text = result(lines, "tf training")
    assert status == "SKIP" and text.startswith("not run: TensorFlow is not installed")
    assert result(lines, "keras backend")[0] == "FAIL"
    assert "TensorFlow checks not run" in proc.stdout
    assert last(lines)["train"] == "n/a"


@pytest.mark.skipif(not has("jax"), reason="jax is not installed: the no-TensorFlow backend section "
                    "runs on Keras' jax backend (jax[cpu] in the dev requirements)")
def test_without_tensorflow_runs_the_jax_backend_section():
    # as on the lent GPU machine (no TF, Keras on jax), at the smallest sizes: 32 px, 2 steps.
    # XLA's lowest optimisation level only shortens the CPU compiles of B0 (minutes otherwise).
    proc, lines = run(["--smallest", "--steps", "1", "--epochs", "2", "--images", "1"],
                      env_extra={"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
                                 "XLA_FLAGS": "--xla_backend_optimization_level=0"}, no_tf=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result(lines, "tf environment")[0] == "SKIP"
    assert "common.models.build_model" in result(lines, "backend model")[1]
    status, text = result(lines, "backend training loss")
    losses = [float(v) for v in text.split("loss ")[-1].split(" -> ")]
    assert status == "OK" and len(losses) == 2 and losses[1] < losses[0]
    assert result(lines, "backend inference")[0] == "OK"
    stages = result(lines, "predict stages")[1]
    per = dict((k, float(v)) for k, v in re.findall(r"(decode|segment|tiles|score|encode) (\d+\.\d+)", stages))
    assert set(per) == {"decode", "segment", "tiles", "score", "encode"}
    m = last(lines)
    assert "via jax" in m["device"] and float(m["train"]) > 0
    assert float(m["predict"]) == pytest.approx(sum(per.values()), abs=0.005)
    assert "model time from the jax backend + CPU stages" in result(lines, "projection")[1]


def _submission(path, rows):
    lines = ["ID,ImageWidth,ImageHeight,PredictionString"]
    lines += [f"{image_id},64,64," + " ".join(f"{k} {c:.6f} {m}" for k, c, m in triples)
              for image_id, triples in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gpu_cpu_comparison_rule(tmp_path):
    # the rule the GPU run applies to its CPU rerun: same IDs and masks, confidences within the
    # tolerance; a detection on one side only is fine just above the 0.01 threshold
    sys.path.insert(0, str(SCRIPT.parent))
    import accel_check_predict as accel_check  # the predict job's module holds the rule
    from common import masks

    import numpy as np

    m1 = masks.encode_cell(np.ones((4, 5), bool), (0, 0, 4, 5), (64, 64))
    m2 = masks.encode_cell(np.ones((6, 3), bool), (10, 10, 16, 13), (64, 64))
    a = _submission(tmp_path / "a.csv", [("x", [(0, 0.5, m1), (3, 0.2, m2)]), ("y", [])])
    ok, msg = accel_check.compare_submissions(
        a, _submission(tmp_path / "b.csv", [("x", [(0, 0.505, m1), (3, 0.2, m2), (5, 0.011, m2)]), ("y", [])]), 0.02)
    assert ok, msg
    assert "max |GPU - CPU| = 5.00e-03" in msg
    assert not accel_check.compare_submissions(
        a, _submission(tmp_path / "c.csv", [("x", [(0, 0.55, m1), (3, 0.2, m2)]), ("y", [])]), 0.02)[0]
    assert not accel_check.compare_submissions(
        a, _submission(tmp_path / "d.csv", [("x", [(0, 0.5, m1)]), ("y", [])]), 0.02)[0]
    assert not accel_check.compare_submissions(
        a, _submission(tmp_path / "e.csv", [("x", [(0, 0.5, m1), (3, 0.2, m2)]), ("z", [])]), 0.02)[0]


def test_each_job_runs_alone_and_uses_public_names_only():
    """accel_check.py runs the two jobs; each is its own script with the same options, and
    none reaches into a private name (`module._name`, `from module import _name`)."""
    scripts = sorted(SCRIPT.parent.glob("accel_check*.py"))
    assert {p.name for p in scripts} >= {"accel_check.py", "accel_check_train.py",
                                         "accel_check_predict.py", "accel_check_common.py"}
    for path in scripts:
        text = path.read_text()
        private = re.findall(r"\b(?!self\b|os\b|sys\b)[a-z]\w*\._[a-z]\w*", text)
        private += re.findall(r"from \S+ import .*\b_[a-z]\w*", text)
        assert not private, (path.name, private)
    for job in ("accel_check_train.py", "accel_check_predict.py"):
        proc = subprocess.run([sys.executable, str(SCRIPT.parent / job), "--epochs", "1"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--epochs must be >= 2" in proc.stderr, proc.stderr
        assert job.removesuffix(".py") in proc.stderr  # its own name in the usage line
