"""tfrecords_builder: HPA images + label lists -> fold-split TFRecord shards + manifest.json.

`python -m tfrecords_builder --images DIR_or_gs --labels CSV --out DIR_or_gs --mode image|cell`
(see `--help`). Modules: `config` (BuildConfig, presets), `folds` (iterative stratification),
`plan` (labels -> folds -> shards, fixed before writing), `worker` (one image -> serialized
examples, TensorFlow-free), `records` (TFRecord framing; the Example encoding is `common.features.serialize`), `writer`
(temp file -> final name), `manifest`, `core` (plan, resume, finish: shared by both
engines), `build` (the local engine), `beam_engine` (the Apache Beam engine).
"""
