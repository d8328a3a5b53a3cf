"""Precision: bf16 / fp16 autocast training on the CPU, the fp16 loss scaler (skips, unscale before clipping, state
through snapshots), tf32's device check, and the user-facing errors."""
import json
import typing

import pytest
import torch
import torch.nn.functional as F

import danlu
from danlu.cli import main
from danlu.config import Recipe
from danlu.engine.checkpoint import load_latest
from danlu.engine.precision import PRECISIONS, Precision
from danlu.errors import DanluError
from tests.conftest import TINY, run_cli, sets

CPU = torch.device("cpu")


def _recipe(max_iter=48, snapshot_every=0, batch=32, **top):
    return {"data": {"batch_size": batch}, "augment": "none", "optim": {"name": "adam", "lr": 0.003},
            "run": {"max_iter": max_iter, "test_interval": max_iter, "snapshot_every": snapshot_every,
                    "display": 8, "seed": 3, "tensorboard": False}, "devices": {"device": "cpu"}, **top}


@pytest.fixture(scope="module")
def tiny_sets():
    return danlu.load_dataset("synthetic", size=16, train_size=512, test_size=128)


def test_precisions_match_the_recipe_field():
    assert set(typing.get_args(Recipe.model_fields["precision"].annotation)) == set(PRECISIONS)


def test_bf16_autocast_trains_and_learns(tmp_path, tiny_sets):
    train, test = tiny_sets
    torch.manual_seed(3)  # the initial weights danlu.train builds for run.seed=3 (the fp32 run below)
    model = danlu.create_model("lenet", num_classes=10, in_channels=1, input_size=16)
    seen = []
    model.fc2.register_forward_hook(lambda m, i, out: seen.append(out.dtype))  # the logits' dtype in training
    bf16 = danlu.train(_recipe(precision="bf16"), model=model, train_data=train, test_data=test,
                       out=tmp_path / "bf16", quiet=True)
    fp32 = danlu.train(_recipe(), train_data=train, test_data=test, out=tmp_path / "fp32", quiet=True)
    assert seen and set(seen) == {torch.bfloat16}  # the forward really ran under bf16 autocast (eval too)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32
    assert bf16.test_accuracy > 0.9  # it learns the synthetic classes (10% is chance), as fp32 does
    assert bf16.test_accuracy >= fp32.test_accuracy - 0.05
    events = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["kind"] == "train"]
    assert train_events[-1]["loss"] < train_events[0]["loss"] * 0.5
    assert all(e["skipped_steps"] == 0 for e in train_events)
    assert not any(k.startswith("gpu_") or k == "data_wait_share" for e in events for k in e)  # CUDA only
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["skipped_steps"] == 0


def _toy(precision: Precision):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with precision.autocast():
        loss = F.cross_entropy(model(x), y)
    return model, opt, loss


def test_fp16_scaler_skips_inf_steps_and_counts_them():
    p = Precision("fp16", CPU)
    model, opt, loss = _toy(p)
    p.backward(loss)
    model.weight.grad[0, 0] = float("inf")  # an overflowed gradient
    before = [q.detach().clone() for q in model.parameters()]
    assert p.step(opt, model.parameters()) is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was not taken
    assert p.skipped_steps == 1 and p.scaler.get_scale() == 2.0 ** 15  # 65536 halved

    model.zero_grad()
    with p.autocast():
        loss = F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,)))
    p.backward(loss)
    assert p.step(opt, model.parameters()) is True
    assert p.skipped_steps == 1 and not torch.equal(before[0], model.weight)


class _InfGradientAt(torch.nn.Module):
    """LeNet whose fc2 weight gradient is inf in training step `at` (1-based), as an fp16 overflow would make it."""

    def __init__(self, at: int):
        super().__init__()
        torch.manual_seed(3)
        self.net = danlu.create_model("lenet", num_classes=10, in_channels=1, input_size=16)
        self.at, self.steps = at, 0
        self.net.fc2.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if self.steps == self.at else g)

    def forward(self, x):
        self.steps += self.training  # evaluation does not count
        return self.net(x)


def test_an_fp16_run_skips_an_overflowed_step_and_leaves_the_weights(tmp_path, tiny_sets):
    """Through the whole loop: the step whose gradients overflow is skipped (the weights stay as they were), counted
    in the log and the summary, and halves the loss scale; the steps before and after it train."""
    train, test = tiny_sets
    runs = {}
    for n in (3, 4, 6):  # the skip is step 4: a run ending at 4 must end with the weights of the run ending at 3
        runs[n] = danlu.train(_recipe(n, n, 16, precision="fp16"), model=_InfGradientAt(at=4), train_data=train,
                              test_data=test, out=tmp_path / str(n), quiet=True)
    for (name, a), b in zip(runs[3].model.state_dict().items(), runs[4].model.state_dict().values()):
        assert torch.equal(a, b), name  # the skipped step changed nothing
    assert not torch.equal(runs[4].model.net.fc2.weight, runs[6].model.net.fc2.weight)  # steps 5, 6 were taken
    assert [r.summary["skipped_steps"] for r in runs.values()] == [0, 1, 1]
    logged = [json.loads(x) for x in (tmp_path / "6" / "metrics.jsonl").read_text().splitlines()]
    assert {e["iter"]: e["skipped_steps"] for e in logged if e["kind"] == "train"} == {6: 1}
    scaler = load_latest(tmp_path / "6")[0]["precision"]
    assert scaler["skipped_steps"] == 1 and scaler["scaler"]["scale"] == 2.0 ** 15  # 65536 halved once
    assert scaler["scaler"]["_growth_tracker"] == 2  # the good steps since the skip


