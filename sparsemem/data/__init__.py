"""Data: TFDS corpora (LibreOffice help, text folders, catalogue datasets) and grain input pipelines.

Entry points: `sources` (domains to train on), `pipeline.train_batches` / `pipeline.eval_batches`,
and the `sparsemem data prepare|stats` commands in `commands`.
"""
