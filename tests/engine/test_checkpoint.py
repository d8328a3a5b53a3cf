"""Snapshots: resumed == uninterrupted (bit for bit on CPU), atomic writes, and no code from untrusted files."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_cli, sets
from danlu.engine import checkpoint
from danlu.errors import DanluError

# augmentation on (its generator must resume too), dropout-free LeNet, 3 epochs of 16 iterations
RESUMABLE = [*TINY, "augment.shift=0.1", "augment.flip=true", "run.max_iter=48", "run.snapshot_every=8",
             "run.test_interval=16", "schedule.policy=cosine", "run.keep_snapshots=10"]


def _same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_from_a_mid_epoch_snapshot_equals_the_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli("train", "--out", str(full), *sets(*RESUMABLE)).returncode == 0
    # the same run stopped at iteration 24 (mid-epoch 1): keep only the snapshots up to there
    shutil.copytree(full, cut)
    for p in (cut / "snapshots").glob("iter_*.pt"):
        if int(p.stem.split("_")[1]) > 24:
            p.unlink()
    (cut / "model.safetensors").unlink()
    (cut / "summary.json").unlink()
    # the snapshot's clock says 1000 s more (saved again with its checksum): far more than the resumed half takes
    snap = checkpoint.load_snapshot(cut / "snapshots" / "iter_00000024.pt")
    snap["loop"]["clock"]["train_seconds"] += 1000.0
    before = snap["loop"]["clock"]["train_seconds"]
    checkpoint.save_snapshot(cut / "snapshots", {k: v for k, v in snap.items() if k != "format"}, 24, keep=100)
    r = run_cli("train", "--resume", str(cut))
    assert r.returncode == 0, r.stderr
    assert "resumed at 24" in r.stdout
    _same_weights(full, cut)
    # the metrics log reads as one run: each event once, in order, with the same numbers
    def events(run):
        return [(e["kind"], e["iter"], e["loss"], e["acc"]) for e in map(json.loads,
                (run / "metrics.jsonl").read_text().splitlines())]
    assert events(cut) == events(full)
    # the summary counts the training time before the snapshot too, not only the resumed part's
    summary = json.loads((cut / "summary.json").read_text())
    assert before > 0 and summary["train_seconds"] >= round(before, 3)
    assert summary["iterations"] == json.loads((full / "summary.json").read_text())["iterations"]


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # 16x16 images, batch 16: a third of the cost, still long enough to be killed mid-run
    args = sets(*RESUMABLE, "data.size=16", "data.batch_size=16", "run.max_iter=400", "run.snapshot_every=20",
                "run.test_interval=200")
    assert run_cli("train", "--out", str(full), *args).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "train", "--out", str(cut), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # seconds on an idle machine; generous for a busy one
    while time.time() < deadline and not (cut / "snapshots" / "iter_00000100.pt").exists() and proc.poll() is None:
        time.sleep(0.02)
    assert (cut / "snapshots" / "iter_00000100.pt").exists(), "no snapshot at iteration 100 to kill after (waited 600 s)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "finished before the kill: nothing tested"
    r = run_cli("train", "--resume", str(cut))
    assert r.returncode == 0, r.stderr
    _same_weights(full, cut)


def test_a_truncated_newest_snapshot_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--out", str(out), *sets(*TINY, "run.max_iter=20", "run.snapshot_every=10")).returncode == 0
    newest = checkpoint.snapshots(out / "snapshots")[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unloadable"):
        state, path = checkpoint.load_latest(out)
    assert state["iteration"] == 10 and path.name == "iter_00000010.pt"


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil" / "snapshots").mkdir(parents=True)
    for name in ("last.pt", "iter_00000100.pt"):
        with open(tmp_path / "evil" / "snapshots" / name, "wb") as f:
            pickle.dump({"model": Evil()}, f)
    r = run_cli("train", "--resume", str(tmp_path / "evil"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "pwned").exists()


def test_resume_without_a_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(DanluError, match="no snapshot"):
        checkpoint.load_latest(tmp_path)


def test_snapshots_are_atomic_and_pruned(tmp_path):
    for it in (10, 20, 30, 40):
        checkpoint.save_snapshot(tmp_path, {"iteration": it, "w": torch.ones(3) * it}, it, keep=2)
    assert [p.name for p in checkpoint.snapshots(tmp_path)] == ["iter_00000030.pt", "iter_00000040.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    state = checkpoint.load_snapshot(tmp_path / "iter_00000040.pt")
    assert torch.equal(state["w"], torch.ones(3) * 40)


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_resume_of_the_wrong_folder_says_which_folder_to_pass(tmp_path):
    """`--resume runs/hym/snapshots` used to say 'no snapshot in runs/hym/snapshots/snapshots', and `--resume runs`
    'no snapshot in runs/snapshots': now the run folder to pass, or the runs found inside, newest first."""
    runs = tmp_path / "runs"
    for name in ("hym", "mnist"):
        state = {k: torch.zeros(1) for k in checkpoint.RESUME_KEYS}
        checkpoint.save_snapshot(runs / name / "snapshots", state, 4, keep=3)
    os.utime(runs / "hym", (0, 0))  # the older of the two
    with pytest.raises(DanluError) as e:
        checkpoint.load_latest(runs / "hym" / "snapshots")
    assert str(e.value) == (f"--resume {runs / 'hym' / 'snapshots'}: the run's snapshots/ folder; expected the run "
                            f"folder: --resume {runs / 'hym'}")
    with pytest.raises(DanluError) as e:
        checkpoint.load_latest(runs)
    assert str(e.value) == (f"--resume {runs}: not a run folder but a folder of 2 run(s); expected one of them: "
                            f"--resume {runs / 'mnist'}, {runs / 'hym'}")
    with pytest.raises(DanluError, match=rf"a snapshot file; expected its run folder: --resume {runs / 'hym'} "):
        checkpoint.load_latest(runs / "hym" / "snapshots" / "iter_00000004.pt")
    state, path = checkpoint.load_latest(runs / "hym")  # the run folder itself
    assert path.name == "iter_00000004.pt"
    imported = tmp_path / "dlib"  # a run folder written by an import (danlu face import dlib): no training to resume
    imported.mkdir()
    (imported / "summary.json").write_text('{"imported": {"network": "dlib_face_recognition_resnet_model_v1"}}')
    with pytest.raises(DanluError) as e:
        checkpoint.load_latest(imported)
    assert str(e.value) == (f"--resume {imported}: an imported network (dlib_face_recognition_resnet_model_v1), never "
                            f"trained here: nothing to resume; to train from it, start a new run with --set "
                            f"model.init={imported}")
