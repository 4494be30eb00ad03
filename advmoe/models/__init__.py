from .base import ModelConfig, MoENet, get_execution, set_execution
from .densenet import DenseNet, DenseNetConfig
from .resnet import ResNet, ResNetConfig
from .vgg import VGG, VGGConfig
from .wrn import WideResNet, WideResNetConfig
