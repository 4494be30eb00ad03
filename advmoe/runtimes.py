"""How a trained model runs, each choice named once: the model core's two executions
(`set_execution`), the runtimes an exported model runs in with the file each reads from an
`advmoe export` folder, and the one onnxruntime session every application builds.

Standard library only (onnxruntime is imported when a session is made), so the service's API
worker and the command line read the choices without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXECUTIONS = {
    "sparse": "each sample runs its chosen experts only (inference)",
    "static": "the sparse path with static shapes: each expert's group padded to a capacity, no host "
              "synchronisation (CUDA graphs; an ONNX graph without NonZero)",
    "masked": "every expert computed, the chosen one kept, as the reference code runs (training; a baseline)",
}


@dataclass(frozen=True)
class Runtime:
    file: str  # what it reads from an `advmoe export` folder
    help: str


RUNTIMES = {
    "torch": Runtime("model.safetensors", "eager PyTorch from the weights (sparse or masked execution)"),
    "onnxruntime": Runtime("model.onnx", "the exported ONNX graph, the sparse dispatch in it"),
    "pt2": Runtime("model.pt2", "the torch.export program"),
    "torchscript": Runtime("model.pt", "TorchScript, for LibTorch and Triton's PyTorch backend"),
    "aoti": Runtime("model.aoti.pt2", "an AOTInductor package (compiled C++ kernels)"),
}


def runtime_choices(names) -> dict[str, str]:
    """{runtime: meaning} of `names`, in that order: the choices of a setting that takes some of them."""
    return {name: RUNTIMES[name].help for name in names}


def onnx_session(path: str | Path, threads: int = 1, gpu: bool = False):
    """An onnxruntime session of `threads` intra-op threads on the CPU (with gpu: on CUDA when
    onnxruntime has it, the CPU otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning onnxruntime threads would take the cores from torch running beside them (the
    # service's probe worker, export's parity checks).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)
