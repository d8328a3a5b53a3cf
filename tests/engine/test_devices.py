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
