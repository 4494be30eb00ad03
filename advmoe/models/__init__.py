from .base import ModelConfig, MoENet, set_execution, set_gate_grad
from .densenet import DenseNet, DenseNetConfig
from .resnet import ResNet, ResNetConfig
from .vgg import VGG, VGGConfig
from .wrn import WideResNet, WideResNetConfig
