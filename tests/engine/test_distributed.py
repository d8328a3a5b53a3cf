"""Several processes (CPU, gloo, torch's elastic launcher): the same numbers as one process, sharded evaluation that
counts every sample once, snapshots that resume on another number of processes, failures that end the job."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

import danlu
from conftest import ROOT, run_cli, sets
from danlu.engine import distributed
from danlu.engine.distributed import Dist, detect, first_host

# LeNet on synthetic digits, no augmentation, no LR scaling; 1,001 test images with a test batch of 100 per rank:
# the last global test batch (200) holds 1 image, so rank 0 gets 1 and rank 1 none
COMMON = ["model.name=lenet", "data.name=synthetic", "data.train_size=1024", "data.test_size=1001",
          "data.test_batch_size=100", "augment=none", "optim.lr_scaling=none", "run.max_iter=50",
          "run.snapshot_every=40", "run.test_interval=25", "run.display=25", "run.seed=3", "run.tensorboard=false"]


# One thread per process, for the single-process runs too: a CI box shared by other jobs makes OpenMP threads wait on
# each other (a 2-thread LeNet step can run 10x slower there), and equal thread counts keep the reduction orders of
# the runs compared here alike (1 process with 2 threads differs from 1 with 1 thread by ~7e-6 after 50 steps).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(run) -> dict:
    return load_file(str(run / "model.safetensors"))


def _max_diff(a, b) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def _moved(run) -> float:
    """How far training moved the weights: the largest change of any weight from its seeded initial value."""
    from danlu.config import load_recipe
    from danlu.engine.build import build_model

    recipe = load_recipe(str(run / "recipe.yaml"))
    torch.manual_seed(recipe.run.seed)  # as engine.build seeds the initial weights
    start = build_model(recipe, (1, 28, 28), 10).state_dict()
    end = _weights(run)
    return max((end[k].double() - start[k].double()).abs().max().item() for k in end)


def _tests(run) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["kind"] == "test"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 50 steps as 2 processes x batch 32 (through the real CLI and launcher) and 1 process x batch 64, in
    float64 (two, one) and float32 (two32, one32)."""
    root = tmp_path_factory.mktemp("dist")
    for precision, suffix in (("fp64", ""), ("fp32", "32")):
        two = run_cli("train", "--procs", "2", "--out", str(root / f"two{suffix}"),
                      *sets(*COMMON, "data.batch_size=32", f"precision={precision}"), cwd=root, timeout=600)
        assert two.returncode == 0, two.stderr
        one = run_cli("train", "--device", "cpu", "--out", str(root / f"one{suffix}"),
                      *sets(*COMMON, "data.batch_size=64", f"precision={precision}"), cwd=root, timeout=600,
                      env=ONE_THREAD)
        assert one.returncode == 0, one.stderr
        if precision == "fp64":
            stdout = two.stdout
    return root, stdout


def test_two_processes_batch_32_equal_one_process_batch_64(runs):
    root, stdout = runs
    # float64: the same sums in another order; measured 1.7e-16 (2026-11-30, 2-core AMD EPYC)
    assert _max_diff(root / "one", root / "two") < 1e-12
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["iterations"]) == (2, 64, 50)
    assert "global batch 64 (32 x 2 process(es))" in stdout
    assert stdout.count("done: test accuracy") == 1  # rank 0 alone reports ...
    assert sorted(p.name for p in (root / "two" / "snapshots").glob("*.pt")) == ["iter_00000040.pt",
                                                                                "iter_00000050.pt"]
    assert not list((root / "two" / "logs").rglob("danlu_failure.json"))  # ... and nobody failed


