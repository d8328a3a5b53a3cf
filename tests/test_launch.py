"""launch.py's decisions, without starting processes (tests/engine/test_distributed.py and tests/test_multinode.py
start real ones): which GPUs `--gpus` means, which rank a failed job's one-line message names, and the environment the
workers inherit."""
import os
import signal
from types import SimpleNamespace

import pytest

from danlu.errors import DanluError
from danlu.launch import Interrupted, WorkerFailed, _environment, _root_cause, process_count


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine whose CUDA_VISIBLE_DEVICES shows physical GPUs 3, 5, 6 and 7 as cuda:0..3."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")


@pytest.mark.parametrize("gpus, want", [("all", (4, "3,5,6,7")), ("2", (2, "3,5")), (" 0,2 ", (2, "3,6")),
                                        ("3,0", (2, "7,3"))])
def test_gpus_name_the_visible_devices_the_workers_get(four_gpus, gpus, want):
    assert process_count(gpus=gpus) == want


@pytest.mark.parametrize("kw, match", [
    ({"gpus": "5"}, "this machine has 4 GPU"), ({"gpus": "0"}, "expected 1..4"), ({"gpus": "0,0"}, "distinct"),
    ({"gpus": "1,4"}, r"in 0\.\.3"), ({"gpus": "two"}, "expected all, a count"), ({"procs": 0}, ">= 1"),
    ({}, "give one of"), ({"procs": 2, "gpus": "all"}, "give one of")])
def test_bad_process_counts_are_named(four_gpus, kw, match):
    with pytest.raises(DanluError, match=match):
        process_count(**kw)


def test_procs_need_no_gpu_and_gpus_need_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert process_count(procs=3) == (3, None)
    with pytest.raises(DanluError, match="no CUDA GPU on this machine; use --procs N"):
        process_count(gpus="all")


def _report(rank, time, message="boom", kind="ValueError", peer=False, user=False, stopped=False, signum=None):
    return {"rank": rank, "time": time, "type": kind, "message": message, "peer": peer, "user_error": user,
            "stopped": stopped, "signum": signum, "traceback": f"/logs/{rank}/traceback.txt"}


class _Failed:
    """What torch's ChildFailedError tells: each failed rank's exit code."""

    def __init__(self, codes):
        self.failures = {r: SimpleNamespace(exitcode=c, pid=100 + r, signal_name=lambda c=c: signal.Signals(-c).name)
                         for r, c in codes.items()}

    def get_first_failure(self):
        rank = min(self.failures)
        return rank, self.failures[rank]


def test_the_rank_that_failed_first_is_named_not_the_peers_it_left():
    reports = [_report(0, 5.0, "Connection closed by peer", "DistBackendError", peer=True),
               _report(2, 4.0, "second\ntraceback lines"), _report(1, 3.0, "first error\nmore")]
    e = _root_cause(_Failed({0: 1, 1: 1, 2: 1}), reports)
    assert isinstance(e, WorkerFailed) and e.rank == 1 and e.traceback_file == "/logs/1/traceback.txt"
    assert str(e) == "rank 1 failed: ValueError: first error (full traceback: /logs/1/traceback.txt)"


def test_bad_input_in_a_worker_is_a_danlu_error_and_a_signal_is_interrupted():
    e = _root_cause(_Failed({1: 2}), [_report(1, 1.0, "data.root: no such folder", user=True)])
    assert type(e) is DanluError and str(e) == "data.root: no such folder"  # exit code 2, as in one process
    stop = "stopped by SIGTERM at iteration 40; snapshot iter_40.pt"
    e = _root_cause(_Failed({0: 143, 1: 143}), [_report(0, 1.0, stop, stopped=True, signum=signal.SIGTERM),
                                                _report(1, 1.0, stop, stopped=True, signum=signal.SIGTERM)])
    assert isinstance(e, Interrupted) and str(e) == stop and e.exit_code == 128 + signal.SIGTERM


def test_a_rank_that_died_without_a_word_is_named_by_how_it_died():
    e = _root_cause(_Failed({1: -signal.SIGKILL}), [])
    assert str(e) == "rank 1 (pid 101) was killed by SIGKILL; the other ranks were stopped" and e.rank == 1
    e = _root_cause(_Failed({0: 1}), [_report(0, 2.0, "Socket Timeout", "DistBackendError", peer=True)])
    assert str(e).startswith("rank 0 failed waiting for another rank that died or hangs: DistBackendError: Socket")
    assert str(_root_cause(_Failed({3: 7}), [])) == "rank 3 (pid 103) exited with code 7"


def test_the_workers_environment_is_set_for_the_launch_and_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM")
    with _environment({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0,1", "TORCHELASTIC_SIGNALS_TO_HANDLE": None}):
        assert (os.environ["OMP_NUM_THREADS"], os.environ["CUDA_VISIBLE_DEVICES"]) == ("1", "0,1")
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT"  # what the launcher sets inside
    assert os.environ["OMP_NUM_THREADS"] == "8" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM"  # undone too


def test_a_rank_left_behind_names_who_is_lost_or_stuck_and_beats_the_exit_codes():
    stuck = ("rank 1 (host n1, pid 7) stuck: alive but no answer for 3 s (dist.timeout) after iteration 11 (rank 0 "
             "of 2 gave up waiting)")
    first = {**_report(0, 5.0, "Timed out waiting 3000ms", "RuntimeError", peer=True), "lost": stuck, "missing": [1]}
    later = {**_report(1, 9.0, "Connection closed by peer", "RuntimeError", peer=True),
             "lost": "lost rank 0 (host n1, pid 6) after iteration 11: its connection closed", "missing": [0]}
    # rank 1 ended last, killed by the launcher after rank 0 gave up: the roll call, not the signal, is the cause
    e = _root_cause(_Failed({0: 1, 1: -signal.SIGKILL}), [later, first])
    assert isinstance(e, WorkerFailed) and e.rank == 1
    assert str(e) == f"{stuck} (full traceback: /logs/0/traceback.txt)"
    gone = {**_report(1, 2.0, "Connection reset by peer", peer=True), "lost": "lost rank 0's node", "missing": None}
    assert _root_cause(_Failed({1: 1}), [gone]).rank == 0  # the store went with rank 0


def test_a_failed_procs_run_says_which_snapshot_to_continue_from(tmp_path, monkeypatch, capsys):
    import danlu.launch as launch

    def fail_after_a_snapshot(fn, kw, **_):
        snaps = tmp_path / "run" / "snapshots"
        snaps.mkdir(parents=True)
        (snaps / "iter_00000010.pt").touch()
        raise WorkerFailed("rank 1 (host n1, pid 7) stuck: ...", 1)

    monkeypatch.setattr(launch, "run_workers", fail_after_a_snapshot)
    assert launch.train_command(out=str(tmp_path / "run"), procs=2, overrides=["model.name=lenet"]) == 1
    assert capsys.readouterr().err == (f"danlu: error: rank 1 (host n1, pid 7) stuck: ...; continue from snapshot "
                                       f"iter_00000010.pt with: danlu train --resume {tmp_path / 'run'} --procs 2\n")
