"""Training: the methods (one table, training.methods.METHODS), TrainConfig and presets, the
trainer (resume, DDP) and per-epoch validation. The method comparison is a study: `studies.methods`."""
