"""precision: auto -> a format, from what torch reports about the GPU (mocked here); fp32 on a CPU. Resolved once
when a run starts and saved as that format."""

import pytest
import torch
import yaml

import danlu
from danlu.engine.precision import Precision, resolve_auto


@pytest.mark.parametrize("capability, bf16, want", [((9, 0), True, "bf16"), ((8, 0), True, "bf16"),
                                                   ((8, 6), False, "fp32"), ((7, 0), False, "fp32"),
                                                   ((7, 5), True, "fp32")])
def test_a_gpu_gets_bf16_where_it_has_bf16_tensor_cores(monkeypatch, capability, bf16, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    name, why = resolve_auto(torch.device("cuda"))
    assert name == want and f"compute capability {capability[0]}.{capability[1]}" in why


def test_a_cpu_gets_fp32_whatever_bf16_would_measure_so_process_count_cannot_change_the_result():
    # bf16 on a CPU rounds differently with the batch each process gets, so 2 processes x B would stop equalling
    # 1 x 2B; a timing-based choice also flips between 1 and 2 processes and with the machine's load
    name, why = resolve_auto(torch.device("cpu"))
    assert name == "fp32" and "bf16 only when asked" in why


def test_auto_is_not_a_format_until_resolved():
    with pytest.raises(danlu.DanluError, match="auto is resolved"):
        Precision("auto", "cpu")
    assert Precision.for_inference("auto", "cpu").name == "fp32"


def test_a_run_resolves_auto_once_and_saves_the_format(tmp_path):
    train, test = danlu.load_dataset("synthetic", train_size=128, test_size=32)
    recipe = {"precision": "auto", "devices": {"device": "cpu"}, "data": {"batch_size": 16},
              "run": {"max_iter": 2, "tensorboard": False}}
    r = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "a", quiet=True)
    assert r.summary["recipe"]["precision"] == "fp32"
    assert r.summary["precision_auto"].startswith("precision auto -> fp32")
    saved = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert saved["precision"] == "fp32"  # a resumed run trains on in the format the run started with
