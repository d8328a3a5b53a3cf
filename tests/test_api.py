"""The README's Python example: your own nn.Module on your own tensors."""
import pytest
import torch
from torch import nn

import danlu


def test_readme_example_trains_a_users_module_on_users_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (600, 3, 16, 16), generator=g)).to(torch.uint8)
    train = danlu.ImageSet(images[:500], labels[:500], ["red", "green", "blue"])
    test = danlu.ImageSet(images[500:], labels[500:], ["red", "green", "blue"])

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 3))
    result = danlu.train({"run": {"epochs": 10}, "data": {"batch_size": 32}}, model=model, train_data=train,
                         test_data=test, out=tmp_path / "mine", quiet=True)

    assert result.test_accuracy > 0.9
    assert (result.run_dir / "model.safetensors").is_file() and (result.run_dir / "curves.png").is_file()
    assert result.model is model


def test_importing_danlu_starts_nothing():
    import subprocess
    import sys

    code = "import sys, danlu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_training_a_classifier_loads_no_face_module_no_opencv_no_sqlite(tmp_path):
    """Faces are a task and an application beside the engine: a classifier run (LeNet on the shipped digits,
    trained, tested and written out) never imports danlu.face, OpenCV or the gallery's SQLite."""
    import subprocess
    import sys

    code = ("import sys, danlu\n"
            "danlu.train('lenet_mnist5k', overrides=['run.max_iter=3', 'run.test_interval=3'],"
            f" out={str(tmp_path / 'run')!r}, device='cpu', quiet=True)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('danlu.face') or m in ('cv2', 'sqlite3'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert done.stdout.strip() == "", f"a classifier run imported: {done.stdout.strip()}"


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].test_accuracy > 0.9
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()


def _files(folder):
    """Every file of a run folder with its bytes: what a command that 'changes nothing' must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing_and_training_on_is_asked_for(tmp_path):
    """`--resume` of a finished run used to print 'done: test accuracy nan', exit 0 and rewrite summary.json with
    null figures. Now: one line saying it is finished, exit 0, every file as it was; a length that is not longer:
    exit 2, nothing written; a longer run.max_iter: it trains on."""
    import json

    from conftest import TINY, run_cli, sets

    out = tmp_path / "run"
    assert run_cli("train", "--out", str(out), "--device", "cpu", *sets(*TINY, "run.max_iter=4")).returncode == 0
    before = _files(out)
    r = run_cli("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [r.stdout.strip()] and f"{out} is finished (4 iterations" in r.stdout
    assert "run.max_iter=N with N above 4" in r.stdout and "nan" not in r.stdout
    assert _files(out) == before
    r = run_cli("train", "--resume", str(out), "--set", "run.max_iter=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not more than the 4" in r.stderr
    assert _files(out) == before
    r = run_cli("train", "--resume", str(out), "--set", "run.max_iter=8", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 8 and summary["test_accuracy"] is not None
    result = danlu.train(resume=out, quiet=True)  # the API: the finished run's result, nothing trained
    assert (result.iterations, result.test_accuracy) == (8, pytest.approx(summary["test_accuracy"], abs=1e-6))
    assert json.loads((out / "summary.json").read_text()) == summary


class _Net(nn.Module):
    """A user's own module (not in danlu's registry)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_a_run_of_your_own_module_resumes_through_the_api_and_the_cli_says_so(tmp_path):
    """The CLI cannot rebuild a module it was never given: it says how to resume in Python (it used to say 'holds
    weights of another model (missing keys ...)'), and danlu.train(model=..., resume=RUN) continues the run."""
    import shutil

    from conftest import run_cli

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (300, 3, 16, 16), generator=g)).to(torch.uint8)
    train, test = (danlu.ImageSet(images[s], labels[s], ["a", "b", "c"]) for s in (slice(0, 256), slice(256, None)))
    recipe = {"run": {"max_iter": 16, "snapshot_every": 8, "tensorboard": False}, "data": {"batch_size": 32}}
    torch.manual_seed(0)
    full = danlu.train(recipe, model=_Net(), train_data=train, test_data=test, out=tmp_path / "full", quiet=True)
    cut = tmp_path / "cut"  # the same run killed after its snapshot at 8
    shutil.copytree(tmp_path / "full", cut)
    for name in ("snapshots/iter_00000016.pt", "snapshots/iter_00000016.pt.sha256", "summary.json"):
        (cut / name).unlink()

    r = run_cli("train", "--resume", str(cut))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "_Net" in r.stderr
    assert f"danlu.train(resume='{cut}', model=_Net(), train_data=..., test_data=...)" in r.stderr
    model = _Net()
    resumed = danlu.train(resume=cut, model=model, train_data=train, test_data=test, quiet=True)
    assert resumed.iterations == 16 and resumed.model is model
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k  # as if never interrupted


def test_keep_start_undoes_training_that_made_the_test_set_worse_and_keeps_training_that_helped(tmp_path):
    """model.keep_start (fine-tuning from model.init): the starting weights are tested at the end as the trained
    ones were; where training made the test figure worse (here: weight decay that zeroes every weight), the run's
    weights, last test event and summary are the start's, also after a resume; where training helped, they stay."""
    import json

    from safetensors.torch import load_file

    from conftest import TINY

    def train(out, *extra):
        return danlu.train(None, overrides=[*TINY, *extra], out=out, device="cpu", quiet=True)

    def weights(run):
        return load_file(str(run / "model.safetensors"))

    adam = ["optim.name=adam", "optim.lr=0.001", "run.max_iter=40"]
    good = train(tmp_path / "good", *adam)
    assert good.test_accuracy > 0.5
    ruin = ["model.keep_start=true", f"model.init={good.run_dir}", "optim.name=sgd", "optim.lr=0.1",
            "optim.weight_decay=10", "optim.momentum=0", "schedule.policy=fixed"]
    bad = train(tmp_path / "bad", *ruin, "run.max_iter=2", "run.snapshot_every=1")
    resumed = danlu.train(resume=tmp_path / "bad", overrides=["run.max_iter=4"], quiet=True)  # the start read again
    for r in (bad, resumed):
        kept = r.summary["keep_start"]
        assert kept["kept_start"] and kept["metric"] == "acc" and kept["trained"] < 0.2  # zeroed: one class for all
        assert kept["start"] == pytest.approx(good.test_accuracy, abs=1e-6) == r.test_accuracy
        assert all(torch.equal(w, weights(good.run_dir)[k]) for k, w in weights(r.run_dir).items())
    last = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "test" and last["acc"] == pytest.approx(good.test_accuracy, abs=1e-6)
    assert last["starting_weights"] is True

    weak = train(tmp_path / "weak", *adam, "run.max_iter=1")
    better = train(tmp_path / "better", "model.keep_start=true", f"model.init={weak.run_dir}", *adam)
    assert better.summary["keep_start"] == {"metric": "acc", "start": pytest.approx(weak.test_accuracy, abs=1e-6),
                                            "trained": pytest.approx(better.test_accuracy, abs=1e-6),
                                            "kept_start": False}
    assert better.test_accuracy > weak.test_accuracy
    assert not torch.equal(weights(better.run_dir)["fc2.weight"], weights(weak.run_dir)["fc2.weight"])
