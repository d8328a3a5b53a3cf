"""Many machines, on one: torchrun agents ("nodes") on 127.0.0.1 that meet through c10d rendezvous, on the CPU with
gloo, and what danlu does when a node is lost or a rank stops answering.

Not tests/test_launch.py: that file checks launch.py's decisions without starting a process, in a second; these start
real torchrun agents and workers (danlu.launch, danlu.engine.distributed and the elastic agent together).

Determinism without clocks: the rendezvous store is a TCPStore this test process hosts on a port the server picks
(port 0), so no port is chosen early and the store outlives any node; a node is killed only when both workers wait
at a gate right after the snapshot at iteration GATE_AT (this file, run as a script by torchrun, is `danlu` with that
gate), so the kill lands at a known iteration however fast the machine is. The only waits are generous timeouts
that a hang alone reaches.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GATE_AT = 20  # the iteration the nodes wait at, after its snapshot, for the test to kill one


def _gated_danlu() -> int:
    """`danlu ARGS` as a torchrun worker, with two holds the test needs (first attempt only; restarted and
    replacement workers run plain danlu):
    - a worker whose rendezvous formed without the other node (it started a few seconds later) waits to be
      restarted with it, so that the job always starts with 2 nodes;
    - after the snapshot at iteration GATE_AT, each worker writes gate/ready.RANK ('AGENT_PID WORKER_PID') and
      waits for gate/go."""
    from danlu.engine import faults

    gate, first = Path(os.environ["DANLU_TEST_GATE"]), os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    if first and not gate.joinpath("go").exists() and int(os.environ["WORLD_SIZE"]) < 2:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # the agent restarts us when the other node joins
        time.sleep(300)
        return 1
    after = faults.Guard.after

    def gated_after(self, save, max_iter, run_dir):
        save_then_stop = after(self, save, max_iter, run_dir)

        def save_then_wait(it, loop_state):
            save_then_stop(it, loop_state)
            if first and it == GATE_AT and not gate.joinpath("go").exists():
                gate.joinpath(f"ready.{os.environ['RANK']}").write_text(f"{os.getppid()} {os.getpid()}")
                for _ in range(3000):  # at most 300 s: a test that died must not leave a worker behind forever
                    if gate.joinpath("go").exists():
                        break
                    time.sleep(0.1)
        return save_then_wait

    faults.Guard.after = gated_after
    from danlu.cli import main

    return main(sys.argv[1:])


if __name__ == "__main__":  # torchrun runs this file as each node's worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(_gated_danlu())

import json  # noqa: E402 - the worker above needs none of the test's imports

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import ROOT, run_cli, sets  # noqa: E402

# LeNet on 512 synthetic digits: 8 global batches of 64 an epoch
TINY = ["model.name=lenet", "data.name=synthetic", "data.train_size=512", "data.test_size=128", "augment=none",
        "run.seed=3", "run.tensorboard=false", "run.test_interval=100000"]
# c10d rendezvous on the test's store: the survivor of a lost node forms the next round 1 s after it asks (not
# torchrun's 30 s), once the lost node's heartbeat (every 1 s) has been missing for 5 s
RDZV_CONF = "is_host=false,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=5"
LONG = 300  # seconds: only a hang waits this long


@pytest.fixture
def store():
    """The rendezvous server: a TCPStore in this process on a port it picks itself."""
    from torch.distributed import TCPStore

    s = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    yield s
    del s


class _Nodes:
    """torchrun agents, each in its own session with its output in NAME.log; every one is killed at the end."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.agents = root, port, {}
        (root / "gate").mkdir()

    def start(self, name: str, nnodes: str, *args: str, gated: bool = True) -> subprocess.Popen:
        worker = [str(Path(__file__).resolve())] if gated else ["-m", "danlu"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
               "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}",
               "--rdzv-id", "job", "--rdzv-conf", RDZV_CONF, *worker, "train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "DANLU_TEST_GATE": str(self.root / "gate")}
        with open(self.root / f"{name}.log", "w") as log:
            self.agents[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                                 start_new_session=True)
        return self.agents[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait(self, name: str) -> int:
        try:
            return self.agents[name].wait(timeout=LONG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {name} still runs after {LONG} s:\n{self.tails()}")

    def at_gate(self) -> dict[int, tuple[int, int]]:
        """{rank: (agent pid, worker pid)} once both workers wait at the gate."""
        gate = self.root / "gate"
        for _ in range(LONG * 10):
            ready = {int(p.suffix[1:]): tuple(map(int, p.read_text().split())) for p in gate.glob("ready.*")}
            if len(ready) == 2 and all(len(v) == 2 for v in ready.values()):
                return ready
            if any(a.poll() is not None for a in self.agents.values()):
                pytest.fail(f"a node ended before the gate:\n{self.tails()}")
            time.sleep(0.1)
        pytest.fail(f"the workers did not reach iteration {GATE_AT} in {LONG} s:\n{self.tails()}")

    def kill(self, pids: tuple[int, int]) -> str:
        """SIGKILL a node (its agent and its worker); returns the node's name."""
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return next(n for n, a in self.agents.items() if a.pid == pids[0])

    def open_gate(self) -> None:
        (self.root / "gate" / "go").touch()

    def tails(self) -> str:
        return "\n".join(f"--- {n}.log\n" + "\n".join(self.log(n).splitlines()[-15:]) for n in self.agents)

    def close(self) -> None:
        for a in self.agents.values():
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)  # the agent's session: its workers too
                a.wait()


@pytest.fixture
def nodes(tmp_path, store):
    n = _Nodes(tmp_path, store.port)
    yield n
    n.close()


def _train_events(run: Path) -> list[int]:
    return [e["iter"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if e["kind"] == "train"]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def _one_line(log: str, start: str) -> str:
    lines = [ln for ln in log.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, log
    return lines[0]


def test_two_torchrun_nodes_equal_one_process_with_twice_the_batch_in_float64(nodes, tmp_path):
    exact = sets(*TINY, "run.max_iter=30", "run.display=10", "run.snapshot_every=0", "optim.lr_scaling=none",
                 "precision=fp64")
    for name in ("a", "b"):
        nodes.start(name, "2", "--out", str(tmp_path / "two"), "--device", "cpu", *exact, "--set",
                    "data.batch_size=32", gated=False)
    one = run_cli("train", "--procs", "1", "--out", str(tmp_path / "one"), *exact, "--set", "data.batch_size=64",
                  env={"OMP_NUM_THREADS": "1"}, timeout=LONG)
    assert one.returncode == 0, one.stderr
    assert [nodes.wait(n) for n in ("a", "b")] == [0, 0], nodes.tails()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["iterations"]) == (2, 64, 30)
    # float64: the same sums in another order (measured 1.1e-16, 2026-12-07, 2-core AMD EPYC)
    assert _max_diff(tmp_path / "one", tmp_path / "two") < 1e-10


GATED = [*TINY, "data.batch_size=32", "run.max_iter=40", "run.display=5", f"run.snapshot_every={GATE_AT // 2}"]


def test_elastic_job_loses_a_node_and_the_other_finishes_alone_with_the_same_global_batch(nodes, tmp_path):
    run = tmp_path / "run"
    for name in ("a", "b"):
        nodes.start(name, "1:2", "--out", str(run), "--device", "cpu", *sets(*GATED))
    ready = nodes.at_gate()
    lost = nodes.kill(ready[1])  # rank 1's node: its agent and its worker
    nodes.open_gate()
    survivor = "a" if lost == "b" else "b"
    assert nodes.wait(survivor) == 0, nodes.tails()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["iterations"]) == (1, 64, 40)
    assert _train_events(run) == list(range(5, 41, 5))  # one run: nothing lost, nothing logged twice
    log = nodes.log(survivor)
    line = _one_line(log, "danlu: lost ")
    assert line.startswith(f"danlu: lost rank 1 (host {os.uname().nodename}, node 1, pid {ready[1][1]}) after "
                           f"iteration {GATE_AT}: its connection closed (rank 0 of 2 noticed); restarting from "
                           f"snapshot iter_{GATE_AT:08d}.pt (restart 1 of 3) (full traceback: {run}/logs/job/"), line
    traceback_file = Path(line.rsplit("(full traceback: ", 1)[1].rstrip(")"))
    assert "gloo" in traceback_file.read_text()  # torch's traceback went to the run's logs/ ...
    assert "Traceback" not in log and "[rank0]" not in log  # ... not to the console
    assert f"resumed at {GATE_AT}" in log


def test_fixed_size_job_waits_for_a_replacement_when_rank_0s_node_is_lost(nodes, tmp_path):
    run = tmp_path / "run"
    args = ["--out", str(run), "--device", "cpu", *sets(*GATED)]
    for name in ("a", "b"):
        nodes.start(name, "2", *args)
    ready = nodes.at_gate()
    lost = nodes.kill(ready[0])  # rank 0's node: rank 0 writes the run folder, its agent keeps the job's store
    nodes.open_gate()
    survivor = "a" if lost == "b" else "b"
    for _ in range(LONG * 10):  # the survivor says what it lost, then waits for a second node
        if "danlu: lost " in nodes.log(survivor) or nodes.agents[survivor].poll() is not None:
            break
        time.sleep(0.1)
    line = _one_line(nodes.log(survivor), "danlu: lost ")
    assert line.startswith(f"danlu: lost rank 0's node (the job's store, which it kept, is gone too) after "
                           f"iteration {GATE_AT}: its connection closed (rank 1 of 2 noticed); restarting from "
                           f"snapshot iter_{GATE_AT:08d}.pt (restart 1 of 3)"), line
    assert "Traceback" not in nodes.log(survivor) and "TCPStore" not in nodes.log(survivor)  # torch's: in logs/
    assert nodes.agents[survivor].poll() is None, nodes.tails()  # waiting: a fixed-size job does not go on alone
    nodes.start("c", "2", *args)  # the replacement: the same command
    assert [nodes.wait(n) for n in (survivor, "c")] == [0, 0], nodes.tails()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["iterations"]) == (2, 64, 40)
    assert _train_events(run) == list(range(5, 41, 5))
    assert f"resumed at {GATE_AT}" in nodes.log(survivor) + nodes.log("c")


# ---------------------------------------------------------------- a rank that stops answering

STALL_AT = 12  # the training forward (1-based) at which rank 1 stalls: 11 iterations are done by then


def _stall_rank_1(module, inputs):
    """Forward pre-hook: rank 1's STALL_AT-th training forward waits until rank 0 has given up on it (rank 0's
    failure report is written), so it is stuck for longer than dist.timeout however fast the machine is, and for
    no longer than needed (at most 300 s)."""
    module.calls = getattr(module, "calls", 0) + module.training
    if os.environ.get("RANK") == "1" and module.training and module.calls == STALL_AT:
        rank0 = Path(os.environ["TORCHELASTIC_ERROR_FILE"]).parent.parent / "0" / "danlu_failure.json"
        for _ in range(3000):
            if rank0.exists():
                break
            time.sleep(0.1)


def _train_stalling(out: str, resume: bool = False) -> None:
    """LeNet on synthetic digits with dist.timeout 3 s, rank 1 stalling (not when resumed)."""
    import danlu

    model = danlu.create_model("lenet", num_classes=10, in_channels=1)
    if resume:
        danlu.train(resume=out, model=model, quiet=True)
        return
    model.register_forward_pre_hook(_stall_rank_1)
    recipe = {"data": {"name": "synthetic", "train_size": 512, "test_size": 128, "batch_size": 32},
              "augment": "none", "dist": {"timeout": 3}, "devices": {"device": "cpu"},
              "run": {"max_iter": 20, "snapshot_every": 5, "display": 5, "test_interval": 100000,
                      "tensorboard": False}}
    danlu.train(recipe, model=model, out=out, quiet=True)


def test_a_rank_that_stops_answering_is_named_at_dist_timeout_and_the_run_resumes(tmp_path):
    from danlu.launch import WorkerFailed, run_workers

    run = tmp_path / "run"
    with pytest.raises(WorkerFailed) as e:
        run_workers(_train_stalling, str(run), procs=2, log_dir=tmp_path / "logs")
    line = str(e.value)
    assert "\n" not in line and e.value.rank == 1, line
    assert line.startswith(f"rank 1 (host {os.uname().nodename}, pid ") and line.split(")", 1)[1].startswith(
        " stuck: alive but no answer for 3 s (dist.timeout) after iteration 11 (rank 0 of 2 gave up waiting) "
        "(full traceback: "), line
    assert "Timed out" in Path(e.value.traceback_file).read_text()  # gloo's own words, in the log
    assert sorted(p.name for p in (run / "snapshots").glob("*.pt")) == ["iter_00000005.pt", "iter_00000010.pt"]
    run_workers(_train_stalling, str(run), True, procs=2)  # the newest snapshot resumes (no stall this time)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["iterations"]) == (2, 20)
    assert _train_events(run) == [5, 10, 15, 20]
