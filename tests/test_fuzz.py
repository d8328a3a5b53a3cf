"""Property-based tests (hypothesis) for what users type: any recipe file, any --set item, any solver.prototxt either
becomes a valid recipe or fails with a one-line DanluError (which the CLI turns into exit code 2), never another
exception. Bounded (max_examples, no database) so the whole file runs in seconds."""
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydantic import BaseModel

from conftest import run_cli
from danlu.caffe import read_solver  # imported plainly: an import regression is a failure, not a skip
from danlu.config import Recipe, build_recipe, load_recipe
from danlu.engine.precision import PRECISIONS
from danlu.engine.schedule import POLICIES
from danlu.errors import DanluError

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# text a user could type or a file could hold (surrogates cannot be written to a file at all)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def _keys(model=Recipe, prefix=""):
    """Every recipe key as a dotted path: 'optim.lr', 'run.max_iter', ..."""
    out = []
    for name, f in model.model_fields.items():
        sub = f.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _keys(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


KEYS = _keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
SCALARS = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() |
           st.sampled_from(["none", "sgd", "adam", "cosine", "inv", "cpu", "auto", "lenet", "synthetic", "", "1e-3",
                            "[32, 32]", "nan"]) | TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=3), max_leaves=8)
# recipe-shaped trees: mostly real sections and keys, sometimes not, with values of any type
TREES = st.dictionaries(
    st.sampled_from(SECTIONS) | TEXT,
    st.dictionaries(st.sampled_from([k.split(".", 1)[-1] for k in KEYS]) | TEXT, VALUES, max_size=4) | SCALARS,
    max_size=4)


def _valid_or_one_line(make):
    """Call make(); it returns a valid Recipe or raises a one-line DanluError, nothing else."""
    try:
        recipe = make()
    except DanluError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return None
    assert isinstance(recipe, Recipe)
    again = build_recipe(yaml.safe_load(recipe.to_yaml()))  # what danlu saves as recipe.yaml loads back the same
    assert again == recipe
    for v in _leaves(recipe.to_dict()):
        assert not (isinstance(v, float) and not math.isfinite(v)), recipe
    return recipe


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(text=TEXT)
def test_any_recipe_text_parses_or_fails_with_one_line(folder, text):
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    _valid_or_one_line(lambda: load_recipe(str(path)))


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_recipe_bytes_parse_or_fail_with_one_line(folder, data):
    path = folder / "recipe.yaml"
    path.write_bytes(data)
    _valid_or_one_line(lambda: load_recipe(str(path)))


@FUZZ
@given(tree=TREES)
def test_any_recipe_shaped_yaml_parses_or_fails_with_one_line(folder, tree):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    _valid_or_one_line(lambda: load_recipe(str(path)))
    _valid_or_one_line(lambda: load_recipe(tree))  # the Python API takes the same tree as a dict


@FUZZ
@given(items=st.lists(TEXT, max_size=3))
def test_any_set_item_parses_or_fails_with_one_line(items):
    _valid_or_one_line(lambda: load_recipe("lenet_mnist5k", items))


@FUZZ
@given(key=st.sampled_from(KEYS) | TEXT.map(lambda t: "run." + t), value=TEXT | SCALARS.map(str))
def test_any_value_for_a_recipe_key_parses_or_fails_with_one_line(key, value):
    _valid_or_one_line(lambda: load_recipe("lenet_mnist5k", [f"{key}={value}"]))


# ---------------------------------------------------------------- valid inputs are accepted
# The properties above hold even if every input were rejected; these generate recipes known to be valid and require
# that they load, with the values that were written.

