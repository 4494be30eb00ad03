"""advmoe: robust Mixture-of-Experts CNNs (AdvMoE) with a real sparse execution path."""
from ._version import __version__
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .gate import Route, route
from .layers import ConvNorm2d, LayerGate, MoEConv2d
from .macs import count_macs
from .models import ModelConfig, MoENet, set_execution
from .registry import create_model, dense_twin, is_moe_model, list_models, register_model
from .data import DatasetNotFoundError, get_dataset_info, list_datasets, load_dataset
