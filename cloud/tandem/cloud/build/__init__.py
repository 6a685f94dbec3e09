"""The model build pipeline: train, distill, quantize, export, sign and package the zoo.

`tandem models build --out DIR` (see `cli.py`) calls `pipeline.build_zoo`, which builds each
requested model from its spec, `examples/<name>/model.toml` (`--spec` names a user's), by the
spec build (`user.build_spec`: `prepare`, `distill`, `torch_source`, `checks`,
`calibration`; `generative` for `task = "generation"`) with a `context.BuildContext`, signs
every edge variant (`signing`), packs it (`packaging`) and merges the per-model results into
`DIR/report.json` and `DIR/report.md` (`report`).
"""
