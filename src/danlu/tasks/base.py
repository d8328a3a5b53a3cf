"""The task seam: what the engine, the API and the run folder ask of "what is being learned", and the one place
that answers which task a recipe is.

    task = task_for(recipe)                  # VerificationTask for a face model, else ClassificationTask
    task.headline                            # 'acc' or 'verification_acc': the test figure a run is judged by
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from torch import nn

from danlu.errors import DanluError
from danlu.models import is_face_model, list_models
from danlu.tasks.classification import ClassificationTask
from danlu.tasks.verification import VerificationTask

if TYPE_CHECKING:  # types only: the config imports nothing of the tasks, the tasks nothing of the config at run time
    from danlu.config import Recipe
    from danlu.data.imageset import ImageSet

# evaluate(model, loader, augment, precision, dist, max_batches=None, label_smoothing=0.0) -> test figures
Evaluate = Callable[..., dict[str, Any]]


class Task(Protocol):
    name: str  # classification | verification
    headline: str  # the test figure a run reports first and run.monitor: auto watches
    whole_test_set: bool  # every rank evaluates the whole test set (pairs are drawn across it), not its shard

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of the model's entry point that the task sets (an identity head's kind, scale, ...)."""

    def criterion(self) -> nn.Module:
        """The training loss: loss = criterion(model(x), y)."""

    def evaluator(self, test: "ImageSet") -> Evaluate:
        """The test metric over `test` (called at every test event and by danlu.evaluate)."""

    def test_line(self, record: dict[str, Any], total: int) -> str:
        """A test event as one console line."""

    def done_line(self, test: dict[str, Any], stats: Any, classes: int, world: int, run_dir: Path) -> str:
        """The run's last console line."""

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        """summary.json's fields of this task, from the last test event."""

    def after_training(self, model: nn.Module, train: "ImageSet", parts: Any, stats: Any,
                       quiet: bool) -> dict[str, Any]:
        """A step after the loop (every rank alike). Returns summary.json's record of it ({}: nothing done) and may
        replace stats.last_test, in which case the caller logs that as the run's last test event."""

    def write_outputs(self, run_dir: Path, model: nn.Module, test: dict[str, Any], test_data: "ImageSet") -> None:
        """The run folder's files of this task (rank 0), beside model.safetensors and summary.json."""

    def restore(self, run_dir: Path, model: nn.Module) -> None:
        """What loading a finished run applies to its model beyond the weights (danlu.runs.load_run)."""


def task_for(recipe: "Recipe", model: Optional[nn.Module] = None) -> Task:
    """The recipe's task: face verification for a face model (the registry's `face` flag, or a FaceModel passed as
    `model`), else classification. Recipe keys that only one task reads are refused for the other."""
    m, d = recipe.model, recipe.data
    face = is_face_model(model) if model is not None else is_face_model(m.name)
    if face:
        return VerificationTask(
            head=m.head or "softmax", scale=m.scale, margin=m.margin, embedding_dim=m.embedding_dim,
            test_flip=m.test_flip is not False, label_smoothing=recipe.optim.label_smoothing,
            held_out=d.split == "identities", test_pairs=d.test_pairs, split_seed=d.split_seed, whiten=m.whiten,
            seed=recipe.run.seed, store=d.root if d.name == "store" else None, model_name=m.name)
    faces = ", ".join(n for n in list_models() if is_face_model(n))
    if m.head is not None or m.embedding_dim is not None:
        key = "model.head" if m.head is not None else "model.embedding_dim"
        raise DanluError(f"{key}={m.head if m.head is not None else m.embedding_dim}: model '{m.name}' is not a face "
                         f"model; expected model.name one of {faces} (or no model.head / model.embedding_dim)")
    if d.split == "identities":
        raise DanluError(f"data.split=identities: model '{m.name}' has no embedding to verify held-out people with; "
                         f"expected a face model ({faces}) or data.split=images")
    return ClassificationTask(label_smoothing=recipe.optim.label_smoothing, test_flip=bool(m.test_flip))
