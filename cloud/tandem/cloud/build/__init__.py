"""The model build pipeline: train, distill, quantize, export, sign and package the zoo.

`tandem models build --out DIR` (see `cli.py`) calls `pipeline.build_zoo`, which builds each
requested model through its module (`digits.build(ctx)`, `minilm.build(ctx)`) with a
`context.BuildContext`, signs every edge variant (`signing`), packs it (`packaging`) and
merges the per-model results into `DIR/report.json` and `DIR/report.md` (`report`).
"""
