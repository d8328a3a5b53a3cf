"""The articles' recipes: each runs a 20-iteration smoke version offline (small stand-in data, same everything else)."""
import math

import pytest

import danlu
from danlu.config import list_recipes, load_recipe

FAST = ["run.max_iter=20", "run.display=10", "run.tensorboard=false", "run.snapshot_every=0"]

# recipe -> the stand-in data of its smoke run: the real sets need downloads or are large, and small images keep 20
# iterations fast on a CPU. The smoke run checks that the recipe's model, optimizer, schedule, augmentation and
# precision run together, not what they reach (docs/RESULTS.md has the full runs).
SMOKE = {
    "lenet_mnist": ["data.name=mnist5k"],
    "minigooglenet_cifar10": ["data.name=synthetic", "data.size=16", "data.channels=3", "data.train_size=80",
                              "data.test_size=16", "data.batch_size=4"],
    "resnet18_food_amp": ["data.name=synthetic", "data.size=16", "data.channels=3", "data.num_classes=3",
                          "data.train_size=80", "data.test_size=16", "data.batch_size=4"],
}
# The face recipes train on a face store; their smoke runs use synthetic identities split by identity, so the test
# metric is verification on held-out identities as in a real run. Inception-ResNet-V1 (23M parameters, at least
# 75 px) in float16 costs minutes for 20 CPU steps, so its smoke run trains a slim MobileFaceNet with the recipe's
# head, optimizer and precision (tests/models and tests/face check Inception-ResNet-V1 itself).
_FACES = ["data.name=synthetic", "data.channels=3", "data.num_classes=8", "data.train_size=64", "data.test_size=32",
          "data.batch_size=4", "data.test_pairs=20", "data.size=32", "model.kwargs={width_mult: 0.25}"]
SMOKE["face_inception_resnet_v1"] = _FACES + ["model.name=mobilefacenet", "model.embedding_dim=128"]
SMOKE["face_arcface_light"] = _FACES
# The precision variants equal the base but for `precision` (tested below), and the base runs ResNet-18 above; their
# smoke runs train a small model in that precision (ResNet-18's 11M parameters cost ~1 s a step on 2 CPU cores, and
# float16 convolutions on a CPU several times more).
SMOKE["resnet18_food_amp_fp16"] = SMOKE["resnet18_food_amp_bf16"] = SMOKE["resnet18_food_amp"] + ["model.name=lenet"]


def test_every_article_recipe_has_a_smoke_run():
    articles = {n for n in list_recipes() if n.startswith(("lenet_mnist", "minigooglenet", "resnet18_food", "face_"))}
    assert articles - {"lenet_mnist5k"} == set(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_twenty_iterations(name, tmp_path):
    r = danlu.train(name, overrides=SMOKE[name] + FAST, out=tmp_path / "run", device="cpu", quiet=True)
    assert r.iterations == 20 and (math.isfinite(r.test_loss) or 0 <= r.summary["test_verification_accuracy"] <= 1)
    want = load_recipe(name).precision  # auto is resolved when the run starts, and saved as what it became
    assert r.summary["recipe"]["precision"] == want if want != "auto" else \
        r.summary["recipe"]["precision"] in ("fp32", "bf16") and "precision auto ->" in r.summary["precision_auto"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


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
    assert (a.model.name, a.model.head, a.model.scale, a.model.margin, a.data.split) == (
        "mobilefacenet", "arcface", 32.0, 0.5, "identities")


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
