"""danlu (丹炉): train image classifiers and face recognizers as fast as the hardware allows.

    import danlu
    result = danlu.train("lenet_mnist5k")            # or a YAML path, a dict, or a danlu.Recipe
    print(result.test_accuracy, result.run_dir)

Nothing heavy is imported until it is used.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "train": "danlu.api", "evaluate": "danlu.api", "RunResult": "danlu.api", "load_run": "danlu.runs",
    "Recipe": "danlu.config", "load_recipe": "danlu.config", "list_recipes": "danlu.config",
    "ImageSet": "danlu.data.imageset", "load_dataset": "danlu.data.datasets",
    "create_model": "danlu.models", "list_models": "danlu.models", "register_model": "danlu.models",
    "DanluError": "danlu.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'danlu' has no attribute {name!r}")
