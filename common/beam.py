"""What both Apache Beam engines share (the builder's, `tfrecords_builder.beam_engine`, and
predict's, `infer_gpu.beam_engine`): pipeline options from the flags a stage did not know, the
rule that remote workers need `gs://` paths, and reading a pipeline's counters.

Beam is an extra (`requirements-beam.txt`); it is imported only inside these functions.
"""
from __future__ import annotations

from typing import Iterable, Sequence

# Runners whose workers run on this machine and so see its files; any other needs gs:// paths.
LOCAL_RUNNERS = ("DirectRunner", "direct", "SwitchingDirectRunner", "BundleBasedDirectRunner", "PrismRunner",
                 "prism")
_DIRECT = ("DirectRunner", "direct", "SwitchingDirectRunner")
INSTALL_HINT = "pip install 'hpa-scc[beam]' or pip install -r requirements-beam.txt"


def require_beam(flag: str = "--engine beam") -> None:
    """An ImportError naming the install command unless Apache Beam can be imported."""
    try:
        import apache_beam  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{flag} needs Apache Beam ({err}): {INSTALL_HINT}") from None


def pipeline_options(workers: int, beam_args: Sequence[str]):
    """Beam's PipelineOptions from the arguments the stage did not know.

    Default runner DirectRunner. On DirectRunner, `workers` N > 1 means N workers
    (`--direct_num_workers N` unless given), as worker processes unless another
    `--direct_running_mode` is given (`multi_threading`: N worker threads in this process).
    The workers log at WARNING (`--default_sdk_harness_log_level`) unless told, or verbose.
    """
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    from common import quiet

    beam_args = list(beam_args)

    def given(flag: str) -> bool:  # as "--flag value" or "--flag=value"
        return any(a.startswith(flag) for a in beam_args)

    if not quiet.is_verbose() and not given("--default_sdk_harness_log_level"):
        beam_args += ["--default_sdk_harness_log_level", "WARNING"]  # workers' INFO lines (HPA_VERBOSE=1: all)
    options = PipelineOptions(beam_args)
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = "DirectRunner"
    if std.runner in _DIRECT and workers > 1:
        direct = options.view_as(DirectOptions)
        if not given("--direct_num_workers"):
            direct.direct_num_workers = int(workers)
        if not given("--direct_running_mode"):
            direct.direct_running_mode = "multi_processing"
    return options


def runner_name(options) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner)


def in_this_process(options) -> bool:
    """Whether the pipeline's workers run inside this process (DirectRunner in memory with one
    worker, or `--direct_running_mode multi_threading` with any number of worker threads): then
    objects this process holds (already-loaded models) can reach them."""
    from apache_beam.options.pipeline_options import DirectOptions

    direct = options.view_as(DirectOptions)
    mode = direct.direct_running_mode or "in_memory"
    if runner_name(options) not in _DIRECT:
        return False
    return mode == "multi_threading" or (mode == "in_memory" and (direct.direct_num_workers or 1) <= 1)


def remote_paths_problem(runner: str, paths: Iterable[tuple[str, str]]) -> str | None:
    """For a runner whose workers run elsewhere (not LOCAL_RUNNERS): a message naming the
    first `(flag, path)` that is not a `gs://` path, else None."""
    from common import storage

    if runner in LOCAL_RUNNERS:
        return None
    local = [(flag, p) for flag, p in paths if p and not storage.is_gcs(p)]
    if not local:
        return None
    flags = ", ".join(dict.fromkeys(flag for flag, _ in local))
    return (f"{runner} workers cannot see this machine's files: give {flags} as gs:// paths "
            f"(not {local[0][1]})")


def counters(result, namespace: str, names: Sequence[str] = ()) -> dict[str, int]:
    """The finished pipeline's counters of `namespace` (committed values where the runner
    knows them, else attempted), with every name of `names` present (0 when never counted)."""
    from apache_beam.metrics.metric import MetricsFilter

    out = dict.fromkeys(names, 0)
    for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out
