"""Model registry and architectures: `create_model('resnet18', num_classes=10)`, or any torchvision
classifier as `create_model('tv:resnet50')`."""
from danlu.models.registry import (ModelInfo, classifier_name, create_model, is_face_model, list_models, model_info,
                                   register_model, unwrap)
from danlu.models import airbench, dlib_resnet, inception_resnet_v1, lenet, minigooglenet, mobilefacenet, resnet  # noqa: F401,E501

__all__ = ["ModelInfo", "classifier_name", "create_model", "is_face_model", "list_models", "model_info", "register_model", "unwrap"]
