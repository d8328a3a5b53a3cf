"""What is being learned: image classification, or face verification (an embedding network with an identity head,
tested on people never seen in training). A task owns its criterion, its evaluator, its headline test figure, its
console line, its summary fields and what it does after training, so the engine, the API and the run folder never
ask which task a run is:

    task = task_for(recipe)                   # the one answer: ClassificationTask or VerificationTask
    criterion, evaluate = task.criterion(), task.evaluator(test_set)
    summary.update(task.summary(last_test))

Nothing is imported until used (a classifier run loads no face module).
"""
from __future__ import annotations

_LAZY = {"Task": "danlu.tasks.base", "task_for": "danlu.tasks.base",
         "ClassificationTask": "danlu.tasks.classification", "VerificationTask": "danlu.tasks.verification"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'danlu.tasks' has no attribute {name!r}")
