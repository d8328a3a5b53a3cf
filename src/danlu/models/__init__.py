"""Model registry and architectures: `create_model('resnet18', num_classes=10)`, or any torchvision
classifier as `create_model('tv:resnet50')`."""
from danlu.models.registry import create_model, list_models, register_model
from danlu.models import inception_resnet_v1, lenet, minigooglenet, mobilefacenet, resnet  # noqa: F401  (register)

__all__ = ["create_model", "list_models", "register_model"]
