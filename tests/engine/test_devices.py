"""The device words, and the choice `auto` makes from what torch reports (CUDA, then Apple's MPS, then the CPU)."""
import pytest
import torch

from danlu.config import load_recipe
from danlu.engine import devices
from danlu.engine.devices import resolve_device
from danlu.errors import DanluError


def _machine(monkeypatch, cuda: bool, mps: bool, mps_built: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps_built)


@pytest.mark.parametrize("cuda, mps, built, want", [(True, True, True, "cuda"), (True, False, True, "cuda"),
                                                    (False, True, True, "mps"), (False, False, True, "cpu"),
                                                    (False, True, False, "cpu")])
def test_auto_takes_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, built, want):
    _machine(monkeypatch, cuda, mps, built)
    assert resolve_device("auto").type == want


def test_mps_where_torch_has_it(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=True)
    assert resolve_device("mps") == torch.device("mps")
    assert load_recipe(overrides=["devices.device=mps"]).devices.device == "mps"


def test_mps_where_torch_lacks_it_is_one_line(monkeypatch):
    _machine(monkeypatch, cuda=True, mps=False)
    with pytest.raises(DanluError, match=r"^--device mps: .*Apple.*; expected cpu or auto$"):
        resolve_device("mps")


def test_a_torch_without_the_mps_backend(monkeypatch):
    monkeypatch.delattr(torch.backends, "mps")
    assert devices.mps_available() is False


def test_unknown_word_names_the_words():
    with pytest.raises(DanluError, match="expected auto, cpu, cuda, mps or cuda:N"):
        resolve_device("metal")


class _NoFloat64(torch.overrides.TorchFunctionMode):
    """As on Apple's GPU (mps), which has no float64: any torch call that makes a float64 tensor fails."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor")
        return out


def test_the_step_keeps_its_books_without_float64_where_the_device_has_none(monkeypatch):
    """Augmentation draws (every op on), the training meter and evaluation in float32 on a device like mps; the CPU
    stands in for it here (mps exists only on Apple silicon)."""
    from danlu.data.augment import Augment
    from danlu.data.loader import make_loader
    from danlu.engine.distributed import Dist
    from danlu.tasks.classification import evaluate
    from danlu.engine.metrics import Meter
    from danlu.engine.precision import Precision

    monkeypatch.setattr(devices, "NO_FLOAT64", {"mps", "cpu"})
    assert devices.wide_float(torch.device("cpu")) == torch.float32
    assert devices.wide_float(torch.device("mps")) == torch.float32
    x = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(8) % 3
    aug = Augment(flip=True, crop=2, resized_crop=(0.5, 1.0), rotate=10, brightness=0.2, contrast=0.2, saturation=0.2,
                  gamma=0.2, ramp=0.2, grayscale=0.3, blur=1.0, blur_p=0.5, erase=0.5, trivial=True, mixup=0.4,
                  cutmix=1.0, num_classes=3, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    aug.wide = devices.wide_float(x.device)  # as engine/build.py sets it
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 3))
    meter = Meter(x.device)
    loader = make_loader(x, y, 4, device="cpu", shuffle=False, drop_last=False)
    with _NoFloat64():
        xb, soft = aug.train_batch(x, y, torch.Generator().manual_seed(0))
        meter.add(torch.tensor(1.0), model(xb), soft)
        figures = evaluate(model, loader, aug, Precision("fp32", "cpu"), Dist())
    assert xb.dtype == soft.dtype == torch.float32 and meter.read()[2] == 8 and figures["samples"] == 8
    with pytest.raises(AssertionError, match="float64"), _NoFloat64():  # the mode catches what it should
        torch.zeros(2, dtype=torch.float64)
