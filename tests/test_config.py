import pytest
import yaml

from danlu.config import Recipe, list_recipes, load_recipe
from danlu.errors import DanluError


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.run.max_iter or recipe.run.epochs


def test_overrides_are_typed_and_layered():
    r = load_recipe("lenet_mnist5k", ["optim.lr=0.05", "run.max_iter=100", "augment.flip=true", "data.size=[24, 20]"])
    assert r.optim.lr == 0.05 and isinstance(r.optim.lr, float)
    assert r.run.max_iter == 100 and r.run.epochs is None  # max_iter on the command line replaces the file's epochs
    assert r.augment.flip is True
    assert r.data.size == (24, 20)


def test_augment_none_turns_everything_off():
    r = load_recipe({"augment": "none", "run": {"max_iter": 1}})
    assert (r.augment.shift, r.augment.flip, r.augment.crop) == (0.0, False, 0)


def test_resolved_recipe_round_trips_through_yaml():
    r = load_recipe("lenet_mnist5k", ["optim.lr=0.05"])
    again = load_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r


@pytest.mark.parametrize("override, words", [
    ("optim.lr=-1", ["--set optim.lr=-1", "greater than or equal to 0"]),
    ("optim.lrr=0.1", ["optim.lrr", "did you mean 'lr'"]),
    ("run.max_iter=abc", ["run.max_iter=abc", "integer"]),
    ("schedule.policy=cosin", ["cosin", "did you mean 'cosine'"]),
    ("modl.name=lenet", ["modl", "did you mean 'model'"]),
    ("augment.shift=0.9", ["augment.shift=0.9", "0.5"]),
    ("devices.device=gpu7", ["gpu7", "cuda:N"]),
    ("optim=3", ["optim", "section"]),
    ("optim.lr", ["key=value"]),
    ("model.freeze=5", ["--set model.freeze=5", "expected backbone or a list of parameter-name prefixes"]),
    ("model.unfreeze_at=-1", ["model.unfreeze_at=-1", "greater than or equal to 0"]),
    ("model.pretrained=maybe", ["model.pretrained=maybe", "boolean"]),
    ("optim.head_lr_mult=0", ["optim.head_lr_mult=0", "greater than 0"]),
    ("optim.ema=1", ["optim.ema=1", "less than 1"]),
    ("optim.wd_exclude_norm_bias=perhaps", ["optim.wd_exclude_norm_bias=perhaps", "boolean"]),
    ("run.early_stop=0", ["run.early_stop=0", "greater than 0"]),
    ("run.monitor=los", ["run.monitor=los", "expected one of auto, acc, top5, loss", "did you mean 'loss'"]),
    ("run.keep_best=often", ["run.keep_best=often", "boolean"]),
    ("augment.mixup=-0.2", ["augment.mixup=-0.2", "greater than or equal to 0"]),
    ("augment.cutmix=20", ["augment.cutmix=20", "less than or equal to 10"]),
    ("augment.mix_p=1.5", ["augment.mix_p=1.5", "less than or equal to 1"]),
    ("augment.trivial=sometimes", ["augment.trivial=sometimes", "boolean"]),
    ("model.unfreeze_at=2", ["model.unfreeze_at=2.0: nothing is frozen; expected model.freeze"]),
])
def test_bad_values_name_the_key_the_value_and_what_was_expected(override, words):
    with pytest.raises(DanluError) as e:
        load_recipe("lenet_mnist5k", [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_file_names_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: {name: lenet\n  data: [\n")
    with pytest.raises(DanluError, match=r"broken.yaml line 2"):
        load_recipe(str(p))


def test_both_lengths_in_one_file_is_an_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("run: {max_iter: 10, epochs: 2}\n")
    with pytest.raises(DanluError, match="not both"):
        load_recipe(str(p))


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(DanluError, match="lenet_mnist5k"):
        load_recipe("no_such_recipe.yaml")


def test_min_images_gives_a_small_set_more_epochs_and_leaves_a_large_one_alone(tmp_path):
    import danlu
    from danlu.config import total_iters

    run = load_recipe("lenet_mnist5k", ["run.epochs=2", "run.min_images=640"]).run
    assert total_iters(run, per_epoch=3, global_batch=64) == 10  # 640 images / 64 > 2 epochs of 3
    assert total_iters(run, per_epoch=50, global_batch=64) == 100  # 2 epochs of 50 already see more
    train, test = danlu.load_dataset("synthetic", train_size=128, test_size=32)
    r = danlu.train({"run": {"epochs": 1, "min_images": 640, "tensorboard": False}, "data": {"batch_size": 32},
                     "devices": {"device": "cpu"}}, train_data=train, test_data=test, out=tmp_path / "r", quiet=True)
    assert r.iterations == 20 and r.summary["epochs"] == 5.0  # 128 images: 4 iterations an epoch, 640 / 32 = 20


def test_the_recipe_reference_in_the_docs_is_generated_from_the_config():
    """docs/guide/recipes.md lists every recipe key with its default and meaning, generated from the config model's
    field descriptions by scripts/recipe_reference.py: stale when a key, a default or a description changed."""
    import importlib.util
    from pathlib import Path

    from pydantic import BaseModel

    from danlu.config import Recipe, TargetCfg

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recipe_reference", root / "scripts" / "recipe_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    page = (root / "docs" / "guide" / "recipes.md").read_text()
    assert ref.render(page) == page, "docs/guide/recipes.md is stale: run python scripts/recipe_reference.py"

    def keys(model, prefix):  # every leaf key, and every key has a description
        for name, f in model.model_fields.items():
            sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
            if sub is not None:
                yield from keys(sub, f"{prefix}{name}.")
            else:
                assert f.description, f"{prefix}{name} has no description"
                yield f"{prefix}{name}"

    from danlu.data.datasets import FORMATS

    own = [k for f in FORMATS.values() if f.options for k in keys(f.options, "data.")]  # wds's label_key, ...
    for key in [*keys(Recipe, ""), *keys(TargetCfg, "run.target."), *own]:
        assert f"| `{key}` |" in page, key


def test_runs_saved_before_formats_kept_their_own_keys_still_load():
    """A 0.1.0 run's recipe.yaml (and its snapshots) held the shard keys in every data section: they load where they
    hold what such a run saved, and a shard key with another value beside another format is refused."""
    old = {"data": {"name": "mnist5k", "label_key": "cls", "streams": 8, "decode": "auto", "workers": None,
                    "timeout": 600.0}}
    r = load_recipe(old)
    assert r.data.name == "mnist5k" and not r.data.model_extra and "streams" not in r.to_dict()["data"]
    with pytest.raises(DanluError, match="unknown key 'data.streams'"):
        load_recipe({"data": {"name": "mnist5k", "streams": 4}})
    shards = load_recipe({"data": {"name": "wds", "root": "x", "streams": 4, "timeout": 600.0}})
    assert (shards.data.model_extra["streams"], shards.data.model_extra["timeout"]) == (4, 600.0)
