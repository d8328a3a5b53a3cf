"""Distributed: who this process is among how many, and the few collectives training needs.

    dist = setup(torch.device("cuda"), timeout=300)   # join the launcher's process group, if a launcher started us
    model = dist.wrap(model)                           # DDP under a launcher; the module itself otherwise
    dist.all_reduce_sum(sums)                          # in place; returns `sums` untouched in a single process

Who started this process decides the world (`detect`):

- danlu's own launcher (`danlu train --procs N` / `--gpus ...`, see danlu.launch), torchrun, or a Kubernetes
  PyTorchJob: torch's variables RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  (plus TORCHELASTIC_* under torch's elastic agent).
- SLURM's srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID and the node list; the first node
  of the step is the rendezvous host and MASTER_PORT, unless set, is 20000 + SLURM_JOB_ID % 10000.
- none of these: one process, no process group, and every collective is a no-op. The loop calls the collectives
  unconditionally and never branches on world size.

Backend: NCCL on CUDA, where each process takes cuda:LOCAL_RANK; gloo on the CPU. The recipe's `dist.timeout` bounds
how long a collective waits for a rank that died or hangs: the others then fail too, and the job ends instead of
hanging (NCCL: with TORCH_NCCL_ASYNC_ERROR_HANDLING, set here unless the user set it).

Who is gone when a collective fails: the error itself does not say (gloo names a socket address, or only that it
timed out). So each rank writes where it runs (host, node, pid) into the job's key-value store when it joins, and
beats there every HEARTBEAT seconds from a thread of its own; after a failed collective, every rank that saw the
failure answers a roll call (`Dist.roll_call`). A rank that neither answers nor beats is lost (its process or node is
gone); one that beats but does not answer after a timeout is stuck; one that beats and does not answer after a closed
connection is only blocked behind another failing rank. The store lives with rank 0's node (torchrun's agent on node
0, rank 0 itself under env:// and SLURM, danlu's launcher for --procs), so a store that is gone too means rank 0's
node is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
from torch import nn

from danlu.errors import DanluError

# seconds between a rank's heartbeats in the job's store (what tells a roll call dead from alive); each costs the
# store's host one small write and one connection (the probe) per rank
HEARTBEAT = 1.0


@dataclass(frozen=True)
class Launch:
    """What a launcher told this process about the job."""
    rank: int
    world: int
    local_rank: int  # index among the processes on this machine: the GPU it takes
    local_world: int  # processes on this machine
    by: str  # "torchrun" (torch's elastic agent: danlu --procs/--gpus, torchrun), "env" (RANK/... set), "slurm"
    master_addr: Optional[str] = None  # SLURM only: the rendezvous host (torch's launchers export MASTER_ADDR)
    master_port: Optional[int] = None


def detect(environ: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The launch this process is part of, from its environment; None for a process nobody launched.

    >>> detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    Launch(rank=1, world=2, local_rank=1, local_world=2, by='env', master_addr=None, master_port=None)
    """
    env = os.environ if environ is None else environ
    try:
        if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= env.keys():
            world = int(env["WORLD_SIZE"])
            return Launch(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                          int(env.get("LOCAL_WORLD_SIZE", str(world))),
                          "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        if "SLURM_PROCID" in env:
            world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
            if world < 2:  # a one-task job (or a batch script outside srun) is a single process
                return None
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodes and "MASTER_ADDR" not in env:
                raise DanluError("SLURM: SLURM_PROCID is set but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to "
                                 "find the rendezvous host; set MASTER_ADDR")
            # tasks per node: '4' or '4(x2)' (4 on each of 2 nodes); the first figure is this node's share
            per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
            port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 10000)
            return Launch(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")),
                          int(per_node.group()) if per_node else world, "slurm",
                          env.get("MASTER_ADDR") or first_host(nodes or ""), int(port))
    except (KeyError, ValueError) as e:
        raise DanluError(f"launch environment: cannot read the rank and world size ({type(e).__name__}: {e}); "
                         f"expected integer RANK, WORLD_SIZE, LOCAL_RANK (torchrun) or SLURM_PROCID, "
                         f"SLURM_NTASKS, SLURM_LOCALID (srun)") from None
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (as `scontrol show hostnames` | head -1)."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise DanluError(f"SLURM node list {nodelist!r}: expected host names such as node[01-04],gpu7")
    first = (m.group(2) or "").split(",")[0].split("-")[0]
    return m.group(1) + first