def test_in_float32_the_two_agree_to_rounding_relative_to_how_far_the_weights_moved(runs):
    """float32 rounds each sum to ~6e-8; the mean of two all-reduced batch-32 gradients and one batch-64 gradient
    (whose kernels may even pick other reduction orders for the other batch size) differ in their last bits, and
    50 SGD steps with momentum amplify that. Measured, as a share of how far the weights moved (0.105): 7e-5 on a
    2-core AMD EPYC (2026-11-30), 3.3e-3 on another 2-core machine (3.5e-4 absolute). A real fault (a rank on the
    wrong slice, gradients summed instead of averaged, an LR not scaled) moves the weights by a share near 1."""
    root, _ = runs
    moved = _moved(root / "one32")
    assert 0.01 < moved < 10  # training did move the weights
    assert _max_diff(root / "one32", root / "two32") < 1e-2 * moved


def test_evaluation_over_two_ranks_counts_each_of_1001_samples_once(runs):
    root, _ = runs
    two, one = _tests(root / "two"), _tests(root / "one")
    assert [e["samples"] for e in two] == [1001, 1001]
    for a, b in zip(two, one, strict=True):  # the same weights (to 1e-12) evaluated on 2 ranks and on 1
        assert a["acc"] == b["acc"] and a["top5"] == b["top5"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-9)
    r = run_cli("eval", str(root / "two"), "--device", "cpu", "--json", env=ONE_THREAD)  # one process
    assert r.returncode == 0, r.stderr
    alone = json.loads(r.stdout)
    assert alone["samples"] == 1001 and round(alone["acc"] * 1001) == round(two[-1]["acc"] * 1001)


def _interrupted_copy(root, name: str):
    """A copy of the 2-process run as if it had died right after its snapshot at iteration 40."""
    run = root / name
    shutil.copytree(root / "two", run)
    for f in ("snapshots/iter_00000050.pt", "snapshots/iter_00000050.pt.sha256", "model.safetensors",
              "summary.json"):
        (run / f).unlink(missing_ok=True)
    shutil.rmtree(run / "logs")
    return run


