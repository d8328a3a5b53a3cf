"""Speed switches: torch.compile on the CPU, snapshots between compiled and plain models, channels-last, the CUDA-only
switches' errors, and (marked `cuda`, run by scripts/gpu_check.sh) the same on a GPU with CUDA graphs."""
import json
import sys

import pytest
import torch

import danlu
from danlu.cli import main
from danlu.data.augment import Augment
from danlu.engine.checkpoint import load_latest
from danlu.engine.speed import DeviceMonitor, Speed
from danlu.errors import DanluError
from tests.conftest import TINY, run_cli, sets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sets():
    return danlu.load_dataset("synthetic", size=16, train_size=256, test_size=64)


def _recipe(max_iter=8, **top):
    return {"model": {"name": "lenet"}, "data": {"batch_size": 32, "test_batch_size": 64}, "augment": "none",
            "optim": {"lr": 0.02}, "run": {"max_iter": max_iter, "test_interval": 1000, "snapshot_every": 4,
                                           "display": 4, "seed": 1, "tensorboard": False},
            "devices": {"device": "cpu"}, **top}


def _close(a: torch.nn.Module, b: torch.nn.Module, tol: float = 1e-4) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=name)


def test_compile_on_cpu_and_snapshots_load_either_way(tmp_path, tiny_sets):
    """A compiled run trains like the plain one; its snapshot resumes uncompiled and the other way round."""
    from torch._dynamo.utils import counters

    train, test = tiny_sets
    graphs = counters["stats"]["unique_graphs"]
    compiled = danlu.train(_recipe(compile=True), train_data=train, test_data=test, out=tmp_path / "c", quiet=True)
    assert counters["stats"]["unique_graphs"] > graphs  # torch.compile really traced the model
    plain = danlu.train(_recipe(), train_data=train, test_data=test, out=tmp_path / "p", quiet=True)
    _close(compiled.model, plain.model)  # the same training, up to float rounding
    state, _ = load_latest(tmp_path / "c")
    assert not any("_orig_mod" in k for k in state["model"])  # saved unwrapped: loads into a plain model

    # each run's snapshot at iteration 4, resumed the other way, ends where the original run ended
    for run, other, switch in ((tmp_path / "c", compiled, "compile=false"), (tmp_path / "p", plain, "compile=true")):
        (run / "snapshots" / "iter_00000008.pt").unlink()
        resumed = danlu.train(resume=run, overrides=[switch], train_data=train, test_data=test, quiet=True)
        assert resumed.iterations == 8
        _close(resumed.model, other.model)


def test_speed_wrap_and_compile_modes():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    assert Speed(CPU).wrap(model, (2, 1, 8, 8), None) is model
    wrapped = Speed(CPU, compile=True).wrap(model, (2, 1, 8, 8), None)
    assert wrapped._orig_mod is model  # danlu.api._unwrap finds the plain module to save
    assert Speed(CPU, compile=True).compile_mode is None
    assert Speed(CPU, compile="max-autotune").compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(DanluError, match="compile: 'fast' is not a setting"):
        Speed(CPU, compile="fast")


def test_channels_last(tmp_path, tiny_sets):
    train, test = tiny_sets
    speed = Speed(CPU)
    speed.layout(danlu.create_model("lenet", num_classes=10, in_channels=1, input_size=16))
    assert speed.channels_last is False and speed.memory_format == torch.preserve_format  # auto: off on the CPU

    nhwc = danlu.train(_recipe(channels_last=True), train_data=train, test_data=test, out=tmp_path / "nhwc",
                       quiet=True)
    assert nhwc.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = danlu.train(_recipe(channels_last=False), train_data=train, test_data=test, out=tmp_path / "nchw",
                       quiet=True)
    _close(nhwc.model, nchw.model)

    aug = Augment(scale=1 / 255, mean=[0.5], std=[0.25])
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    plain = aug(x, train=False)
    aug.memory_format = torch.channels_last
    y = aug(x, train=False)  # (4, 1, 16, 16) float32 in NHWC order
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, plain)


