"""danlu.runs: the run folder. A new run never lands in another's folder (--force moves the old one aside, whole),
a finished or snapshotted run loads back as the model it ended with and the preprocessing it trained with, a
damaged folder is one line, and the commit and environment recorded beside each figure."""
import json
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import danlu
from conftest import sets
from danlu import runs
from danlu.engine import checkpoint
from danlu.errors import DanluError

# LeNet on 16x16 synthetic digits, 4 iterations, a snapshot every 2, per-channel normalization (so the run keeps
# its statistics in preprocess.safetensors)
SMALL = ["model.name=lenet", "data.name=synthetic", "data.size=16", "data.train_size=128", "data.test_size=32",
         "data.batch_size=16", "data.normalize=channel", "run.tensorboard=false"]
RUN = [*SMALL, "run.max_iter=4", "run.snapshot_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the run folder, the model danlu.train returned) for one tiny run, trained once for this file."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = danlu.train(overrides=RUN, out=out, device="cpu", quiet=True)
    return out, result.model


def _cli(capsys, *args):
    """The CLI's main() in this process: (exit code, stderr)."""
    from danlu.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- a new run


def test_out_holding_another_run_is_moved_aside_only_with_force(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    before = (out / "model.safetensors").read_bytes()
    code, err = _cli(capsys, "train", "--out", str(out), "--quiet", *sets(*SMALL, "run.max_iter=2"))
    assert code == 2 and "--force" in err and "--resume" in err
    assert (out / "model.safetensors").read_bytes() == before

    with pytest.warns(UserWarning) as caught:
        code, err = _cli(capsys, "train", "--out", str(out), "--force", "--quiet", *sets(*SMALL, "run.max_iter=2"))
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1
    assert f"--force: moved the run that was in {out.resolve()} to {aside[0]}" in [str(w.message) for w in caught]
    assert (aside[0] / "model.safetensors").read_bytes() == before  # the old run, whole
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def test_a_folder_is_refused_only_when_it_holds_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run")
    assert runs.new_run_dir(tmp_path / "empty", "x") == tmp_path / "empty"
    assert runs.new_run_dir(tmp_path / "notes", "x") == tmp_path / "notes"  # other files are left alone
    assert (tmp_path / "notes" / "todo.txt").read_text() == "not a run"
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("")  # a run that died before its first snapshot is a run
    with pytest.raises(DanluError, match=r"holds a run \(metrics.jsonl\); continue it with --resume"):
        runs.new_run_dir(tmp_path / "half", "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(DanluError, match="exists and is not a folder"):
        runs.new_run_dir(tmp_path / "file", "x")


def test_the_default_folder_is_named_after_the_recipe_and_the_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = runs.new_run_dir(None, runs.recipe_name("recipes/resnet18_folder.yaml"))
    assert re.fullmatch(r"runs/resnet18_folder-\d{8}-\d{6}", out.as_posix()) and out.is_dir()
    assert runs.recipe_name(None) == "lenet_mnist5k" and runs.recipe_name({"model": {}}) == "run"


def test_setting_aside_twice_keeps_both_old_runs(tmp_path):
    """Two --force runs in the same second: the second old run gets its own name, nothing is overwritten."""
    out = tmp_path / "run"
    kept = []
    for i in range(3):
        out.mkdir()
        (out / "summary.json").write_text(str(i))
        with pytest.warns(UserWarning, match="--force: moved the run"):
            kept.append(runs.set_aside(out))
    assert len(set(kept)) == 3 and [(p / "summary.json").read_text() for p in kept] == ["0", "1", "2"]
    assert all(p.parent == tmp_path and p.name.startswith("run.old-") for p in kept) and not out.exists()


# ---------------------------------------------------------------- a finished run


def test_a_finished_run_loads_as_the_model_it_ended_with(trained, monkeypatch):
    """Classes and input shape come from summary.json: the data set is not loaded again (the stub refuses)."""
    import danlu.engine.build

    run_dir, model = trained

    def no_data(*args, **kwargs):
        raise AssertionError("load_run loaded the data set")

    monkeypatch.setattr(danlu.engine.build, "load_data", no_data)
    run = runs.load_run(run_dir, device="cpu")
    assert (run.classes, run.shape) == ([f"class_{i}" for i in range(10)], (1, 16, 16))
    assert run.weights == run_dir / "model.safetensors" and not run.model.training
    x = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(run.augment(x, train=False)), model(run.augment(x, train=False)))


def test_inference_uses_the_statistics_the_run_trained_with(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    stats = load_file(str(run_dir / "preprocess.safetensors"))
    assert torch.equal(runs.load_run(run_dir, device="cpu").augment.mean, stats["mean"])
    save_file({"mean": torch.full_like(stats["mean"], 0.25), "std": stats["std"]},
              str(run_dir / "preprocess.safetensors"))
    assert torch.equal(runs.load_run(run_dir, device="cpu").augment.mean, torch.full_like(stats["mean"], 0.25))


def test_a_run_stopped_before_its_end_loads_its_newest_snapshot(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    for f in ("model.safetensors", "summary.json", "snapshots/iter_00000004.pt", "snapshots/iter_00000004.pt.sha256"):
        (run_dir / f).unlink()
    run = runs.load_run(run_dir, device="cpu")
    assert run.weights == run_dir / "snapshots" / "iter_00000002.pt"
    want = checkpoint.load_snapshot(run.weights)["model"]
    assert all(torch.equal(v, want[k]) for k, v in run.model.state_dict().items())
    assert run.shape == (1, 16, 16)  # without summary.json: from the recipe's data


def test_a_damaged_run_folder_is_one_line(trained, tmp_path):
    with pytest.raises(DanluError, match=f"^{tmp_path / 'nowhere'}: no such run folder$"):
        runs.load_run(tmp_path / "nowhere")
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    (run_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(DanluError, match=r"model.safetensors: cannot read the weights") as e:
        runs.load_run(run_dir, device="cpu")
    assert "\n" not in str(e.value)
    (run_dir / "recipe.yaml").unlink()
    with pytest.raises(DanluError, match="no recipe.yaml beside model.safetensors"):
        runs.load_run(run_dir, device="cpu")


def test_weights_of_another_model_are_refused_naming_the_keys():
    model = danlu.create_model("lenet", num_classes=10, in_channels=1)
    state = danlu.create_model("lenet", num_classes=5, in_channels=1).state_dict()
    state["extra.weight"] = state.pop("conv1.weight")
    with pytest.raises(DanluError) as e:
        runs.check_weights(model, state, "w.safetensors", "lenet")
    message = str(e.value)
    assert message.startswith("w.safetensors: weights do not match model 'lenet' of the run's recipe: ")
    for words in ("missing conv1.weight", "unexpected extra.weight", "fc2.weight [5, 500] (model [10, 500])"):
        assert words in message


# ---------------------------------------------------------------- what a run records


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(root), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_recorded_is_the_source_trees_and_says_dirty(tmp_path, monkeypatch):
    """danlu's source tree is a git checkout: summary.json and bench record its commit, with -dirty where a tracked
    file has changed (an untracked file does not make it dirty)."""
    root = tmp_path / "danlu-checkout"
    (root / "src" / "danlu").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "danlu"\n')
    (root / "src" / "danlu" / "runs.py").write_text("# stands for the module\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(runs, "__file__", str(root / "src" / "danlu" / "runs.py"))  # runs.py as if it lived there
    monkeypatch.chdir(tmp_path)  # not a checkout: the source tree alone decides
    assert runs.git_commit() == head
    (root / "notes.txt").write_text("untracked")
    assert runs.git_commit() == head
    (root / "pyproject.toml").write_text('[project]\nname = "danlu"\nversion = "9"\n')
    assert runs.git_commit() == head + "-dirty"
    (root / "pyproject.toml").write_text('[project]\nname = "other"\n')  # another project's tree is not danlu's
    assert runs.git_commit() is None


def test_the_environment_names_the_device_the_versions_and_the_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/danlu", "bench", "--model", "lenet"])
    env = runs.environment(torch.device("cpu"))
    assert env["device"] == runs.device_name(torch.device("cpu"))
    assert re.fullmatch(rf"cpu \(.+, {torch.get_num_threads()} threads\)", env["device"])
    assert (env["torch"], env["danlu"], env["torch_threads"]) == (torch.__version__, danlu.__version__,
                                                                  torch.get_num_threads())
    assert env["driver"] is None and env["cuda"] is None  # no CUDA figures for a CPU run
    assert env["command"] == "danlu bench --model lenet"
    assert runs.versions() == {"danlu": danlu.__version__, "torch": torch.__version__,
                               "python": env["python"]}
