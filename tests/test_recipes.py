"""The articles' recipes: each runs a short smoke version offline with its own model (small stand-in data, same
everything else), and a regression run of the real CLI whose logged losses are pinned."""
import json
import math

import pytest
import torch

import danlu
from conftest import TINY, run_cli, sets
from danlu.config import list_recipes, load_recipe

FAST = ["run.display=1", "run.tensorboard=false", "run.snapshot_every=0"]

# recipe -> the stand-in data of its smoke run: the real sets need downloads or are large, and small images keep the
# runs fast on a CPU. Every smoke run trains the recipe's own model at the recipe's precision: it checks that the
# model, optimizer, schedule, augmentation and precision run together, not what they reach (docs/evidence/results.md has the
# full runs).
_SYNTH = ["data.name=synthetic", "data.channels=3", "data.test_size=16"]
SMOKE = {
    "lenet_mnist": ["data.name=mnist5k", "run.max_iter=20"],
    "minigooglenet_cifar10": _SYNTH + ["data.size=16", "data.train_size=80", "data.batch_size=4", "run.max_iter=20"],
    "resnet18_food_amp": _SYNTH + ["data.size=16", "data.num_classes=3", "data.train_size=80", "data.batch_size=4",
                                   "run.max_iter=20"],
    # 32 px, not 8: at 8 px the ImageNet stem leaves layer3 and layer4 1x1 maps whose gradients are rounding noise
    # about 0; bf16 kernels round them to either sign depending on buffer alignment (it changed with
    # PYTHONHASHSEED), Adam turns each sign into a full +-lr step, and some processes diverged by iteration 7
    "resnet18_food_amp_bf16": _SYNTH + ["data.size=32", "data.num_classes=3", "data.train_size=48",
                                        "data.batch_size=4", "run.max_iter=8"],
    # fp16 on a CPU is slower still (~0.5 s a step at 8 px), and the loss scaler, starting at 2^16, skips the first
    # 6-7 steps (inf gradients) while the scale halves: 9 iterations take at least one real optimizer step
    "resnet18_food_amp_fp16": _SYNTH + ["data.size=8", "data.num_classes=3", "data.train_size=48",
                                        "data.batch_size=4", "run.max_iter=9"],
}
# The face recipes train on a face store; their smoke runs use synthetic identities split by identity, so the test
# metric is verification on held-out identities as in a real run.
_FACES = ["data.name=synthetic", "data.channels=3", "data.num_classes=8", "data.test_pairs=10"]
SMOKE["face_arcface_light"] = _FACES + ["data.train_size=64", "data.test_size=32", "data.batch_size=4",
                                        "data.size=32", "model.kwargs={width_mult: 0.25}", "run.max_iter=20"]
# Inception-ResNet-V1 (23M parameters) takes 75 px at least, and float16 convolutions on a CPU are slow: ~1.3 s a step
# at batch 2 on one thread. The loss scaler skips the first 5 steps (scale 2^16 -> 2^11), so 7 iterations, not 20:
# two real steps.
SMOKE["face_inception_resnet_v1"] = _FACES + ["data.train_size=32", "data.test_size=8", "data.batch_size=2",
                                              "data.size=75", "run.max_iter=7"]
# dlib's network from fresh weights (the recipe's model.init is the user's imported run), at its 103 px minimum
SMOKE["face_finetune"] = _FACES + ["data.train_size=32", "data.test_size=16", "data.batch_size=4", "data.size=104",
                                   "run.max_iter=6"]


