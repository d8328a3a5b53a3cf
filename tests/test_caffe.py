"""Caffe solver files: the article's solver text, the field mapping, and malformed files (line numbers)."""
import json
import warnings

import pytest
import torch

from conftest import ROOT, sets
from danlu.caffe import gpu_flag, parse_solver_text
from danlu.config import load_recipe
from danlu.errors import DanluError

# Caffe's examples/mnist/lenet_solver.prototxt as the article prints it
ARTICLE = """# The train/test net protocol buffer definition
net: "examples/mnist/lenet_train_test.prototxt"
test_iter: 100
test_interval: 500
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: 10000
snapshot: 5000
snapshot_prefix: "examples/mnist/lenet"
solver_mode: GPU
"""


def solver(tmp_path, text, name="solver.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def load(path, overrides=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_recipe(path, overrides)
    return recipe, [str(w.message) for w in caught]


def test_the_articles_solver_maps_every_field(tmp_path):
    r, notes = load(solver(tmp_path, ARTICLE))
    assert (r.model.name, r.data.name) == ("lenet", "mnist")  # from the lenet_train_test.prototxt reference
    assert (r.data.batch_size, r.data.test_batch_size, r.data.scale) == (64, 100, 0.00390625)
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.01, 0.9, 0.0005)
    assert (r.schedule.policy, r.schedule.gamma, r.schedule.power) == ("inv", 0.0001, 0.75)
    assert (r.run.max_iter, r.run.epochs, r.run.test_iter, r.run.test_interval) == (10000, None, 100, 500)
    assert (r.run.display, r.run.snapshot_every) == (100, 5000)
    assert r.devices.device == "cuda"
    assert r.augment.shift == 0 and not r.augment.flip
    assert len(notes) == 1 and "snapshot_prefix 'examples/mnist/lenet'" in notes[0] and "line 14" in notes[0]


def test_shipped_solver_is_the_lenet_mnist_recipe():
    from_solver, _ = load(str(ROOT / "recipes" / "lenet_solver.prototxt"))
    from_yaml = load_recipe("lenet_mnist")
    assert from_solver.devices.device == "cuda"  # solver_mode: GPU
    assert from_solver.model_copy(update={"devices": from_yaml.devices}) == from_yaml
    assert "base_lr: 0.01" in (ROOT / "recipes" / "lenet_solver.prototxt").read_text()


def test_set_beats_the_danlu_comment_which_beats_the_solver(tmp_path):
    text = "# danlu: model=resnet18 data=synthetic optim.lr=0.5 data.size=32\nbase_lr: 0.1\nmomentum: 0.8\nmax_iter: 9\n"
    r, _ = load(solver(tmp_path, text), ["optim.momentum=0.7"])
    assert (r.model.name, r.data.name, r.data.size) == ("resnet18", "synthetic", 32)
    assert r.optim.lr == 0.5 and r.optim.momentum == 0.7


@pytest.mark.parametrize("text, optim", [
    ('type: "Nesterov"\n', {"name": "sgd", "nesterov": True}),
    ("solver_type: NESTEROV\n", {"name": "sgd", "nesterov": True}),
    ('type: "Adam"\nmomentum: 0.8\nmomentum2: 0.99\ndelta: 1e-6\n', {"name": "adam", "betas": (0.8, 0.99), "eps": 1e-6}),
    ('type: "SGD"\nclip_gradients: 5\n', {"name": "sgd", "nesterov": False, "clip_grad_norm": 5.0}),
])
def test_solver_types(tmp_path, text, optim):
    r, _ = load(solver(tmp_path, "# danlu: model=lenet data=synthetic\nmax_iter: 10\n" + text))
    for k, v in optim.items():
        assert getattr(r.optim, k) == v, k


def test_multistep_device_and_seed(tmp_path):
    text = ('net: "examples/mnist/lenet_train_test.prototxt"\nlr_policy: "multistep"\nstepvalue: 100\n'
            "stepvalue: 300  # repeated\nsolver_mode: GPU device_id: 1\nrandom_seed: 7\nmax_iter: 500\n")
    r, _ = load(solver(tmp_path, text))
    assert r.schedule.policy == "multistep" and r.schedule.stepvalues == [100, 300]
    assert r.devices.device == "cuda:1" and r.run.seed == 7
    r, _ = load(solver(tmp_path, 'net: "lenet_train_test.prototxt"\nsolver_mode: CPU\nmax_iter: 1\n'))
    assert r.devices.device == "cpu"


def test_unknown_fields_warn_naming_each(tmp_path):
    text = ('net: "examples/mnist/lenet_train_test.prototxt"\nbase_lrr: 0.1\naverage_loss: 20\n'
            "train_state { level: 0 }\nmax_iter: 10\n")
    r, notes = load(solver(tmp_path, text))
    assert r.optim.lr == 0.01  # the misspelt field changes nothing
    assert len(notes) == 3
    assert "line 2" in notes[0] and "'base_lrr'" in notes[0] and "did you mean 'base_lr'" in notes[0]
    assert "'average_loss'" in notes[1] and "'train_state'" in notes[2] and "line 4" in notes[2]


def test_iter_size_is_gradient_accumulation(tmp_path):
    net = 'net: "examples/mnist/lenet_train_test.prototxt"\n'
    r, _ = load(solver(tmp_path, net + "iter_size: 4\nmax_iter: 10\n"))
    assert r.optim.accumulate == 4  # Caffe's iter_size: 4 micro-batches of data.batch_size per step
    r, _ = load(solver(tmp_path, net + "iter_size: 1\nmax_iter: 10\n"))
    assert r.optim.accumulate == 1
    with pytest.raises(DanluError, match=r"line 2: iter_size: 0: expected a value greater than or equal to 1"):
        load(solver(tmp_path, net + "iter_size: 0\nmax_iter: 10\n"))