def test_fp16_unscales_before_clipping():
    """The clipped update equals clipping the true (unscaled) gradient: SGD with lr 1 moves by -clip(grad)."""
    p = Precision("fp16", CPU)
    model, opt, loss = _toy(p)
    params = list(model.parameters())
    before = [q.detach().clone() for q in params]
    true = torch.autograd.grad(loss, params, retain_graph=True)  # the unscaled gradients
    coef = min(1.0, 0.01 / (torch.cat([g.flatten() for g in true]).norm().item() + 1e-6))
    assert coef < 0.1  # clipping bites, so scaled and unscaled clipping would differ by the scale, 65536x
    p.backward(loss)
    assert p.step(opt, params, clip_grad_norm=0.01)
    for q, q0, g in zip(params, before, true):
        torch.testing.assert_close(q0 - q.detach(), g * coef, rtol=1e-2, atol=1e-7)


def test_scaler_state_round_trips_through_a_snapshot(tmp_path, tiny_sets):
    """A run's fp16 scaler state is in its snapshots; resuming one continues exactly like the uninterrupted run."""
    train, test = tiny_sets  # fp16 kernels are slow on most CPUs: a few small steps
    full = danlu.train(_recipe(12, 6, 16, precision="fp16"), train_data=train, test_data=test,
                       out=tmp_path / "full", quiet=True)
    state, path = load_latest(tmp_path / "full")
    assert path.name == "iter_00000012.pt"
    scaler = state["precision"]["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 12  # 12 good steps since the start
    assert state["precision"]["skipped_steps"] == 0

    danlu.train(_recipe(6, 6, 16, precision="fp16"), train_data=train, test_data=test, out=tmp_path / "half",
                quiet=True)
    assert load_latest(tmp_path / "half")[0]["precision"]["scaler"]["_growth_tracker"] == 6
    resumed = danlu.train(resume=tmp_path / "half", overrides=["run.max_iter=12"], train_data=train,
                          test_data=test, quiet=True)
    assert load_latest(tmp_path / "half")[0]["precision"]["scaler"]["_growth_tracker"] == 12
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_precision_state_dict_round_trip_keeps_scale_and_skips():
    p = Precision("fp16", CPU)
    model, opt, loss = _toy(p)
    p.backward(loss)
    model.bias.grad[0] = float("nan")
    p.step(opt, model.parameters())
    q = Precision("fp16", CPU)
    q.load_state_dict(p.state_dict())
    assert q.scaler.get_scale() == p.scaler.get_scale() == 32768.0
    assert q.skipped_steps == 1 and q.state_dict() == p.state_dict()
    r = Precision("bf16", CPU)  # resuming an fp16 run in bf16: no scaler, the count carries on
    r.load_state_dict(p.state_dict())
    assert r.scaler is None and r.skipped_steps == 1


def test_tf32_needs_cuda():
    with pytest.raises(DanluError, match="tf32 needs a CUDA device.*cpu"):
        Precision("tf32", CPU)
    assert Precision.for_inference("tf32", CPU).name == "fp32"  # evaluating a GPU run on the CPU
    with pytest.raises(DanluError, match="'fp8' is not a format; expected one of fp32, tf32, fp16, bf16, fp64"):
        Precision("fp8", CPU)


def test_bad_precision_in_a_recipe_exits_2(tmp_path, capsys):
    r = run_cli("train", *sets(*TINY, "run.max_iter=2", "precision=fp8"), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "precision=fp8" in r.stderr and "'fp32', 'tf32', 'fp16', 'bf16' or 'fp64'" in r.stderr
    assert main(["train", *sets(*TINY, "run.max_iter=2", "precision=tf32"), "--device", "cpu",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "tf32 needs a CUDA device" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()  # refused before anything is written


@pytest.mark.cuda
def test_cuda_fp16_and_bf16_train_and_log_the_gpu(tmp_path):
    for precision in ("fp16", "bf16", "tf32"):
        out = tmp_path / precision
        r = run_cli("train", *sets(*TINY, "run.max_iter=60", f"precision={precision}"), "--device", "cuda",
                    "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        summary = json.loads((out / "summary.json").read_text())
        event = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in x][-1]
        assert summary["test_accuracy"] > 0.9 and summary["skipped_steps"] == event["skipped_steps"]
        if precision != "fp16":
            assert summary["skipped_steps"] == 0  # no loss scaler: nothing is ever skipped
        else:  # the scaler may skip a few steps while the scale settles, never most of them
            assert summary["skipped_steps"] < 30
        assert event["gpu_memory_mb"] > 0 and event["gpu_max_memory_mb"] >= event["gpu_memory_mb"]
        assert 0 <= event["data_wait_share"] <= 1


@pytest.mark.cuda
def test_cuda_fp16_scaler_skips_on_overflow():
    dev = torch.device("cuda")
    p = Precision("fp16", dev)
    model = torch.nn.Linear(4, 3).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with p.autocast():
        out = model(torch.randn(8, 4, device=dev))
        assert out.dtype == torch.float16
        loss = out.float().pow(2).mean() * 1e30  # overflows once scaled by 65536
    p.backward(loss)
    assert p.step(opt, model.parameters()) is False and p.skipped_steps == 1
    Precision("tf32", dev)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    Precision("fp32", dev)  # fp32 means fp32: no TF32 for matmuls, nor for cuDNN's convolutions (its default)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
