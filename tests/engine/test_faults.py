"""Faults, each injected: a kill between write and rename, SIGTERM / SIGINT, a full disk, NaN, out of memory, and
the bad inputs that reach the engine (a snapshot of another model, a folder without snapshots). An --out folder
holding another run: tests/test_runs.py."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

import danlu
from conftest import TINY, run_cli, sets
from danlu.engine import checkpoint, faults
from danlu.errors import DanluError

# LeNet on 16x16 synthetic digits, batch 16: about the cheapest run that still exercises everything
SMALL = [*TINY, "data.size=16", "data.batch_size=16", "data.train_size=256", "data.test_size=64"]
# 60 iterations with a snapshot every 10: long enough to signal a run in flight after its first snapshot
LONG = [*SMALL, "augment.shift=0.1", "augment.flip=true", "run.max_iter=60", "run.snapshot_every=10",
        "run.test_interval=30", "schedule.policy=cosine", "run.keep_snapshots=20", "run.display=10"]
SHORT = [*SMALL, "run.max_iter=24", "run.snapshot_every=8", "run.test_interval=24", "run.keep_snapshots=10",
         "run.display=8"]


def _same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted LONG run, trained once for every comparison in this file."""
    out = tmp_path_factory.mktemp("faults") / "full"
    r = run_cli("train", "--out", str(out), *sets(*LONG))
    assert r.returncode == 0, r.stderr
    return out


def _iters(folder):
    return [int(p.stem.split("_")[1]) for p in checkpoint.snapshots(folder)]


# ---------------------------------------------------------------- a kill between write and rename

_KILL_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    target = sys.argv[1]
    real = os.replace
    def replace(src, dst):          # the process dies between writing a file and renaming it into place
        if str(dst).endswith(target):
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    from danlu.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("target", ["iter_00000020.pt", "iter_00000020.pt.sha256"])
def test_a_kill_between_write_and_rename_resumes_from_the_previous_snapshot(tmp_path, full, target):
    cut = tmp_path / "cut"
    r = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, target, "train", "--out", str(cut), *sets(*LONG)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    snaps = cut / "snapshots"
    # the killed writer left its complete temporary file: never listed, never loaded
    assert [p.name for p in snaps.iterdir() if p.name.startswith(".iter_00000020.pt")]
    assert _iters(snaps) == [10]
    state, path = checkpoint.load_latest(cut)
    assert path.name == "iter_00000010.pt" and state["iteration"] == 10
    assert checkpoint.verify(path)  # intact: it matches the checksum written with it
    if target.endswith(".sha256"):
        return  # the same state as the other case, one step earlier: resuming it once is enough

    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "it')  # and a SIGKILL can tear the metrics log's last line too
    r = run_cli("train", "--resume", str(cut))
    assert r.returncode == 0, r.stderr
    assert "resumed at 10" in r.stdout
    _same_weights(full, cut)
    assert (cut / "metrics.jsonl").read_text().count("\n") == (full / "metrics.jsonl").read_text().count("\n")
    # the next save cleaned up after the dead writer
    assert not [p for p in snaps.iterdir() if p.name.startswith(".")]


def test_a_snapshot_changed_after_writing_fails_its_checksum_and_the_previous_one_is_resumed(tmp_path):
    for it in (10, 20):
        checkpoint.save_snapshot(tmp_path / "snapshots", {"iteration": it, "model": {},
                                                          "optimizer": {}, "rng": {}, "recipe": {},
                                                          "w": torch.full((4096,), float(it))}, it, keep=3)
    newest = tmp_path / "snapshots" / "iter_00000020.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the tensor data: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    torch.load(newest, weights_only=True)  # (it still loads)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        state, path = checkpoint.load_latest(tmp_path)
    assert state["iteration"] == 10 and path.name == "iter_00000010.pt"


def test_a_snapshot_without_its_checksum_file_loads_with_a_warning(tmp_path):
    path = checkpoint.save_snapshot(tmp_path, {"iteration": 1}, 1, keep=1)
    checkpoint.sidecar(path).unlink()
    with pytest.warns(UserWarning, match="no checksum file.*loaded it unverified"):
        assert checkpoint.load_snapshot(path)["iteration"] == 1