@pytest.mark.parametrize("procs", [1, 4])
def test_snapshot_from_two_processes_resumes_on_another_number(runs, procs):
    root, _ = runs
    run = _interrupted_copy(root, f"resumed_on_{procs}")
    r = run_cli("train", "--resume", str(run), *(["--procs", str(procs)] if procs > 1 else ["--device", "cpu"]),
                cwd=root, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "resumed at 40" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    # the global batch (64), the data position and the LR are the snapshot's: 1 x 64 or 4 x 16
    assert (summary["world_size"], summary["global_batch"], summary["iterations"]) == (procs, 64, 50)
    assert summary["recipe"]["data"]["batch_size"] == 64 // procs
    assert _max_diff(run, root / "two") < 1e-12  # float64: another number of processes, the same sums
    assert [e["iter"] for e in _tests(run)] == [25, 50]  # the log goes on where the snapshot left it


class _RaisesAtStep10(torch.nn.Module):
    """LeNet whose 10th training forward raises on rank 1 (an ordinary user-model bug)."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = danlu.create_model("lenet", num_classes=10, in_channels=1), 0

    def forward(self, x):
        self.calls += self.training
        if self.training and self.calls == 10 and os.environ.get("RANK") == "1":
            raise ValueError("boom at step 10 on rank 1")
        return self.net(x)


DIST_TIMEOUT_S = 300  # dist.timeout: how long a rank waits in a collective for a missing one before it gives up
# Past this the job would never end on its own (a rank left waiting gives up after DIST_TIMEOUT_S, and the launcher
# then stops the others): the watchdog kills the workers so that the test fails instead of hanging the suite. The
# job takes seconds; this is no bound on its speed.
HANG_S = 2 * DIST_TIMEOUT_S


@contextlib.contextmanager
def _watchdog(seconds: float):
    """Yields an Event, set (and this process's worker processes killed) if the block still runs after `seconds`."""
    import multiprocessing

    hung = threading.Event()

    def fire():
        hung.set()
        for p in multiprocessing.active_children():  # the launcher's workers (started from this process)
            os.kill(p.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield hung
    finally:
        timer.cancel()


def _train_raising(out: str) -> None:
    train, test = danlu.load_dataset("synthetic", train_size=512, test_size=64)
    danlu.train({"run": {"max_iter": 1000, "tensorboard": False}, "data": {"batch_size": 16},
                 "devices": {"device": "cpu"}, "dist": {"timeout": DIST_TIMEOUT_S}}, model=_RaisesAtStep10(),
                train_data=train, test_data=test, out=out, quiet=True)


def test_a_rank_raising_at_step_10_ends_the_job_instead_of_hanging(tmp_path):
    """Rank 1 raises in its 10th forward pass while rank 0 goes on into the step's gradient all-reduce, which
    rank 1 never joins. The job must end because rank 1 left (its process exits at once, so rank 0's collective
    fails on the closed connection, or the launcher stops rank 0), not because rank 0 waited out dist.timeout: no
    rank may report a collective that timed out. No clock is read: a job that hangs until the timeout fails on its
    reports, one that would never end is cut by the watchdog (HANG_S) and fails saying so."""
    from danlu.launch import WorkerFailed, run_workers

    with _watchdog(HANG_S) as hung:
        try:
            run_workers(_train_raising, str(tmp_path / "run"), procs=2, log_dir=tmp_path / "logs")
            error = None
        except Exception as raised:  # noqa: BLE001 - checked below, after the watchdog's verdict
            error = raised
    assert not hung.is_set(), (f"the job had not ended {HANG_S} s after it started, although rank 1 raised at step "
                               f"10 and any rank waiting for it gives up after {DIST_TIMEOUT_S} s: a rank hangs "
                               f"(its processes were killed)")
    assert isinstance(error, WorkerFailed), repr(error)
    raised = [json.loads(f.read_text()) for f in (tmp_path / "logs").rglob("danlu_failure.json")]
    assert [r for r in raised if r["rank"] == 1 and not r["peer"]]  # rank 1 recorded its own error
    waited = [r for r in raised if any(w in r["message"].lower() for w in ("timed out", "socket timeout"))]
    assert not waited, (f"rank {waited[0]['rank']} waited dist.timeout ({DIST_TIMEOUT_S} s) for rank 1, which "
                        f"had failed: the job hung instead of ending when rank 1 did: {waited[0]['message'][:300]}")
    message = str(error)
    assert "\n" not in message and error.rank == 1 and error.exit_code == 1
    assert message.startswith("rank 1 failed: ValueError: boom at step 10 on rank 1 (full traceback: ")
    assert "boom at step 10" in open(error.traceback_file).read()  # rank 0's "peer closed" error is not the cause


def test_sigterm_stops_every_rank_at_one_iteration_with_a_resumable_snapshot(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "danlu", "train", "--procs", "2", "--out", str(out),
                          *sets("model.name=lenet", "data.name=synthetic", "data.train_size=512", "optim.lr=0.01",
                                "data.test_size=64", "data.batch_size=16", "run.max_iter=100000", "run.display=10",
                                "run.snapshot_every=0", "run.tensorboard=false")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        for line in p.stdout:  # training is under way
            if line.startswith("[train]"):
                break
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    snaps = list((out / "snapshots").glob("iter_*.pt"))
    assert len(snaps) == 1 and int(snaps[0].stem.split("_")[1]) >= 10  # snapshot_every=0: only the stop's
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"danlu: stopped by SIGTERM at iteration {int(snaps[0].stem.split('_')[1])}; snapshot ")
    assert last.endswith(f"continue with: danlu train --resume {out} --procs 2")
    reports = [json.loads(f.read_text()) for f in (out / "logs").rglob("danlu_failure.json")]
    assert len(reports) == 2 and all(r["stopped"] for r in reports)  # both ranks stopped, at the same iteration:
    assert reports[0]["message"] == reports[1]["message"]  # (no rank failed in a collective the other left)


def test_launch_flags_refuse_bad_input(tmp_path, capsys):
    from danlu.cli import main

    cases = [(["--procs", "0"], "expected a number of processes >= 1"),
             (["--procs", "2", "--device", "cuda"], "--procs runs on cpu"),
             (["--max-restarts", "2"], "--max-restarts needs --procs or --gpus"),
             (["--procs", "2", "--gpus", "all"], "give one of --procs N"),
             (["--procs", "2", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'")]
    if not torch.cuda.is_available():
        cases.append((["--gpus", "all"], "no CUDA GPU on this machine"))
    for args, words in cases:
        assert main(["train", "--out", str(tmp_path / "never"), *args]) == 2, args
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "never").exists()  # nothing was started or written


def test_detect_reads_torchrun_and_slurm_variables():
    assert detect({}) is None
    t = detect({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (t.rank, t.world, t.local_rank, t.local_world, t.by) == (3, 8, 1, 2, "torchrun")
    s = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert (s.rank, s.world, s.local_rank, s.local_world, s.by, s.master_addr, s.master_port) == \
        (5, 8, 1, 4, "slurm", "gpu07", 24242)
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}) is None  # one task
    assert first_host("a1,b2") == "a1" and first_host("node-[3-4]") == "node-3"
    with pytest.raises(danlu.DanluError, match="RANK"):
        detect({"RANK": "one", "WORLD_SIZE": "2", "MASTER_ADDR": "n1"})


def test_one_process_starts_no_process_group_and_collectives_do_nothing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    d = distributed.setup(torch.device("cpu"))
    assert not d.grouped and not torch.distributed.is_initialized()
    t = torch.ones(3)
    model = torch.nn.Linear(2, 2)
    assert d.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert d.wrap(model, sync_bn=True) is model and d.any_rank(True) and not d.any_rank(False)
    assert d.broadcast_object("x") == "x" and Dist().is_main
    distributed.teardown()


def test_accumulating_2_micro_batches_of_32_equals_a_batch_of_64(tmp_path):
    train, test = danlu.load_dataset("synthetic", train_size=256, test_size=64)
    base = {"augment": "none", "optim": {"lr_scaling": "none"}, "devices": {"device": "cpu"}, "precision": "fp64",
            "run": {"max_iter": 10, "snapshot_every": 0, "seed": 1, "tensorboard": False}}
    results = []
    for batch, accumulate in ((64, 1), (32, 2)):
        recipe = {**base, "data": {"batch_size": batch}, "optim": {"lr_scaling": "none", "accumulate": accumulate}}
        torch.manual_seed(0)
        results.append(danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / f"a{accumulate}",
                                   quiet=True))
    a, b = (r.model.state_dict() for r in results)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-12  # float64: the same sums in another order
    assert results[1].summary["global_batch"] == 64 and results[1].iterations == 10


def test_linear_lr_scaling_warms_up_from_the_unscaled_lr(tmp_path):
    train, test = danlu.load_dataset("synthetic", train_size=512, test_size=64)
    recipe = {"data": {"batch_size": 16}, "optim": {"lr": 0.01, "accumulate": 4},  # global batch 64 = 4 x 16
              "schedule": {"policy": "fixed", "warmup": 4}, "devices": {"device": "cpu"},
              "run": {"max_iter": 6, "display": 1, "snapshot_every": 0, "tensorboard": False}}
    danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)
    lrs = [e["lr"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if e["kind"] == "train"]
    # Goyal et al.: 0.01 x 64/16 = 0.04, reached linearly from the unscaled 0.01 over 4 iterations
    assert lrs == pytest.approx([0.01, 0.0175, 0.025, 0.0325, 0.04, 0.04])
    resolved = json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"]["optim"]
    assert resolved["reference_batch"] == 16  # pinned, so a resume on another number of processes keeps the LR
