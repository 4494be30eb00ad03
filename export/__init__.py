"""Checkpoint to ONNX, TorchScript, Triton model repository and BentoML model store: see issue 6."""
