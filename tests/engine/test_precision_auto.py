"""precision: auto -> a format, from what torch reports about the GPU (mocked here) or a measured probe on a CPU,
resolved once when a run starts and saved as that format."""
import json

import pytest
import torch
import yaml

import danlu
from danlu.engine.precision import CPU_BF16_GAIN, Precision, resolve_auto


@pytest.mark.parametrize("capability, bf16, want", [((9, 0), True, "bf16"), ((8, 0), True, "bf16"),
                                                   ((8, 6), False, "fp32"), ((7, 0), False, "fp32"),
                                                   ((7, 5), True, "fp32")])
def test_a_gpu_gets_bf16_where_it_has_bf16_tensor_cores(monkeypatch, capability, bf16, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    name, why = resolve_auto(torch.device("cuda"))
    assert name == want and f"compute capability {capability[0]}.{capability[1]}" in why


def test_a_cpu_gets_bf16_only_where_the_probe_measures_it_clearly_faster():
    cpu = torch.device("cpu")
    assert resolve_auto(cpu, lambda: CPU_BF16_GAIN + 0.2)[0] == "bf16"
    assert resolve_auto(cpu, lambda: CPU_BF16_GAIN - 0.05)[0] == "fp32"
    assert resolve_auto(cpu, lambda: 0.5)[0] == "fp32"
    assert resolve_auto(cpu)[0] == "fp32"  # no probe: the safe format


def test_auto_is_not_a_format_until_resolved():
    with pytest.raises(danlu.DanluError, match="auto is resolved"):
        Precision("auto", "cpu")
    assert Precision.for_inference("auto", "cpu").name == "fp32"


@pytest.mark.parametrize("cached_gain, want", [(2.0, "bf16"), (1.0, "fp32")])
def test_a_run_resolves_auto_once_saves_the_format_and_reuses_this_machines_probe(tmp_path, monkeypatch,
                                                                                    cached_gain, want):
    monkeypatch.setenv("DANLU_DATA", str(tmp_path / "cache"))
    train, test = danlu.load_dataset("synthetic", train_size=128, test_size=32)
    recipe = {"precision": "auto", "devices": {"device": "cpu"}, "data": {"batch_size": 16},
              "run": {"max_iter": 2, "tensorboard": False}}
    first = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "a", quiet=True)
    probes = tmp_path / "cache" / "probes.json"
    (key, measured), = json.loads(probes.read_text()).items()  # measured once, kept per machine and model
    assert first.summary["recipe"]["precision"] == ("bf16" if measured >= CPU_BF16_GAIN else "fp32")
    # the next run here reads the kept answer instead of measuring again
    probes.write_text(json.dumps({key: cached_gain}))
    second = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "b", quiet=True)
    assert second.summary["recipe"]["precision"] == want and f"{cached_gain:.2f}x" in second.summary["precision_auto"]
    saved = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())
    assert saved["precision"] == want  # a resumed run trains on in the format the run started with