def test_cuda_graphs_need_cuda(tmp_path, capsys):
    with pytest.raises(DanluError, match="cuda_graphs: true needs a CUDA device"):
        Speed(CPU, cuda_graphs=True)
    assert main(["train", *sets(*TINY, "run.max_iter=2", "cuda_graphs=true"), "--device", "cpu",
                 "--out", str(tmp_path / "g")]) == 2
    assert "cuda_graphs: true needs a CUDA device" in capsys.readouterr().err
    assert main(["train", *sets(*TINY, "run.max_iter=2", "compile=fast"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "compile=fast: expected false, true or max-autotune" in err and err.count("\n") == 1
    assert not (tmp_path / "g").exists() and not (tmp_path / "f").exists()


def test_device_monitor_is_silent_off_cuda():
    m = DeviceMonitor(CPU)
    batches = [1, 2, 3]
    assert m.batches(batches) is batches and m.read(1.0) == {}


# ---------------------------------------------------------------- on a GPU (scripts/gpu_check.sh)


def _events(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.cuda
@pytest.mark.parametrize("switches", [
    ["precision=bf16", "compile=true"],
    ["precision=fp16", "cuda_graphs=true"],
    ["precision=bf16", "compile=true", "cuda_graphs=true"],
    ["precision=fp32", "channels_last=true", "model.name=resnet18", "data.channels=3"],
])
def test_cuda_switches_train(tmp_path, switches):
    out = tmp_path / "run"
    r = run_cli("train", *sets(*TINY, "run.max_iter=64", *switches), "--device", "cuda", "--out", str(out),
                "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.7, summary  # chance is 0.1
    last = _events(out)[-1]
    assert {"gpu_memory_mb", "gpu_max_memory_mb", "data_wait_share"} <= set(last)
    # the snapshot loads into a plain CPU model (unwrapped before saving)
    r = run_cli("eval", str(out), "--device", "cpu", "--set", "compile=false", "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["acc"] - summary["test_accuracy"]) < 0.02


@pytest.mark.cuda
def test_cuda_graphs_match_eager():
    """make_graphed_callables replays the same forward and backward: one SGD step agrees with eager."""
    from danlu.engine.precision import Precision

    dev = torch.device("cuda")
    torch.manual_seed(0)
    eager = danlu.create_model("resnet18", num_classes=10, in_channels=3).to(dev)
    graphed_src = danlu.create_model("resnet18", num_classes=10, in_channels=3).to(dev)
    graphed_src.load_state_dict(eager.state_dict())
    speed = Speed(dev, cuda_graphs=True, channels_last=False)
    graphed = speed.wrap(speed.layout(graphed_src), (16, 3, 32, 32), Precision("fp32", dev, autocast_cache=False))
    _close(graphed, eager, 0)  # recording the graph left the weights and BatchNorm statistics as they were
    x, y = torch.randn(16, 3, 32, 32, device=dev), torch.randint(0, 10, (16,), device=dev)
    for m in (eager, graphed):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_cuda_one_gpu_nccl_run(tmp_path):
    out = tmp_path / "gpus1"
    r = run_cli("train", *sets(*TINY, "run.max_iter=32", "precision=bf16"), "--gpus", "1", "--out", str(out),
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.8


def test_progress_line_shows_the_gpu_where_there_is_one():
    from danlu.engine.metrics import _train_line as _line

    event = {"kind": "train", "iter": 5, "epoch": 0.1, "lr": 0.01, "loss": 1.0, "acc": 0.5, "images_per_second": 900}
    assert "gpu" not in _line(event, 100)  # CPU: no GPU figures
    gpu = {**event, "gpu_utilization": 84, "gpu_memory_mb": 5120.4, "gpu_max_memory_mb": 6000.0,
           "data_wait_share": 0.012}
    assert _line(gpu, 100).endswith("900 img/s  gpu 84% 5120 MB, data wait 1%")


_FAULTS = """
import json, resource, sys
import torch
from danlu.engine.speed import reuse_freed_memory
on = reuse_freed_memory() if sys.argv[1] == "on" else False
x = torch.zeros(10 << 20, dtype=torch.uint8)
counts = []
for _ in range(32):  # a 40 MiB float batch made from uint8 pixels, normalized and freed, as each training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x.float().mul_(2).sub_(1)
    del y
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"on": on, "faults": counts}))
"""


def _thp_always() -> bool:
    """Transparent huge pages for every mapping: a fresh 40 MiB block then faults in 2 MiB at a time (20 faults)."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages always on: page faults do not count the pages")
def test_freed_batches_are_reused_instead_of_faulted_in_again():
    """reuse_freed_memory: once the heap has grown to the loop's needs (a few steps), a 40 MiB batch takes no page
    faults (without it, each one faults its 10,240 pages in again); a process that chose its allocator (MALLOC_* set)
    is left alone."""
    import os
    import subprocess

    def run(mode, **env):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
        r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    off, on = run("off"), run("on")
    # Reused: once the heap has grown (how many steps that takes varies with the machine's threads and load; 1 to 4
    # seen), batches take nothing to fault in. Without it, every batch faults its pages in again.
    assert on["on"] and sum(f > 500 for f in on["faults"][1:]) <= 8, on
    assert min(off["faults"][1:]) > 5000, off
    assert not run("on", MALLOC_ARENA_MAX="2")["on"]