@pytest.mark.parametrize("text, words", [
    ('base_lr: 0.01\nlr_policy "inv"\nmax_iter: 10\n', ["line 2", "expected ':' after 'lr_policy'"]),
    ('base_lr: 0.01\n\nlr_policy: "inv\n', ["line 3", "unexpected"]),
    ("base_lr: 0.01\nmax_iter: 1e4\n", ["line 2", "max_iter: 1e4", "integer"]),
    ("lr_policy: inv\n", ["line 1", 'lr_policy: "inv"', "quoted"]),
    ('solver_mode: "GPU"\n', ["line 1", "bare word"]),
    ("base_lr: 0.01\nbase_lr: 0.02\n", ["line 2", "twice", "line 1"]),
    ("max_iter:\n", ["line 1", "expected a value after 'max_iter:'"]),
    ("train_state {\n  level: 0\n", ["not closed"]),
    ("base_lr: 0.01 }\n", ["line 1", "'}'"]),
    ("base_lr: 0.01\n@\n", ["line 2", "'@'"]),
    ('# danlu: model=lenet data=synthetic\ntype: "AdaGrad"\n', ["line 2", "AdaGrad", "SGD, Nesterov or Adam"]),
    ("base_lr: 0.01\n", ["no net", "# danlu: model=NAME data=NAME"]),
    ('net: "my_net.prototxt"\n', ["line 1", "my_net.prototxt", "# danlu: model=NAME data=NAME"]),
    ('# danlu: model=lenet data=synthetic\nbase_lr: -0.01\nmax_iter: 5\n', ["line 2", "base_lr: -0.01", "greater than or equal to 0"]),
    ('# danlu: model=lenet data=synthetic modl.name=x\nmax_iter: 5\n', ["line 1", "# danlu: modl.name=x",
                                                                     "did you mean 'model'"]),
    ('net: "examples/mnist/lenet_train_test.prototxt"\n', ["no max_iter"]),
    ('# danlu: lenet\n', ["line 1", "KEY=VALUE"]),
])
def test_malformed_solvers_name_the_line(tmp_path, text, words):
    with pytest.raises(DanluError) as e:
        load(solver(tmp_path, text, "broken_solver.prototxt"))
    msg = str(e.value)
    assert "broken_solver.prototxt" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_parser_reads_protobuf_text_forms():
    fields, danlu = parse_solver_text('a: 1 b: -2.5e-3 c: "x y" d: WORD\nm { n: 1 }\nm2: { }\n# danlu: x=1\n')
    assert [(f.name, f.value) for f in fields[:4]] == [("a", 1), ("b", -0.0025), ("c", "x y"), ("d", "WORD")]
    assert fields[4].kind == "msg" and fields[4].value[0].value == 1 and fields[5].value == []
    assert danlu == [("x=1", 4)]


def test_gpu_flag_as_caffe():
    assert gpu_flag("1") == ("cuda:1", None)  # an index, one process
    assert gpu_flag("all") == (None, "all") and gpu_flag("0,1") == (None, "0,1")  # one process per GPU (--gpus)
    with pytest.raises(DanluError, match="expected a GPU number"):
        gpu_flag("first")


def test_cli_trains_from_the_articles_solver(cli, tmp_path):
    path = solver(tmp_path, ARTICLE, "lenet_solver.prototxt")
    out = tmp_path / "run"
    r = cli("train", path, "--out", str(out), "--device", "cpu",
            *sets("data.name=synthetic", "data.train_size=1280", "data.test_size=200", "run.max_iter=20",
                  "run.test_interval=10", "run.display=10", "run.tensorboard=false"), env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "snapshot_prefix" in ln] == [
        f"danlu: warning: {path} line 14: snapshot_prefix 'examples/mnist/lenet': danlu writes snapshots to the "
        f"run folder's snapshots/ instead"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 20 and summary["recipe"]["schedule"]["policy"] == "inv"
    assert summary["recipe"]["data"]["scale"] == 0.00390625
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["kind"] == "train"]
    assert train[0]["lr"] == pytest.approx(0.01 * (1 + 0.0001 * 9) ** -0.75, rel=1e-4)  # Caffe inv, iteration 9


@pytest.mark.parametrize("args, words", [
    (["--solver", "broken_solver.prototxt"], ["broken_solver.prototxt line 2", "expected ':'"]),
    (["--solver", "missing.prototxt"], ["missing.prototxt", "not found"]),
    (["--solver", "recipe.yaml"], ["ending in .prototxt"]),
    (["-gpu", "0", "--device", "cpu"], ["-gpu 0 and --device"]),
    (["--gpu", "all", "--procs", "2"], ["-gpu all and --procs"]),
])
def test_cli_solver_errors_exit_2_on_one_line(tmp_path, monkeypatch, capsys, args, words):
    from danlu.cli import main

    (tmp_path / "broken_solver.prototxt").write_text('base_lr: 0.01\nlr_policy "inv"\nmax_iter: 10\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine could train on GPUs 0 and 1")
def test_gpu_list_is_one_process_per_gpu(tmp_path, monkeypatch, capsys):
    from danlu.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "-gpu", "0,1"]) == 2
    assert "--gpus 0,1" in capsys.readouterr().err  # what -gpu 0,1 became: one process per GPU
