"""Training: the methods (one table, training.methods.METHODS), TrainConfig and presets, the
trainer (resume, DDP), per-epoch validation and the method comparison report."""
