"""Pytest fixtures: a REAL local Cloud Storage emulator process (`gcp-storage-emulator`).

`gcs_emulator` (session): starts `gcp-storage-emulator start --in-memory` on 127.0.0.1 and a free
port, waits until it answers HTTP, points the `google-cloud-storage` client at it through
`STORAGE_EMULATOR_HOST` (anonymous credentials, see common.storage.client) and stops it at the end.
`gcs_bucket` (function): a fresh, empty bucket on that emulator; returns its name.
Nothing is mocked: the client speaks HTTP to a separate process.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

_bucket_numbers = itertools.count()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable() -> str:
    local = Path(sys.executable).parent / "gcp-storage-emulator"
    if local.exists():
        return str(local)
    found = shutil.which("gcp-storage-emulator")
    if not found:
        raise RuntimeError("gcp-storage-emulator is not installed (pip install -r requirements-dev.txt)")
    return found


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def gcs_emulator():
    """URL of a running emulator (`http://127.0.0.1:PORT`); `STORAGE_EMULATOR_HOST` is set to it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [_executable(), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_until_up(url, proc)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """Name of a new, empty bucket on the emulator."""
    from common import storage

    name = f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}"
    storage.client().create_bucket(name)
    return name