@pytest.fixture
def one_thread():
    """One torch thread. With two threads on 2 cores shared with other processes, every parallel region waits for
    a thread the scheduler has put aside: measured with two busy processes beside it, a MobileFaceNet fp16 step took
    0.15 to 13 s on two threads and 0.04 to 0.11 s on one (0.03 s either way on idle cores), which is what made the
    face smoke runs take minutes under load. Small models lose nothing on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["kind"] == kind]


def test_every_article_recipe_has_a_smoke_run():
    articles = {n for n in list_recipes() if n.startswith(("lenet_mnist", "minigooglenet", "resnet18_food", "face_"))}
    assert articles - {"lenet_mnist5k"} == set(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_run_of_the_recipes_own_model(name, tmp_path, one_thread):
    recipe = load_recipe(name)
    iters = int(next(o for o in SMOKE[name] if o.startswith("run.max_iter=")).split("=")[1])
    r = danlu.train(name, overrides=SMOKE[name] + FAST, out=tmp_path / "run", device="cpu", quiet=True)
    s = r.summary
    assert r.iterations == iters
    assert s["recipe"]["model"] == {**s["recipe"]["model"], "name": recipe.model.name}  # the recipe's own model
    train = _events(tmp_path / "run", "train")
    assert [e["iter"] for e in train] == list(range(1, iters + 1))  # run.display=1: every step logged
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in train), [e["loss"] for e in train]
    assert s["skipped_steps"] < iters  # at least one optimizer step was taken (fp16: the loss scaler skips some)
    test = _events(tmp_path / "run", "test")[-1]  # the last evaluation, at the end
    assert test["iter"] == iters
    if recipe.model.head is not None:  # a face model: verification on pairs of held-out identities
        assert 0 <= s["test_verification_accuracy"] <= 1 and test["verification_acc"] == pytest.approx(
            s["test_verification_accuracy"], abs=1e-6)
    else:
        assert math.isfinite(r.test_loss) and r.test_loss > 0 and 0 <= r.test_accuracy <= 1
        assert (test["loss"], test["acc"]) == (pytest.approx(r.test_loss, abs=1e-6),
                                               pytest.approx(r.test_accuracy, abs=1e-6))
    want = recipe.precision  # auto is resolved when the run starts, and saved as what it became
    assert s["recipe"]["precision"] == want if want != "auto" else \
        s["recipe"]["precision"] == "fp32" and "precision auto -> fp32" in s["precision_auto"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


# The logged training losses of `python -m danlu train` on the tiny seeded recipe (LeNet, 512 synthetic digits, batch
# 32, seed 0) in float64, one display window of 5 steps each. Recorded on 2026-12-01 with torch 2.14.1 on a 2-core
# AMD EPYC CPU. float64 makes the run's rounding error ~1e-12, far below the 6 decimals metrics.jsonl keeps, so the
# values hold on any CPU (different kernels, thread counts); the tolerance of 2e-6 is one unit of the last logged
# decimal, for a value that sits on a rounding boundary, plus margin. A change here is a change in what danlu
# computes (initialization, data order, augmentation, loss, optimizer, schedule): if it is meant, record the values
# again and say why in the commit.
REGRESSION_LOSSES = {5: 2.405981, 10: 2.299113, 15: 2.332231, 20: 2.202702}


def test_the_cli_logs_the_recorded_losses(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
                *sets(*TINY, "run.max_iter=20", "run.display=5", "run.seed=0", "precision=fp64",
                      "run.snapshot_every=0"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    train = _events(tmp_path / "run", "train")
    assert {e["iter"]: e["loss"] for e in train} == pytest.approx(REGRESSION_LOSSES, abs=2e-6, rel=0)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"]["precision"] == "fp64"


def test_the_articles_values():
    m = load_recipe("minigooglenet_cifar10")
    assert (m.model.name, m.data.name, m.run.epochs, m.data.batch_size) == ("minigooglenet", "cifar10", 70, 64)
    assert (m.optim.name, m.optim.lr, m.optim.momentum) == ("sgd", 0.005, 0.9)
    assert (m.schedule.policy, m.schedule.power) == ("poly_decay", 1.0)
    assert (m.augment.shift, m.augment.flip, m.data.normalize) == (0.1, True, "pixel")
    f = load_recipe("resnet18_food_amp")
    assert (f.model.name, f.data.name, f.data.size, f.data.batch_size, f.run.epochs) == ("tv:resnet18", "folder", 224,
                                                                                       16, 5)
    assert (f.optim.name, f.optim.lr, f.precision) == ("adam", 0.001, "fp32")
    le = load_recipe("lenet_mnist")
    assert (le.run.max_iter, le.data.name, le.data.batch_size, le.data.scale) == (10000, "mnist", 64, 1 / 256)


@pytest.mark.parametrize("variant, precision", [("resnet18_food_amp_fp16", "fp16"), ("resnet18_food_amp_bf16", "bf16")])
def test_precision_variants_differ_only_in_precision(variant, precision):
    base, other = load_recipe("resnet18_food_amp"), load_recipe(variant)
    assert other.precision == precision
    assert other.model_copy(update={"precision": base.precision}) == base


def test_the_face_recipes():
    f = load_recipe("face_inception_resnet_v1")  # the article's model: softmax head, 160 px, mixed precision
    assert (f.model.name, f.model.head, f.model.embedding_dim, f.data.split, f.precision) == (
        "inception_resnet_v1", "softmax", 512, "identities", "fp16")
    a = load_recipe("face_arcface_light")
    assert (a.model.name, a.model.head, a.model.scale, a.model.margin, a.model.margin_warmup, a.data.split) == (
        "mobilefacenet", "arcface", 32.0, 0.3, 5.0, "identities")
    assert (a.run.epochs, a.run.min_images) == (20, 40000)  # LFW-sized sets 20 epochs, small ones 40,000 images


def test_the_finetune_recipe():
    f = load_recipe("resnet18_finetune")
    assert (f.model.name, f.model.pretrained, f.optim.head_lr_mult, f.optim.wd_exclude_norm_bias) == (
        "tv:resnet18", True, 10, True)
    assert (f.data.name, f.data.size, f.data.mean, f.data.std) == ("folder", 224, [0.485, 0.456, 0.406],
                                                                 [0.229, 0.224, 0.225])
    assert (f.augment.resized_crop, f.augment.flip, f.run.epochs, f.run.keep_best) == ((0.08, 1.0), True, 5, True)


def test_finetune_smoke_run_on_a_tiny_folder_with_weights_the_test_made(tmp_path, monkeypatch):
    """The recipe as shipped on a tiny photo folder, with the ImageNet weights replaced by a file made here."""
    import hashlib
    import io

    import torch

    from danlu.models import create_model, pretrained
    from tests.data.datafiles import class_folder

    torch.manual_seed(7)
    ref = create_model("tv:resnet18", num_classes=1000).state_dict()
    buf = io.BytesIO()
    torch.save(ref, buf)
    name = f"resnet18-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / name).write_bytes(buf.getvalue())
    monkeypatch.setattr(pretrained, "published", lambda model: pretrained.Published(
        model, "http://127.0.0.1:9/" + name, name, name[9:17], tmp_path / "torch"))  # nothing listens on port 9
    photos = class_folder(tmp_path / "photos", classes=("ants", "bees"), per_class=6, size=(40, 30))
    r = danlu.train("resnet18_finetune", overrides=[f"data.root={photos}", "data.size=32", "data.batch_size=4",
                                                    "data.val_fraction=0.34", "run.max_iter=3", "run.display=1",
                                                    "run.tensorboard=false", "precision=fp32"],
                    out=tmp_path / "run", device="cpu", quiet=True)
    init = r.summary["init"]
    assert (init["key"], init["loaded"], init["of"]) == ("model.pretrained", len(ref) - 2, len(ref))
    assert [f.split()[0] for f in init["fresh"]] == ["fc.weight", "fc.bias"]
    assert r.iterations == 3 and math.isfinite(r.test_loss)
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "confusion.png").is_file()
