"""Models built from a ``QuantConfig`` with AlignQ's quantizer placement (docs/method.md §7)."""

from alignq_jax.models.resnet_cifar import BasicBlock, CifarResNet, resnet20, resnet56
from alignq_jax.models.small_cnn import SmallCNN
from alignq_jax.models.small_resnet import SmallResNet

MODELS = {"resnet20": resnet20, "resnet56": resnet56, "small_cnn": SmallCNN, "small_resnet": SmallResNet}


def get_model(name: str, **kwargs):
    """Builds a model by name (a key of ``MODELS``) with keyword fields (config, num_classes, ...)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {tuple(MODELS)}; got {name!r}") from None
    return factory(**kwargs)


__all__ = ["BasicBlock", "CifarResNet", "MODELS", "SmallCNN", "SmallResNet", "get_model", "resnet20", "resnet56"]
