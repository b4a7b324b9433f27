"""infer_gpu: test images + trained runs -> submission.csv; also segment, validate, evaluate.

Commands (`python -m infer_gpu COMMAND`, table in `cli`): `segment`, `predict`, `validate`,
`evaluate`, one module each. Behind `predict` (the command line) is `engine.predict`,
which calls, in order: `reading` (read, segment, tile, encode one image), `batching` (tiles of
several images per model call), `scorer` (device, TTA, one compiled function per tile spec;
runs loaded by `runs`), `combine` (THE combine rule; scores -> submission row), `writing`
(parts and overlays, then the CSV), `report` (OUT.report.json). `config` holds
`PredictConfig` (the paths included) and its presets; `parts` the `--resume` sidecar.
"""