# ---------------------------------------------------------------- SIGTERM / SIGINT


# `danlu train` whose 11th optimizer step (iteration 11, after the snapshot at 10) says so on stdout and then waits,
# inside the step, until SIGTERM / SIGINT has reached danlu's handler: the signal always lands mid-step, however fast
# or slow the machine (polling for the snapshot file and signalling raced the run's last 50 steps).
_WAIT_IN_STEP_11 = textwrap.dedent("""
    import signal, sys, time
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    arrived = []
    real_signal = signal.signal
    def watched(signum, handler):           # danlu's handler, and a note that it ran
        if callable(handler) and signum in (signal.SIGTERM, signal.SIGINT):
            inner = handler
            def handler(s, frame):
                arrived.append(s)
                inner(s, frame)
        return real_signal(signum, handler)
    signal.signal = watched
    steps = []
    def before_step(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 11:
            print("in step 11", flush=True)
            while not arrived:              # a signal's handler runs in this thread, between these sleeps
                time.sleep(0.01)
    register_optimizer_step_pre_hook(before_step)
    from danlu.cli import main
    sys.exit(main(sys.argv[1:]))
""")
STOP_AT = 11


def _start_and_signal(out, sig):
    """Run LONG, send `sig` while its step 11 is in flight, and return (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_IN_STEP_11, "train", "--out", str(out), *sets(*LONG)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        seen = []
        for line in proc.stdout:  # ends when the run does: then it never reached step 11, and says why below
            seen.append(line)
            if line.startswith(f"in step {STOP_AT}"):
                proc.send_signal(sig)
                break
        try:
            stdout, stderr = proc.communicate(timeout=240)  # a guard against a hang only: the run ends in seconds
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run had not ended 240 s after {signal.Signals(sig).name} was sent in step {STOP_AT}: "
                        f"no handler installed with signal.signal ran, or the stop hangs")
    finally:
        proc.kill()
    assert seen and seen[-1].startswith(f"in step {STOP_AT}"), f"the run ended before step {STOP_AT}: {stderr}"
    return proc.returncode, "".join(seen) + stdout, stderr


def test_sigterm_finishes_the_step_writes_a_snapshot_exits_143_and_resumes_exactly(tmp_path, full):
    cut = tmp_path / "cut"
    code, _, stderr = _start_and_signal(cut, signal.SIGTERM)
    assert code == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM at iteration" in last and f"danlu train --resume {cut}" in last
    stop = int(last.split("at iteration ")[1].split(";")[0])
    assert stop == STOP_AT  # the step in flight finished, and the run stopped at its end
    assert _iters(cut / "snapshots") == [10, STOP_AT]  # the periodic snapshot, and the one of the stop
    assert not (cut / "summary.json").exists()

    r = run_cli("train", "--resume", str(cut))
    assert r.returncode == 0, r.stderr
    assert f"resumed at {stop}" in r.stdout
    _same_weights(full, cut)


def test_sigint_stops_the_same_way_with_exit_130(tmp_path):
    cut = tmp_path / "cut"
    code, _, stderr = _start_and_signal(cut, signal.SIGINT)
    assert code == 130, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    stop = int(stderr.split("at iteration ")[1].split(";")[0])
    state, path = checkpoint.load_latest(cut)
    assert stop == STOP_AT and state["iteration"] == stop and checkpoint.verify(path)


def test_signal_handlers_are_restored_after_training(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    danlu.train(overrides=[*SMALL, "run.max_iter=2"], out=tmp_path / "run", quiet=True)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------- disk full / unwritable run folder


def test_a_full_disk_while_saving_stops_with_one_line_and_keeps_the_previous_snapshot(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    danlu.train(overrides=SHORT, out=full, quiet=True)
    real_save = torch.save

    def disk_full_at_16(obj, f, *a, **kw):  # writes part of the file, then the disk is full
        if isinstance(obj, dict) and obj.get("iteration") == 16:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_16)
    with pytest.raises(DanluError) as e:
        danlu.train(overrides=SHORT, out=cut, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "iteration 16" in msg and "No space left on device" in msg and "iter_00000008.pt is intact" in msg
    assert sorted(p.name for p in (cut / "snapshots").iterdir()) == ["iter_00000008.pt", "iter_00000008.pt.sha256"]
    assert not (cut / "model.safetensors").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the previous snapshot verifies: no fallback warning
        danlu.train(resume=cut, quiet=True)
    _same_weights(full, cut)


def test_an_unwritable_run_folder_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    code, err = _cli(capsys, "train", "--out", str(tmp_path / "afile" / "run"), *sets(*SMALL, "run.max_iter=2"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot create the run folder" in err


# ---------------------------------------------------------------- NaN / Inf


class _PoisonAt(torch.nn.Module):
    """LeNet whose training forward returns NaN logits at the given training calls (0-based)."""

    def __init__(self, calls, every_after=None):
        super().__init__()
        self.net = danlu.create_model("lenet", num_classes=10, in_channels=1, input_size=16)
        self.calls, self.every_after, self.n = set(calls), every_after, 0

    def forward(self, x):
        out = self.net(x)
        if self.training and torch.is_grad_enabled():
            if self.n in self.calls or (self.every_after is not None and self.n >= self.every_after):
                out = out * float("nan")
            self.n += 1
        return out


def _data():
    return danlu.load_dataset("synthetic", train_size=256, test_size=64, size=16)


def test_on_nan_stop_writes_a_diagnosis_and_keeps_the_last_good_snapshot(tmp_path):
    train, test = _data()
    recipe = {"data": {"batch_size": 32}, "run": {"max_iter": 40, "display": 10, "snapshot_every": 10,
                                                  "tensorboard": False, "keep_snapshots": 10}}
    with pytest.raises(faults.Diverged) as e:
        danlu.train(recipe, model=_PoisonAt({23}), train_data=train, test_data=test, out=tmp_path / "run",
                    quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "by iteration 30" in msg and "diagnosis.json" in msg
    d = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    assert d["iteration"] == 30 and d["finite_at_iteration"] == 20  # the NaN step (24) lies between the two
    assert d["lr"] == pytest.approx(0.01) and d["loss"] == "nan"
    assert d["first_nonfinite_gradient"] == "net.conv1.weight" and d["first_nonfinite_parameter"] == "net.conv1.weight"
    assert d["last_good_snapshot"].endswith("iter_00000020.pt")
    assert _iters(tmp_path / "run" / "snapshots") == [10, 20]
    state, _ = checkpoint.load_latest(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_on_nan_skip_drops_the_steps_and_counts_them(tmp_path):
    train, test = _data()
    recipe = {"data": {"batch_size": 32}, "run": {"max_iter": 40, "display": 10, "snapshot_every": 20,
                                                  "tensorboard": False, "on_nan": "skip"}}
    result = danlu.train(recipe, model=_PoisonAt({5, 23, 24}), train_data=train, test_data=test,
                         out=tmp_path / "run", quiet=True)
    assert result.summary["nan_skipped_steps"] == 3 and result.iterations == 40
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["nan_skipped_steps"] for e in events if e["kind"] == "train"] == [1, 1, 3, 3]
    assert all(e["loss"] == e["loss"] for e in events)  # no NaN reached the logged loss


def test_on_nan_skip_gives_up_when_every_step_is_non_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "MAX_SKIP_STREAK", 5)
    train, test = _data()
    recipe = {"data": {"batch_size": 32}, "run": {"max_iter": 40, "display": 10, "snapshot_every": 10,
                                                  "tensorboard": False, "on_nan": "skip"}}
    with pytest.raises(faults.Diverged, match="steps all had a non-finite loss"):
        danlu.train(recipe, model=_PoisonAt((), every_after=12), train_data=train, test_data=test,
                    out=tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "diagnosis.json").read_text())["nan_skipped_steps"] == 8


# ---------------------------------------------------------------- out of memory


class _SmallDevice(torch.nn.Module):
    """LeNet on a pretend device where a training batch of more than `limit` images runs out of memory."""

    def __init__(self, limit):
        super().__init__()
        self.net, self.limit = danlu.create_model("lenet", num_classes=10, in_channels=1, input_size=16), limit

    def forward(self, x):
        if torch.is_grad_enabled() and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_find_batch_size_refuses_a_batch_that_does_not_fit_before_writing_anything(tmp_path):
    train, test = _data()
    recipe = {"data": {"batch_size": 128}, "run": {"max_iter": 5, "find_batch_size": True, "tensorboard": False}}
    with pytest.raises(DanluError, match=r"data.batch_size=128: does not fit .* largest batch that fits "
                                         r"forward\+backward is 64"):
        danlu.train(recipe, model=_SmallDevice(64), train_data=train, test_data=test, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_out_of_memory_in_training_names_the_batch_and_the_probed_size(tmp_path, monkeypatch):
    from danlu.engine.precision import Precision

    train, test = _data()
    calls = {"n": 0}
    real_step = Precision.step

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Precision, "step", step)
    recipe = {"data": {"batch_size": 32}, "run": {"max_iter": 5, "find_batch_size": True, "tensorboard": False}}
    with pytest.raises(DanluError) as e:
        danlu.train(recipe, model=_SmallDevice(64), train_data=train, test_data=test, out=tmp_path / "a",
                    quiet=True)
    assert "\n" not in str(e.value)
    assert "data.batch_size=32" in str(e.value) and "found 64 fits" in str(e.value)
    assert "--set data.batch_size=16" in str(e.value)

    calls["n"] = 0
    recipe["run"]["find_batch_size"] = False
    with pytest.raises(DanluError, match="data.batch_size=32.*run.find_batch_size=true"):
        danlu.train(recipe, model=_SmallDevice(64), train_data=train, test_data=test, out=tmp_path / "b",
                    quiet=True)


def test_probing_leaves_the_run_unchanged(tmp_path):
    train, test = _data()
    recipe = {"data": {"batch_size": 32}, "run": {"max_iter": 8, "tensorboard": False, "seed": 3}}
    plain = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "a", quiet=True)
    recipe["run"]["find_batch_size"] = True
    probed = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "b", quiet=True)
    assert probed.summary["largest_batch_that_fits"] == 256  # every power of two up to the training set fits
    for (name, a), b in zip(plain.model.state_dict().items(), probed.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- bad input reaching the engine


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    danlu.train(overrides=[*SMALL, "run.max_iter=4", "run.snapshot_every=2"], out=out, quiet=True)
    return out


def _cli(capsys, *args):
    """The CLI's main() in this process (no interpreter start-up): (exit code, stderr). The signal and kill tests
    above run it in a child process, as a user does."""
    from danlu.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("model.name=minigooglenet", ["holds weights of another model", "missing keys", "unexpected keys conv1.weight"]),
    ("optim.name=adam", ["holds sgd optimizer state", "optim.name=adam"]),
])
def test_resume_with_another_model_or_optimizer_is_one_line_and_changes_nothing(small_run, override, words, capsys):
    before = {p.name: p.read_bytes() for p in (small_run / "snapshots").iterdir()}
    recipe_before = (small_run / "recipe.yaml").read_text()
    code, err = _cli(capsys, "train", "--resume", str(small_run), "--set", override)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err
    assert {p.name: p.read_bytes() for p in (small_run / "snapshots").iterdir()} == before
    assert (small_run / "recipe.yaml").read_text() == recipe_before


def test_weights_of_another_shape_are_named():
    model = danlu.create_model("lenet", num_classes=10, in_channels=1)
    other = danlu.create_model("lenet", num_classes=5, in_channels=1).state_dict()
    with pytest.raises(DanluError, match=r"shape mismatch fc2.weight \(5, 500\) vs \(10, 500\)"):
        checkpoint.load_model_state(model, other, "snap.pt")


def test_resume_of_a_folder_without_snapshots_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "train", "--resume", str(tmp_path / "empty"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no snapshot" in err


# ---------------------------------------------------------------- untrusted files


def test_no_loader_in_danlu_can_run_code_from_a_file():
    """Every torch.load in the package passes weights_only=True, every np.load allow_pickle=False, YAML is read with
    safe_load; pickle itself is used only by the data catalog's restricted unpickler (tests/data/test_catalog.py)."""
    import re
    from pathlib import Path

    src = Path(danlu.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
        if re.search(r"pickle\.(load|loads|Unpickler)\b", text):
            assert path.name == "catalog.py", path
