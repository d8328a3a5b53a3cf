"""Fine-tuning's parts: parameter groups (no decay on biases and norms, the head at head_lr_mult), freezing and
unfreezing, the weights' average (optim.ema), the best test event (run.keep_best) and early stopping, and a resumed
run with all of them equal to the uninterrupted one."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import danlu
from danlu.config import load_recipe
from danlu.data.loader import DeviceLoader
from danlu.engine import checkpoint
from danlu.engine.build import _unfreeze_iter
from danlu.engine.distributed import Dist
from danlu.engine.metrics import Best
from danlu.engine.speed import Speed
from danlu.errors import DanluError
from danlu.models import classifier_name, create_model

# LeNet on synthetic digits: 8 iterations an epoch
SMALL = ["model.name=lenet", "data.name=synthetic", "data.train_size=256", "data.test_size=64", "data.batch_size=32",
         "run.tensorboard=false", "run.display=8", "augment.flip=true", "augment.shift=0.1"]


def _train(out, *extra, **kw):
    return danlu.train("lenet_mnist5k", overrides=SMALL + list(extra), out=out, device="cpu", quiet=True, **kw)


@pytest.mark.parametrize("name, classes, want", [("tv:resnet18", 3, "fc"), ("tv:squeezenet1_0", 3, "classifier.1"),
                                                 ("lenet", 10, "fc2"), ("mobilefacenet", 5, "head")])
def test_the_classifier_is_found(name, classes, want):
    kw = {"width_mult": 0.25} if name == "mobilefacenet" else {}
    assert classifier_name(create_model(name, num_classes=classes, in_channels=3, **kw), classes) == want


def test_danlu_equals_a_plain_loop_with_the_same_groups(tmp_path):
    """Weight decay only on weights, the head (fc2) at 10x, a step schedule applied to each group's multiplier."""
    train, test = danlu.load_dataset("synthetic", train_size=256, test_size=64)
    torch.manual_seed(0)
    model = create_model("lenet", num_classes=10, in_channels=1)
    plain = copy.deepcopy(model)
    recipe = {"data": {"batch_size": 32}, "augment": "none",
              "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.01, "head_lr_mult": 10},
              "schedule": {"policy": "step", "stepsize": 5, "gamma": 0.5},
              "run": {"max_iter": 12, "test_interval": 1000, "snapshot_every": 0, "seed": 4, "tensorboard": False}}
    result = danlu.train(recipe, model=model, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)

    named = dict(plain.named_parameters())
    decay = [p for n, p in named.items() if p.ndim > 1 and not n.startswith("fc2.")]
    flat = [p for n, p in named.items() if p.ndim <= 1 and not n.startswith("fc2.")]
    groups = [{"params": decay, "weight_decay": 0.01, "m": 1}, {"params": flat, "weight_decay": 0.0, "m": 1},
              {"params": [named["fc2.weight"]], "weight_decay": 0.01, "m": 10},
              {"params": [named["fc2.bias"]], "weight_decay": 0.0, "m": 10}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    loader = DeviceLoader(train.images, train.labels, 32, device="cpu", seed=4)
    for it, (x, y) in zip(range(12), [b for e in range(2) for b in loader.epoch(e)]):
        for g in opt.param_groups:
            g["lr"] = 0.01 * 0.5 ** (it // 5) * g["m"]
        loss = F.cross_entropy(plain(x.float().mul_(1 / 255)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for (name, a), b in zip(result.model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_freeze_backbone_then_unfreeze_at_an_epoch(tmp_path):
    r = _train(tmp_path / "run", "model.freeze=backbone", "model.unfreeze_at=1", "run.max_iter=16",
               "run.snapshot_every=8", "run.test_interval=8")
    torch.manual_seed(0)  # the run's initial weights (build seeds with run.seed before building the model)
    start = create_model("lenet", num_classes=10, in_channels=1, input_size=28).state_dict()
    at8 = checkpoint.load_snapshot(tmp_path / "run" / "snapshots" / "iter_00000008.pt")["model"]
    end = r.model.state_dict()
    for k in start:
        if k.startswith("fc2."):  # the head trains from the start
            assert not torch.equal(at8[k], start[k]), k
        else:  # the backbone waits for epoch 1, then trains
            assert torch.equal(at8[k], start[k]) and not torch.equal(end[k], at8[k]), k


def test_frozen_prefixes_stay_as_they_were(tmp_path):
    torch.manual_seed(0)
    start = create_model("lenet", num_classes=10, in_channels=1, input_size=28).state_dict()
    end = _train(tmp_path / "run", "model.freeze=[conv1, conv2.bias]", "run.max_iter=8").model.state_dict()
    for k in start:
        assert torch.equal(start[k], end[k]) == (k.startswith("conv1.") or k == "conv2.bias"), k


def test_unfreezing_is_refused_with_several_processes_and_cuda_graphs():
    recipe = load_recipe(overrides=["model.freeze=backbone", "model.unfreeze_at=2"])
    assert _unfreeze_iter(recipe, 10, Dist(), Speed("cpu")) == 20
    with pytest.raises(DanluError, match=r"^model.unfreeze_at=2.0 with 2 processes: DDP .*; expected one process"):
        _unfreeze_iter(recipe, 10, Dist(world=2), Speed("cpu"))
    speed = Speed("cpu")
    speed.cuda_graphs = True  # as on a GPU with cuda_graphs: true
    with pytest.raises(DanluError, match="cuda_graphs"):
        _unfreeze_iter(recipe, 10, Dist(), speed)


def test_best_and_patience():
    best = Best("loss", patience=2)
    seen = [best.update(i, {"loss": v}) for i, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.2])]
    assert seen == [True, True, False, False, True, False, False]
    assert (best.value, best.iteration, best.since, best.exhausted) == (1.0, 4, 2, True)
    acc = Best("acc")
    assert acc.update(0, {"acc": 0.5}) and not acc.update(1, {"acc": 0.5}) and not acc.exhausted


def test_ema_keep_best_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    r = _train(out, "optim.ema=0.8", "run.keep_best=true", "run.max_iter=64", "run.test_interval=8",
               "run.snapshot_every=8", "run.keep_snapshots=10", "optim.name=adam", "optim.lr=0.02",
               "schedule.policy=fixed")
    tests = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["kind"] == "test"]
    assert max(e["acc"] for e in tests) > tests[-1]["acc"]  # the best event is not the last (else nothing is shown)
    assert all("ema_acc" in e and "ema_loss" in e for e in tests)
    assert r.summary["test_ema_acc"] == tests[-1]["ema_acc"]
    first_best = max(tests, key=lambda e: (e["acc"], -e["iter"]))  # the first event with the highest accuracy
    best = json.loads((out / "best.json").read_text())
    assert (best["iteration"], best["metric"], best["value"]) == (first_best["iter"], "acc", first_best["acc"])
    snap = checkpoint.load_snapshot(out / "snapshots" / f"iter_{best['iteration']:08d}.pt")
    kept = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(kept[k], snap["model"][k]) for k in snap["model"])
    ema = load_file(str(out / "model_ema.safetensors"))
    assert ema.keys() == r.model.state_dict().keys()
    assert not torch.equal(ema["fc2.weight"], r.model.state_dict()["fc2.weight"])
    assert r.summary["best"] == {"metric": "acc", "value": best["value"], "iteration": best["iteration"]}


def test_early_stop_after_patience_test_events_without_better(tmp_path):
    r = _train(tmp_path / "run", "optim.lr=1e-12", "run.early_stop=2", "run.max_iter=80", "run.test_interval=8")
    # the accuracy cannot move at this LR: the first test event (iteration 8) stays the best, two more end the run
    assert r.iterations == 24 and r.summary["early_stopped"] is True
    assert "2 test events without a better acc" in r.summary["early_stop"]
    assert r.summary["best"]["iteration"] == 8


def test_resume_with_freezing_ema_and_best_equals_the_uninterrupted_run(tmp_path):
    run = ["model.freeze=backbone", "model.unfreeze_at=2", "optim.ema=0.9", "optim.head_lr_mult=5",
           "run.keep_best=true", "run.early_stop=50", "run.max_iter=40", "run.snapshot_every=12",
           "run.test_interval=8", "run.keep_snapshots=10", "optim.lr=0.01", "optim.clip_grad_norm=5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(full, *run)
    shutil.copytree(full, cut)
    for p in (cut / "snapshots").glob("iter_*.pt"):
        if int(p.stem.split("_")[1]) > 12:  # before unfreezing (iteration 16), mid-epoch
            p.unlink()
    for name in ("model.safetensors", "model_ema.safetensors", "summary.json", "best.json", "best.safetensors"):
        (cut / name).unlink()
    r = danlu.train(resume=cut, quiet=True, device="cpu")
    assert r.iterations == 40
    for name in ("model.safetensors", "model_ema.safetensors", "best.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((full / "best.json").read_text()) == json.loads((cut / "best.json").read_text())
    assert (full / "metrics.jsonl").read_text().count("ema_acc") == (cut / "metrics.jsonl").read_text().count("ema_acc")


def test_the_runs_average_is_the_recursion_over_its_steps(tmp_path):
    d, out = 0.7, tmp_path / "run"
    _train(out, f"optim.ema={d}", "run.max_iter=6", "run.snapshot_every=1", "run.keep_snapshots=10")
    torch.manual_seed(0)
    want = create_model("lenet", num_classes=10, in_channels=1, input_size=28).state_dict()  # the initial weights
    for it in range(1, 7):
        w = checkpoint.load_snapshot(out / "snapshots" / f"iter_{it:08d}.pt")["model"]
        want = {k: d * want[k] + (1 - d) * w[k] for k in want}
    got = load_file(str(out / "model_ema.safetensors"))
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want)


def test_resumed_early_stop_counts_the_events_before_the_snapshot(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run = ["optim.lr=1e-12", "run.early_stop=3", "run.max_iter=80", "run.test_interval=8", "run.snapshot_every=8",
           "run.keep_snapshots=20"]
    assert _train(full, *run).iterations == 32  # best at 8; 16, 24 and 32 are no better
    shutil.copytree(full, cut)
    for p in (cut / "snapshots").glob("iter_*.pt"):
        if int(p.stem.split("_")[1]) > 16:
            p.unlink()
    r = danlu.train(resume=cut, quiet=True, device="cpu")
    assert r.iterations == 32 and r.summary["early_stopped"] and r.summary["best"]["iteration"] == 8


def test_runs_from_before_the_groups_resume_as_they_trained(tmp_path):
    """A snapshot whose recipe has no optim.wd_exclude_norm_bias decayed every parameter in one group."""
    out = tmp_path / "run"
    _train(out, "optim.wd_exclude_norm_bias=false", "run.max_iter=16", "run.snapshot_every=8")
    (out / "snapshots" / "iter_00000016.pt").unlink()
    snap = checkpoint.load_snapshot(out / "snapshots" / "iter_00000008.pt")
    del snap["recipe"]["optim"]["wd_exclude_norm_bias"]
    checkpoint.save_snapshot(out / "snapshots", {k: v for k, v in snap.items() if k != "format"}, 8, keep=10)
    assert danlu.train(resume=out, quiet=True, device="cpu").iterations == 16
    with pytest.raises(DanluError, match=r"^--resume .*: its optimizer state does not fit this recipe's parameter "
                                         r"groups \(.*\); expected the run's own optim.wd_exclude_norm_bias"):
        danlu.train(resume=out, overrides=["optim.head_lr_mult=10", "run.max_iter=24"], quiet=True, device="cpu")
