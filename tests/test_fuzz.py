"""Property-based tests (hypothesis) for what users type: any recipe file, any --set item, any solver.prototxt either
becomes a valid recipe or fails with a one-line DanluError (which the CLI turns into exit code 2), never another
exception. Bounded (max_examples, no database) so the whole file runs in seconds."""
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydantic import BaseModel

from conftest import run_cli
from danlu.config import Recipe, build_recipe, load_recipe
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
    pytest.importorskip("danlu.caffe")
    path = folder / "solver.prototxt"
    path.write_text(text, encoding="utf-8")
    _valid_or_one_line(lambda: load_recipe(str(path)))


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
    if name.endswith(".prototxt"):
        pytest.importorskip("danlu.caffe")
    path = folder / name
    path.write_text(text)
    assert _valid_or_one_line(lambda: load_recipe(str(path))) is None
