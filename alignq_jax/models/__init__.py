"""Models built from a ``QuantConfig`` with AlignQ's quantizer placement (docs/method.md §7)."""

from alignq_jax.models.resnet_cifar import BasicBlock, CifarResNet, resnet20, resnet56
from alignq_jax.models.densenet import DenseNet, densenet40
from alignq_jax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from alignq_jax.models.resnet50 import ResNet50, resnet50
from alignq_jax.models.small_cnn import SmallCNN
from alignq_jax.models.small_resnet import SmallResNet

MODELS = {
    "resnet20": resnet20, "resnet56": resnet56, "mobilenet_v2": mobilenet_v2, "densenet40": densenet40,
    "small_cnn": SmallCNN, "small_resnet": SmallResNet,
    "resnet50": resnet50,
}


def get_model(name: str, **kwargs):
    """Builds a model by name (a key of ``MODELS``) with keyword fields (config, num_classes, ...)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {tuple(MODELS)}; got {name!r}") from None
    return factory(**kwargs)


__all__ = [
    "BasicBlock", "CifarResNet", "DenseNet", "MODELS", "MobileNetV2", "ResNet50", "SmallCNN", "SmallResNet",
    "densenet40", "get_model", "mobilenet_v2", "resnet20", "resnet50", "resnet56",
]