POSITIVE = st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False)
VALID_SECTIONS = {
    "model": st.fixed_dictionaries({"name": st.sampled_from(["lenet", "resnet18", "minigooglenet"])}),
    "data": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["synthetic", "mnist5k", "cifar10"]),
                                                "batch_size": st.integers(1, 4096),
                                                "val_fraction": st.floats(0.01, 0.99),
                                                "normalize": st.sampled_from(["none", "channel", "pixel"])}),
    "augment": st.fixed_dictionaries({}, optional={"flip": st.booleans(), "crop": st.integers(0, 8),
                                                   "shift": st.floats(0.0, 0.5), "rotate": st.floats(0.0, 180.0)}),
    "optim": st.fixed_dictionaries({"lr": POSITIVE},
                                   optional={"name": st.sampled_from(["sgd", "adam", "adamw"]),
                                             "momentum": st.floats(0.0, 0.99), "weight_decay": st.floats(0.0, 0.1),
                                             "accumulate": st.integers(1, 16), "nesterov": st.booleans()}),
    "schedule": st.fixed_dictionaries({"policy": st.sampled_from(POLICIES)},
                                      optional={"gamma": st.floats(0.0, 1.0), "stepsize": st.integers(0, 10**6),
                                                "warmup": st.integers(0, 1000)}),
    "run": st.one_of(st.fixed_dictionaries({"max_iter": st.integers(1, 10**9)}),
                     st.fixed_dictionaries({"epochs": st.floats(0.01, 1000.0)})).flatmap(
        lambda d: st.fixed_dictionaries({k: st.just(v) for k, v in d.items()},
                                        optional={"display": st.integers(1, 1000), "seed": st.integers(0, 2**31),
                                                  "snapshot_every": st.integers(0, 10**6)})),
    "precision": st.sampled_from([p for p in PRECISIONS]),
}
VALID_TREES = st.fixed_dictionaries({}, optional=VALID_SECTIONS)


