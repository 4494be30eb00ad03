"""Checkpoint -> ONNX (dynamo exporter), torch.export (.pt2), TorchScript (.pt), an AOTInductor
package, a Triton model repository and the BentoML model store, keeping the sparse expert
dispatch in the graph; parity-checked."""
from .api import FORMATS, ExportResult, export_checkpoint
from .parity import ParityError
