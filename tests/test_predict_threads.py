"""infer_gpu.engine.size_thread_pools: --tf-threads sizes TensorFlow's pools on the CPU before
TensorFlow starts; 0 keeps its defaults; once it has started nothing changes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys
from infer_gpu.engine import size_thread_pools
first = size_thread_pools(int(sys.argv[1]), "CPU", int(sys.argv[2]))
import tensorflow as tf
tf.constant(1.0) + 1.0  # TensorFlow has started: its pools are fixed now
again = size_thread_pools(1, "CPU", 7)
print(json.dumps({"first": first, "again": again}))
"""


def _run(readers, tf_threads):
    res = subprocess.run([sys.executable, "-c", CODE, str(readers), str(tf_threads)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_tf_threads_sizes_the_pools_before_tensorflow_starts():
    out = _run(1, 1)
    assert out["first"] == {"readers": 1, "intra_op": 1, "inter_op": 1, "how": "--tf-threads 1"}
    # once TensorFlow runs, a second call reports the pools as they are and says why
    assert (out["again"]["intra_op"], out["again"]["how"]) == (1, "fixed before predict started")
    default = _run(2, 0)["first"]
    assert (default["intra_op"], default["inter_op"], default["how"]) == (0, 0, "TensorFlow's defaults")
