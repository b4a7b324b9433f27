"""A quiet console: TensorFlow's start-up noise silenced before TensorFlow is imported.

Every stage's entry point calls `quiet()` first (before anything imports TensorFlow or Keras):

    from common import quiet
    quiet.quiet(verbose="--verbose" in argv)

What it silences, and how (TensorFlow 2.21 on a machine without a GPU prints ~6 such lines per
process, and the trainer more):
- C++ logs below FATAL (the oneDNN notice, "Could not find cuda drivers", cuInit failures, the
  NodeDef attribute error of a loaded model, the CPU-instructions notice):
  TF_CPP_MIN_LOG_LEVEL=3. oneDNN itself stays as it is (TF_ENABLE_ONEDNN_OPTS is not touched).
- absl lines written before absl is initialised, which ignore that variable: the first
  `import tensorflow` runs with file descriptor 2 sent to a temporary file; afterwards stderr
  is restored and every line of it that is not a known start-up line is written back, so an
  import that fails still shows why.
The stages' own lines, Python warnings and errors still show.

`--verbose` on any stage, or HPA_VERBOSE=1 in the environment, leaves all of it alone (and
`quiet(verbose=True)` sets HPA_VERBOSE=1 so that child processes are verbose too).
Importing this module imports nothing heavy and changes nothing.
"""
from __future__ import annotations

import importlib.abc
import os
import re
import sys
import tempfile

ENV = "HPA_VERBOSE"  # 1/true/yes: TensorFlow's start-up lines are printed, as without this module

# Lines TensorFlow, absl and XLA print at start-up that say nothing about the user's run. An
# absl log line is `[IWEF]MMDD hh:mm:ss.micros  thread file.cc:line] text`.
_ABSL = r"[IWE]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\] "
NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _ABSL + r"oneDNN custom operations are on",
    _ABSL + r"Could not find cuda drivers",
    _ABSL + r"failed call to cuInit",
    _ABSL + r"This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow",
    _ABSL + r"Unable to register cu(DNN|FFT|BLAS) factory",
    _ABSL + r"computation placer already registered",
    _ABSL + r"TF-TRT Warning",
    _ABSL + r"NodeDef mentions attribute",
    r"^Attempting to register factory for plugin",
))
VERBOSE_HELP = ("also print TensorFlow's start-up lines (C++ and absl logs), which are hidden "
                "by default; HPA_VERBOSE=1 does the same")

_installed = False


def is_verbose() -> bool:
    """Whether HPA_VERBOSE asks for TensorFlow's start-up lines."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_noise(line: str) -> bool:
    """Whether `line` (one line of stderr, without its newline) is a known start-up line."""
    return any(p.search(line) for p in NOISE)


def quiet(verbose: bool = False) -> bool:
    """Silence TensorFlow's start-up lines in this process and its children, unless `verbose`
    or HPA_VERBOSE. Call before TensorFlow is imported (the C++ log level is read by TensorFlow
    when it loads). Returns True when quiet."""
    global _installed
    if verbose:
        os.environ[ENV] = "1"  # children (workers, subprocesses) follow the parent
    if verbose or is_verbose():
        return False
    # Makefile and tests set 2 (errors still print, among them cuInit's): 3 keeps only FATAL
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if not _installed and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietImport())
        _installed = True
    return True


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds the top-level `tensorflow` package with the other finders and wraps its loading
    in `_filtered_stderr`; removes itself once it has done so."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import, and no recursion into this finder
        spec = None
        for finder in list(sys.meta_path):  # in order: an import hook that refuses TF still does
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _filtered_stderr():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _filtered_stderr:
    """File descriptor 2 (what C++ writes to) goes to a temporary file inside the block;
    afterwards the lines that are not noise are written to the real stderr."""

    def __enter__(self):
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            self._saved = os.dup(2)
        except OSError:  # no fd 2 (a detached process): nothing to filter
            self._saved = None
            return self
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        kept = [ln for ln in text.splitlines() if ln.strip() and not is_noise(ln)]
        if kept:
            os.write(2, ("\n".join(kept) + "\n").encode())
        return False