def _flat(tree, prefix=""):
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}"""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _value(recipe, key):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


@FUZZ
@given(tree=VALID_TREES)
def test_any_valid_recipe_loads_with_its_values(folder, tree):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    for recipe in (_valid_or_one_line(lambda: load_recipe(str(path))), _valid_or_one_line(lambda: load_recipe(tree))):
        assert recipe is not None, tree  # rejected a valid recipe
        for key, value in _flat(tree).items():
            assert _value(recipe, key) == value, key


@FUZZ
@given(tree=VALID_TREES)
def test_any_valid_set_items_load_with_their_values(tree):
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in _flat(tree).items()]
    recipe = _valid_or_one_line(lambda: load_recipe("lenet_mnist5k", items))
    assert recipe is not None, items  # rejected valid --set items
    for key, value in _flat(tree).items():
        assert _value(recipe, key) == value, key  # json.dumps writes a float's shortest repr: read back exactly


# ---------------------------------------------------------------- Caffe solver.prototxt

SOLVER_FIELDS = ["net", "base_lr", "momentum", "weight_decay", "lr_policy", "gamma", "power", "stepsize",
                 "stepvalue", "max_iter", "test_iter", "test_interval", "display", "snapshot", "snapshot_prefix",
                 "solver_mode", "device_id", "type", "solver_type", "iter_size", "random_seed", "clip_gradients",
                 "momentum2", "delta", "unknown_field"]
SOLVER_VALUES = (st.integers(-10**6, 10**12).map(str) | st.floats().map(repr) |
                 st.sampled_from(['"inv"', '"step"', '"multistep"', '"fixed"', "GPU", "CPU", '"SGD"', '"Adam"',
                                  '"examples/mnist/lenet_train_test.prototxt"', '"x.prototxt"', "Nesterov", '"a\\x"',
                                  '"\\u12"', "{", "}", "{ }", ""]) | TEXT)
SOLVER_LINES = st.lists(st.tuples(st.sampled_from(SOLVER_FIELDS) | TEXT, st.sampled_from([": ", " ", ":"]),
                                  SOLVER_VALUES).map("".join) |
                        st.sampled_from(["# danlu: model=lenet data=synthetic", "# danlu: run.max_iter=5",
                                         "# danlu: model=", "# danlu: x", "}", "{"]), max_size=8).map("\n".join)


@FUZZ
@given(text=TEXT | SOLVER_LINES)
@pytest.mark.filterwarnings("ignore:.*solver field")  # unknown fields are named in a warning, then ignored
def test_any_solver_text_parses_or_fails_with_one_line(folder, text):
    path = folder / "solver.prototxt"
    path.write_text(text, encoding="utf-8")
    _valid_or_one_line(lambda: load_recipe(str(path)))


CAFFE_POLICIES = ["fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"]
# a valid Caffe solver for Caffe's own LeNet net: field -> (strategy, how it is written, recipe key)
VALID_SOLVER_FIELDS = {
    "base_lr": (POSITIVE, repr, "optim.lr"),
    "momentum": (st.floats(0.0, 0.99), repr, "optim.momentum"),
    "weight_decay": (st.floats(0.0, 0.1), repr, "optim.weight_decay"),
    "lr_policy": (st.sampled_from(CAFFE_POLICIES), lambda v: f'"{v}"', "schedule.policy"),
    "gamma": (st.floats(0.0, 1.0), repr, "schedule.gamma"),
    "power": (st.floats(0.0, 2.0), repr, "schedule.power"),
    "stepsize": (st.integers(0, 10**6), str, "schedule.stepsize"),
    "test_iter": (st.integers(1, 10**4), str, "run.test_iter"),
    "test_interval": (st.integers(1, 10**6), str, "run.test_interval"),
    "display": (st.integers(1, 10**4), str, "run.display"),
    "snapshot": (st.integers(0, 10**6), str, "run.snapshot_every"),
    "random_seed": (st.integers(0, 2**31), str, "run.seed"),
    "iter_size": (st.integers(1, 8), str, "optim.accumulate"),
    "solver_mode": (st.sampled_from(["CPU", "GPU"]), str, "devices.device"),
}
VALID_SOLVERS = st.tuples(st.integers(1, 10**9), st.fixed_dictionaries(
    {}, optional={k: strategy for k, (strategy, _, _) in VALID_SOLVER_FIELDS.items()}))


@FUZZ
@given(solver=VALID_SOLVERS)
def test_any_valid_solver_loads_with_its_values(folder, solver):
    max_iter, fields = solver
    lines = ['net: "examples/mnist/lenet_train_test.prototxt"', f"max_iter: {max_iter}"]
    lines += [f"{k}: {VALID_SOLVER_FIELDS[k][1](v)}" for k, v in fields.items()]
    path = folder / "solver.prototxt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = _valid_or_one_line(lambda: load_recipe(str(path)))
    assert recipe is not None, lines  # rejected a valid solver
    assert read_solver(path).tree["model"] == {"name": "lenet"}
    assert (recipe.model.name, recipe.data.name, recipe.run.max_iter) == ("lenet", "mnist", max_iter)
    for k, v in fields.items():
        expect = {"CPU": "cpu", "GPU": "cuda"}.get(v, v) if k == "solver_mode" else v
        assert _value(recipe, VALID_SOLVER_FIELDS[k][2]) == expect, k


def test_the_cli_turns_a_fuzzed_failure_into_exit_2_and_one_line(tmp_path):
    """The CLI end of the property, once: a DanluError from the parser is exit code 2 and one line on stderr."""
    (tmp_path / "r.yaml").write_bytes(b"optim: {lr: \xff\xfe}\n")
    r = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, text", [
    ("recipe.yaml", "a: " + "[" * 1500),
    ("recipe.yaml", "model: {name: " + "{a: " * 1500 + "1" + "}" * 1501),
    ("solver.prototxt", "a { " * 1500),
    ("--set", "optim.lr=" + "[" * 1500),
])
def test_deeply_nested_input_is_one_line_not_a_recursion_error(folder, name, text):
    if name == "--set":
        assert _valid_or_one_line(lambda: load_recipe("lenet_mnist5k", [text])) is None
        return
    path = folder / name
    path.write_text(text)
    assert _valid_or_one_line(lambda: load_recipe(str(path))) is None