@dataclass
class Dist:
    """This process's place in the job. `Dist()` is a single process: every collective returns at once."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grouped: bool = False  # a process group exists (a launcher started us), even at world size 1 (`--gpus 1`)
    bucket_mb: float = 25.0
    timeout: float = 300.0  # dist.timeout: seconds a collective waits for a missing rank
    _control: Any = field(default=None, repr=False)  # gloo group on the CPU for agreement (no device sync)
    _pending: Any = field(default=None, repr=False)  # (work, flag) of the last any_rank() all-reduce
    _store: Any = field(default=None, repr=False)  # this job's keys in the launcher's store (roll_call)
    _heart: Any = field(default=None, repr=False)  # threading.Event that stops the heartbeat thread

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all ranks, in place (t on this rank's device)."""
        if self.grouped:
            torch.distributed.all_reduce(t)
        return t

    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """The module to train: DDP under a launcher (parameters and buffers broadcast from rank 0 as it is built,
        gradients averaged in `bucket_mb` buckets while backward runs), else `model` itself. `sync_bn` turns every
        BatchNorm into SyncBatchNorm (statistics over the global batch; CUDA only). The returned module shares
        `model`'s parameters and buffers, so `model` is what to save."""
        if not self.grouped:
            return model
        if sync_bn:
            if self.device.type != "cuda":
                raise DanluError("model.sync_bn=true: SyncBatchNorm needs GPUs (NCCL); on the CPU set "
                                 "model.sync_bn=false")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.bucket_mb,
                                                   gradient_as_bucket_view=True)

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """With `skip`, a backward inside the block only accumulates gradients locally (DDP's no_sync): gradient
        accumulation all-reduces once, at its last micro-batch."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def any_rank(self, flag: bool) -> bool:
        """Whether any rank has passed flag=True, the same answer on every rank. Call it at the same points on every
        rank (e.g. once an iteration). One process: `flag` itself. Several: the answer to the previous call, from a
        non-blocking all-reduce on the CPU, so asking costs no device sync and no wait; a request (a stop signal)
        then takes effect one iteration late, at the same iteration on every rank."""
        if not self.grouped:
            return flag
        agreed = False
        if self._pending is not None:
            work, t = self._pending
            work.wait()
            agreed = bool(t.item() > 0)
        t = torch.tensor([1.0 if flag else 0.0])  # (1,) on the CPU
        self._pending = (torch.distributed.all_reduce(t, group=self._control, async_op=True), t)
        return agreed

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank, e.g. the run folder rank 0 named."""
        if not self.grouped:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank; one process: [obj]."""
        if not self.grouped:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self._control)
        return out

    def barrier(self) -> None:
        if self.grouped:
            torch.distributed.barrier(group=self._control)

    def roll_call(self, iteration: Optional[int], timed_out: bool) -> Optional[dict[str, dict[int, dict]]]:
        """After a collective failed on this rank (`timed_out`: it waited dist.timeout; else a peer's connection
        closed): answer, watch the others for 3 heartbeats, and return {"lost": ..., "stuck": ...}, each
        {rank: {"host", "node", "pid"}} ({} where a rank never said). Lost: no answer and no heartbeat, or answered
        and already left (it failed before this rank). Stuck (after a timeout only): beats but does not answer.
        None when the store is gone too: it lives with rank 0's node, so that node is the one lost.

        The others that saw the same failure answer within the watch (at once after a closed connection, within a
        step of each other after a timeout: they all waited from the same collective); a rank blocked behind a
        failing one beats, so it is never named."""
        if not self.grouped or self._store is None:
            return {"lost": {}, "stuck": {}}
        s, others = self._store, [r for r in range(self.world) if r != self.rank]
        try:
            s.set(f"here/{self.rank}", str(iteration))
            left = {r for r in others if s.check([f"left/{r}"])}
            first = {r: self._beats(r) for r in others}
            deadline = time.monotonic() + 3 * HEARTBEAT
            while time.monotonic() < deadline:
                silent = {r for r in others if r not in left and not s.check([f"here/{r}"])}
                if not silent:
                    break
                time.sleep(0.1)
            dead = {r for r in silent if self._beats(r) == first[r]}
            stuck = silent - dead if timed_out else set()
            call = {"lost": {r: self._who(r) for r in sorted(left | dead)},
                    "stuck": {r: self._who(r) for r in sorted(stuck)}}
            s.set(f"left/{self.rank}", "")
            return call
        except (RuntimeError, ValueError, OSError):  # torch's store errors (DistStoreError, DistNetworkError) are
            return None                                # RuntimeErrors: the store's host is gone

    def _beats(self, rank: int) -> Optional[bytes]:
        return self._store.get(f"beat/{rank}") if self._store.check([f"beat/{rank}"]) else None

    def _who(self, rank: int) -> dict[str, Any]:
        """Where `rank` said it runs when it joined: host, node (None on one machine), pid; {} if it never said."""
        return json.loads(self._store.get(f"who/{rank}")) if self._store.check([f"who/{rank}"]) else {}


_current: Optional[Dist] = None


def setup(device: torch.device, timeout: float = 300.0, bucket_mb: float = 25.0) -> Dist:
    """This process's Dist. Under a launcher: join its process group (once per process; NCCL on CUDA, where the
    process takes cuda:LOCAL_RANK, gloo on the CPU) with `timeout` seconds for every collective. Otherwise a
    single-process Dist on `device` and nothing is initialised."""
    global _current
    launch = detect()
    if launch is None:
        _current = Dist(device=device, bucket_mb=bucket_mb)
        return _current
    if device.type == "mps":
        raise DanluError(f"--device mps: one process only (Apple's GPU has no process-group backend), this job has "
                         f"{launch.world}; expected --device cpu for several processes")
    if device.type == "cuda":
        # one GPU per process; under srun --gpus-per-task each process may see only its own GPU
        device = torch.device("cuda", launch.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if _current is not None and _current.grouped and torch.distributed.is_initialized():
        _current.bucket_mb, _current.timeout = bucket_mb, timeout
        return _current  # a second danlu.train() in the same worker reuses the group
    if launch.by == "slurm":  # torch's launchers export these; srun does not
        os.environ.setdefault("MASTER_ADDR", launch.master_addr or "")
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL collective ends the process
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world))  # no oversubscribed cores
    backend = "nccl" if device.type == "cuda" else "gloo"
    wait = timedelta(seconds=timeout)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, init_method="env://", rank=launch.rank,
                                             world_size=launch.world, timeout=wait,
                                             device_id=device if device.type == "cuda" else None)
    control = torch.distributed.new_group(backend="gloo", timeout=wait) if backend == "nccl" else None
    store, heart = _job_store(launch, control)
    _current = Dist(launch.rank, launch.world, launch.local_rank, device, grouped=True, bucket_mb=bucket_mb,
                    timeout=timeout, _control=control, _store=store, _heart=heart)
    return _current


def _job_store(launch: Launch, control: Any) -> tuple[Any, threading.Event]:
    """This job's own keys in the store the process group met through (MASTER_ADDR:MASTER_PORT, which every
    launcher exports before init_process_group returns), with this rank's host, node and pid written under
    who/RANK, and its heartbeat thread started; returns (the store, the Event that stops the heartbeat). The keys
    are under a name rank 0 draws for this group, so a restarted job (torchrun keeps the store and may keep its
    restart count across a change of nodes) never reads an earlier group's answers."""
    from torch.distributed import PrefixStore, TCPStore

    name = [uuid.uuid4().hex[:12]]  # (1,): rank 0's draw, the same on every rank after the broadcast
    torch.distributed.broadcast_object_list(name, src=0, group=control)
    host, port, prefix = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), f"danlu/{name[0]}/"
    store = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10)))
    node = os.environ.get("GROUP_RANK") if launch.by == "torchrun" else os.environ.get("SLURM_NODEID")
    several = int(os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("SLURM_NNODES") or "1") > 1
    store.set(f"who/{launch.rank}", json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "node": int(node) if node and several else None}))
    store.set(f"beat/{launch.rank}", "0")
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(host, port, prefix, launch.rank, stop), daemon=True,
                     name="danlu-heartbeat").start()
    return store, stop


def _heartbeat(host: str, port: int, prefix: str, rank: int, stop: threading.Event) -> None:
    """Every HEARTBEAT seconds, count one more beat under beat/RANK, until `stop` or the store is gone. Its own
    connection, on its own thread: it beats while the main thread waits in a collective or is stuck in user code.
    A plain socket probes the store first and the thread ends quietly when it is gone: a TCPStore call on a dead
    store writes a C++ stack trace to the console."""
    from torch.distributed import PrefixStore, TCPStore

    try:
        store = PrefixStore(prefix, TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10)))
        beats = 0
        while not stop.wait(HEARTBEAT):
            socket.create_connection((host, port), timeout=HEARTBEAT).close()
            beats += 1
            store.set(f"beat/{rank}", str(beats))
    except (RuntimeError, ValueError, OSError):  # the store's host is gone: so is the heartbeat
        return


def current() -> Dist:
    """The Dist `setup` made in this process (a single-process Dist before that)."""
    return _current if _current is not None else Dist()


def teardown() -> None:
    """Leave the process group (at the end of a worker); nothing in a single process."""
    global _current
    if _current is not None and _current._heart is not None:
        _current._heart.set()
    if _current is not None and _current.grouped and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = None
