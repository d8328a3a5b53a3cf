"""Launching: one process per GPU (`danlu train --gpus all|N|0,2`, NCCL) or N processes on the CPU (`--procs N`,
gloo), started and watched by torch's own elastic launcher (torch.distributed.launcher.api.elastic_launch, the
engine under torchrun), not by a home-made process manager.

    from danlu.launch import run_workers
    rates = run_workers(measure, config, procs=2)     # measure(config) in 2 fresh processes -> [rank 0's, rank 1's]

Each worker process finds its rank in its environment (danlu.engine.distributed.detect), as it would under torchrun
or SLURM: there danlu does not launch anything, it joins.

A failure never hangs the job: when a worker raises or dies, the launcher stops the others at once and
`run_workers` raises WorkerFailed with one line: which rank, its error, and the file holding its full traceback.
SIGTERM or Ctrl-C reaches every worker (each stops at an iteration boundary with a snapshot, where the run has a
stop handler) and `run_workers` raises Interrupted. `max_restarts` restarts all workers after a failure (the
elastic launcher's restarts); `danlu train` then resumes each restart from the run's newest snapshot.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

from danlu.errors import DanluError, Stopped

FAILURE_FILE = "danlu_failure.json"  # written by a failing worker beside torch's error.json
TRACEBACK_FILE = "traceback.txt"
TORCH_LOG_FILE = "torch.log"  # what torch's C++ code wrote while a failed rank held its roll call


class WorkerFailed(Exception):
    """A worker process failed (not bad input: that is a DanluError). The message is one line; `exit_code` is 1."""

    def __init__(self, message: str, rank: Optional[int] = None, traceback_file: Optional[str] = None):
        super().__init__(message)
        self.rank, self.traceback_file, self.exit_code = rank, traceback_file, 1


class Interrupted(Exception):
    """SIGTERM / SIGINT stopped the job. `exit_code` = 128 + the signal; the message is the workers' own (which
    iteration, which snapshot) where they said it."""

    def __init__(self, signum: int, message: Optional[str] = None):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum, self.exit_code = signum, 128 + signum


def process_count(procs: Optional[int] = None, gpus: Optional[str] = None) -> tuple[int, Optional[str]]:
    """(processes, CUDA_VISIBLE_DEVICES for them or None) for `--procs N` or `--gpus all|N|0,2`."""
    if (procs is None) == (gpus is None):
        raise DanluError("give one of --procs N (CPU processes) or --gpus all|N|0,2 (one process per GPU)")
    if procs is not None:
        if procs < 1:
            raise DanluError(f"--procs {procs}: expected a number of processes >= 1")
        return procs, None
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        raise DanluError(f"--gpus {gpus}: no CUDA GPU on this machine; use --procs N for CPU processes")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",")] if visible else [str(i) for i in range(have)]
    spec = gpus.strip().lower()
    if spec == "all":
        chosen = list(range(have))
    elif spec.isdigit():
        if not 1 <= int(spec) <= have:
            raise DanluError(f"--gpus {gpus}: this machine has {have} GPU(s); expected 1..{have}, all, or a list")
        chosen = list(range(int(spec)))
    else:
        try:
            chosen = [int(s) for s in spec.split(",")]
        except ValueError:
            raise DanluError(f"--gpus {gpus}: expected all, a count (4), or GPU indices (0,2)") from None
        bad = [i for i in chosen if not 0 <= i < have]
        if bad or len(set(chosen)) != len(chosen):
            raise DanluError(f"--gpus {gpus}: expected distinct GPU indices in 0..{have - 1}")
    return len(chosen), ",".join(ids[i] for i in chosen)


def run_workers(fn: Callable[..., Any], *args: Any, procs: Optional[int] = None, gpus: Optional[str] = None,
                max_restarts: int = 0, timeout: float = 300.0,
                log_dir: Union[str, Path, None] = None) -> list[Any]:
    """Run `fn(*args)` in `procs` fresh processes (CPU) or one per GPU of `gpus` ('all', '4', '0,2'), joined into
    one job by torch's elastic launcher, and return their return values, rank 0's first. `fn` must be importable
    (a module-level function) and `args` and the results picklable. Inside `fn`, `danlu.train(...)` (or
    `danlu.engine.distributed.setup(device)`) joins the process group; the group is left when `fn` returns.

    `timeout`: seconds for the processes to meet. `log_dir`: where each attempt's per-rank error files go
    (default a temporary folder, removed after success). Raises WorkerFailed (a worker raised or died: one line
    naming the rank, its error and the traceback file), DanluError (a worker met bad input), Interrupted."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n, visible = process_count(procs, gpus)
    temporary = log_dir is None
    root = Path(tempfile.mkdtemp(prefix="danlu-launch-")) if temporary else Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"danlu-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone: a free local port
        rdzv_configs={"timeout": max(1, int(timeout))}, max_restarts=max_restarts, monitor_interval=0.1,
        start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(root)),
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")  # SIGINT is ours: see _signals_stop_workers
    threads = str(max(1, (os.cpu_count() or 1) // n))  # torchrun sets 1; a CPU worker may use its share of cores
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), "CUDA_VISIBLE_DEVICES": visible,
           "TORCHELASTIC_SIGNALS_TO_HANDLE": None}  # None: not set here, but what the launcher sets is undone after
    with _environment(env), _quiet_launcher(), _signals_stop_workers() as received:
        try:
            results = elastic_launch(config, _worker)(fn, args)
        except ChildFailedError as e:
            raise _root_cause(e, _reports(root)) from None
        except SignalException:
            said = [r for r in _reports(root) if r.get("stopped")]
            raise Interrupted(received[0] or signal.SIGTERM, said[0]["message"] if said else None) from None
    if temporary:
        shutil.rmtree(root, ignore_errors=True)
    if received[0]:
        raise Interrupted(received[0])
    return [results[r] for r in sorted(results)]


def _worker(fn: Callable[..., Any], args: tuple) -> Any:
    """Runs in each worker process: fn(*args), then leave the process group. On an exception, record it (for the
    launcher's one-line report) and exit at once: a worker whose peers are gone must not wait in a collective or
    abort noisily in the process group's destructor."""
    from danlu.engine import distributed

    try:
        result = fn(*args)
    except Stopped as e:  # a signal, at an iteration boundary, after the snapshot: say so and leave at once (the
        _record_failure(e)  # launcher is shutting down and will not read a return value)
        os._exit(e.exit_code)
    except SystemExit as e:
        if e.code in (0, None):
            result = None
        else:
            _record_failure(e)
            os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, then the process ends
        report = _record_failure(e)
        restarts_left = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        if report and restarts_left and not isinstance(e, DanluError):  # the job goes on: nobody else will say why
            _say(report)
        os._exit(2 if isinstance(e, DanluError) else 1)
    distributed.teardown()
    return result


def _record_failure(e: BaseException, folder: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """Write torch's error.json (what the elastic launcher reads), our traceback.txt and danlu_failure.json (rank,
    precise time, whether the error only reports a peer that is gone and, if so, who is: `lost`) into `folder`
    (default: this worker's log folder under the launcher). Returns the report; None (the traceback printed) where
    no launcher gave a folder."""
    sys.stdout.flush()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if folder is None and not error_file:
        traceback.print_exc()
        return None
    folder = folder if folder is not None else Path(error_file).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRACEBACK_FILE).write_text("".join(traceback.format_exception(e)))
    iteration, run_dir = _failure_point(e)
    report = {"rank": _my_rank(), "time": time.time(), "type": type(e).__name__,
              "message": str(e), "peer": _is_peer_failure(e), "user_error": isinstance(e, DanluError),
              "stopped": isinstance(e, Stopped), "signum": getattr(e, "signum", None),
              "traceback": str(folder / TRACEBACK_FILE), "iteration": iteration,
              "run_dir": str(run_dir) if run_dir else None}
    lost = None
    if report["peer"]:
        with _stderr_to(folder / TORCH_LOG_FILE):  # the roll call meets the dead peer's sockets: torch's C++
            lost = _lost(e, iteration)              # warnings about them (20-odd lines each) go to the log
    if lost is not None:
        report["lost"], report["missing"] = lost
    (folder / FAILURE_FILE).write_text(json.dumps(report))
    if error_file and isinstance(e, Exception):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    sys.stderr.flush()
    return report


def _say(report: dict[str, Any]) -> None:
    """The one line a failed rank prints itself: who is lost (or its own error) and what happens next."""
    restart, most = (int(os.environ.get(k, "0")) for k in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"))
    print(f"danlu: {_what_failed(report)}; {_what_next(report, restart, most)} (full traceback: "
          f"{report['traceback']})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Within the block, this process's file descriptor 2 (where torch's C++ code writes) appends to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _lost(e: BaseException, iteration: Optional[int]) -> Optional[tuple[str, Optional[list[int]]]]:
    """(the one line, the ranks that did not answer: None if unknown) for a collective that failed because another
    rank is gone or stuck: the roll call names it. None before this rank joined the group (nobody to call)."""
    from danlu.engine import distributed
    from danlu.engine.faults import lost_ranks

    dist = distributed.current()
    if not dist.grouped:
        return None
    timed_out = any(w in str(e).lower() for w in ("timed out", "timeout"))
    call = dist.roll_call(iteration, timed_out)
    return (lost_ranks(call, rank=dist.rank, world=dist.world, iteration=iteration, timed_out=timed_out,
                       timeout=dist.timeout), sorted({**call["lost"], **call["stuck"]}) if call is not None else None)


def _what_failed(report: dict[str, Any]) -> str:
    """A failure report in a few words: who is lost (a peer failure), else this rank's own error."""
    if report.get("lost"):
        return report["lost"]
    return f"rank {report['rank']} failed: {report['type']}: {_first_line(report['message'])}"


def _what_next(report: dict[str, Any], restart: int, most: int) -> str:
    """Where a run goes from here: restarted by the launcher from the newest snapshot, or resumed by hand."""
    snap = _newest_snapshot(report.get("run_dir"))
    if restart < most:
        start = f"from snapshot {snap.name}" if snap else "from the start (no snapshot yet)"
        return f"restarting {start} (restart {restart + 1} of {most})"
    if snap:
        return f"continue from snapshot {snap.name} with: danlu train --resume {report['run_dir']}"
    return "no snapshot was written: start the run again"


def _newest_snapshot(run_dir: Optional[str]) -> Optional[Path]:
    from danlu.engine.checkpoint import snapshots

    found = snapshots(Path(run_dir) / "snapshots") if run_dir else []
    return found[-1] if found else None


def _failure_point(e: BaseException) -> tuple[Optional[int], Optional[Path]]:
    """(iterations done, run folder) when `e` was raised inside danlu.train: read from the frames it passed through
    (the training loop's `it`, danlu.train's `run_dir`), since a collective's error knows neither. (None, None)
    outside training."""
    iteration, run_dir = None, None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        where = (frame.f_globals.get("__name__"), frame.f_code.co_name)
        if where == ("danlu.engine.loop", "train_loop"):
            iteration = frame.f_locals.get("it")
        elif where == ("danlu.api", "train") and isinstance(frame.f_locals.get("run_dir"), Path):
            run_dir = frame.f_locals["run_dir"]
    return iteration, run_dir


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone: a consequence, never the root cause."""
    import torch.distributed as td

    peer_words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was "
                  "aborted", "Socket Timeout", "timed out", "Timed out", "ProcessGroupNCCL")
    return isinstance(e, getattr(td, "DistError", ())) or any(w in str(e) for w in peer_words)


def _reports(root: Path) -> list[dict[str, Any]]:
    """The workers' failure reports of the newest attempt under a launcher log folder."""
    attempts = sorted(root.glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    return [json.loads(p.read_text()) for p in (attempts[-1].glob(f"*/{FAILURE_FILE}") if attempts else [])]


def _root_cause(e: Any, reports: list[dict[str, Any]]) -> Exception:
    """One exception naming the rank that failed first: a worker's own error beats the collective errors of the
    peers it left behind, which beat nothing; a worker killed by a signal writes no file and is named by its exit
    code. Workers that stopped on a signal (and no worse) make Interrupted."""
    stops = [r for r in reports if r.get("stopped")]
    own = sorted((r for r in reports if not r["peer"] and not r.get("stopped")), key=lambda r: r["time"])
    if stops and not own:
        return Interrupted(stops[0]["signum"] or signal.SIGTERM, stops[0]["message"])
    if own and own[0]["user_error"]:
        return DanluError(own[0]["message"])
    if own:
        r = own[0]
        return WorkerFailed(f"rank {r['rank']} failed: {r['type']}: {_first_line(r['message'])} (full traceback: "
                            f"{r['traceback']})", r["rank"], r["traceback"])
    lost = sorted((r for r in reports if r.get("lost")), key=lambda r: r["time"])
    if lost:  # the first rank left behind held a roll call: the ranks that did not answer are the cause
        r = lost[0]
        gone = r.get("missing")  # None: the store went with rank 0; []: all alive, so the reporter's own
        return WorkerFailed(f"{r['lost']} (full traceback: {r['traceback']})",
                            0 if gone is None else (gone or [r["rank"]])[0], r["traceback"])
    killed = [(rank, f) for rank, f in e.failures.items() if f.exitcode < 0]
    if killed:
        rank, f = killed[0]
        return WorkerFailed(f"rank {rank} (pid {f.pid}) was killed by {f.signal_name()}; the other ranks were "
                            f"stopped", rank)
    if reports:  # only collective errors: a rank died without a word, or hangs and was stopped by the launcher
        r = min(reports, key=lambda r: r["time"])
        return WorkerFailed(f"rank {r['rank']} failed waiting for another rank that died or hangs: {r['type']}: "
                            f"{_first_line(r['message'])} (full traceback: {r['traceback']})", r["rank"],
                            r["traceback"])
    rank, f = e.get_first_failure()
    return WorkerFailed(f"rank {rank} (pid {f.pid}) exited with code {f.exitcode}", rank)


def _first_line(message: str, limit: int = 300) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


@contextlib.contextmanager
def _environment(values: dict[str, Optional[str]]) -> Iterator[None]:
    """Set environment variables the workers inherit (None: leave as is) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The elastic agent logs every failure as a multi-line traceback; danlu prints one line instead."""
    import torch.distributed.elastic  # noqa: F401 - creates the loggers

    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def _signals_stop_workers() -> Iterator[list[Optional[int]]]:
    """Ctrl-C: the launcher sends the workers SIGTERM (each stops at an iteration boundary) rather than passing on
    SIGINT, which a worker that already got the terminal's SIGINT would take as a second, immediate, Ctrl-C.
    Yields [the signal received, or None]."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    received: list[Optional[int]] = [None]

    def handle(signum: int, frame: Any) -> None:
        received[0] = received[0] or signum
        raise SignalException(f"received {signal.Signals(signum).name}", sigval=signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = signal.signal(signal.SIGINT, handle)
    term = signal.getsignal(signal.SIGTERM)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, term)


# ---------------------------------------------------------------- danlu train


def train_command(recipe: Optional[str] = None, *, overrides: Optional[list[str]] = None, out: Optional[str] = None,
                  resume: Optional[str] = None, device: Optional[str] = None, quiet: bool = False,
                  force: bool = False, procs: Optional[int] = None, gpus: Optional[str] = None,
                  max_restarts: int = 0) -> int:
    """`danlu train`: train in this process (alone, or as one rank of a torchrun / SLURM job), or with `procs` /
    `gpus` launch that many processes that train together. Returns the exit code."""
    from danlu.engine import distributed

    kw = {"recipe": recipe, "overrides": list(overrides or []), "out": out, "resume": resume, "device": device,
          "quiet": quiet, "force": force}
    if procs is None and gpus is None:
        if max_restarts:
            raise DanluError("--max-restarts needs --procs or --gpus (under torchrun, use torchrun --max-restarts)")
        if distributed.detect() is None:
            _train(kw)
        else:
            _train_as_rank(kw)
        distributed.teardown()
        return 0
    launched = distributed.detect()
    if launched is not None:
        raise DanluError(f"--procs/--gpus: this process is already rank {launched.rank} of {launched.world} "
                         f"(started by {launched.by}); drop --procs/--gpus")
    if max_restarts < 0:
        raise DanluError(f"--max-restarts {max_restarts}: expected 0 or more")
    n, _ = process_count(procs, gpus)
    kw["device"], timeout, run_dir = _prepare(kw, gpus is not None)
    kw["out"] = None if resume else str(run_dir)
    how = f"--gpus {gpus}" if gpus else f"--procs {n}"
    try:
        run_workers(_train_worker, kw, procs=procs, gpus=gpus, max_restarts=max_restarts, timeout=timeout,
                    log_dir=run_dir / "logs")
    except WorkerFailed as e:
        snap = _newest_snapshot(str(run_dir))
        then = f"; continue from snapshot {snap.name} with: danlu train --resume {run_dir} {how}" if snap else ""
        print(f"danlu: error: {e}{then}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # the workers' message names the iteration and the snapshot
        hint = "" if "--resume" in str(e) else \
            f"; continue from the newest snapshot with: danlu train --resume {run_dir}"
        print(f"danlu: {e}{hint} {how}", file=sys.stderr)
        return e.exit_code
    return 0


def _prepare(kw: dict[str, Any], on_gpus: bool) -> tuple[str, float, Path]:
    """Check everything the workers will need before starting them (bad input: exit 2 here, not in N processes):
    the recipe or the run to resume, the device, the run folder. Returns (device, dist.timeout, run folder)."""
    from danlu.config import load_recipe
    from danlu.runs import new_run_dir, recipe_name

    want = "cuda" if on_gpus else "cpu"
    dev = kw["device"]
    if dev is not None and dev.split(":")[0] != want:
        raise DanluError(f"--device {dev}: {'--gpus' if on_gpus else '--procs'} runs on {want}; drop --device")
    if kw["resume"]:
        if kw["recipe"] or kw["out"]:
            raise DanluError("--resume DIR continues the run in DIR with its own recipe; drop the recipe and --out")
        run_dir = Path(kw["resume"])
        if not (run_dir / "recipe.yaml").is_file() or not any((run_dir / "snapshots").glob("*.pt")):
            raise DanluError(f"--resume {run_dir}: no recipe.yaml and snapshot there; expected a danlu run folder")
        recipe = load_recipe(str(run_dir / "recipe.yaml"), kw["overrides"])
    else:
        recipe = load_recipe(kw["recipe"], kw["overrides"])
        # the run folder, made here (with --force, an old run moved aside here) so the launcher can keep its
        # per-rank logs in it from the start; rank 0 then finds it empty
        run_dir = new_run_dir(kw["out"], recipe_name(kw["recipe"]), kw["force"])
        kw["force"] = False
    return want, recipe.dist.timeout, run_dir


def _train_as_rank(kw: dict[str, Any]) -> None:
    """One rank of a job torchrun, SLURM or Kubernetes started: train; on a failure, its traceback goes to the run's
    logs/ (RUN/logs/JOB/attempt_N/RANK/traceback.txt) and the console gets one line (who is lost, or this rank's
    error, and what happens next), then the process ends with exit code 1, so that torchrun restarts it (with
    --max-restarts) or srun's --kill-on-bad-exit ends the others."""
    try:
        _train(kw, _job_name())
    except (DanluError, Stopped, KeyboardInterrupt):  # one line from the CLI already, exit 2 / 143 / 130
        raise
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then the process ends
        report = _record_failure(e, _rank_log_folder(e, kw))
        if report is not None:
            _say(report)
            os._exit(1)  # leave at once: a process group whose peers are gone can abort noisily in its destructor
        raise  # no run folder to keep the traceback in: it goes to the console as before


def _rank_log_folder(e: BaseException, kw: dict[str, Any]) -> Optional[Path]:
    """RUN/logs/JOB/attempt_N/RANK (JOB: torchrun's rendezvous id, the SLURM job and step, or 'env'); a new
    folder beside an existing one (RANK.PID) when torchrun restarted the job for a change of nodes, which keeps
    the restart count; None when the run folder is not known."""
    run_dir = kw["out"] or kw["resume"] or _failure_point(e)[1]
    if run_dir is None:
        return None
    rank = str(_my_rank())
    attempt = Path(run_dir) / "logs" / (_job_name() or "env") / \
        f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return attempt / rank if not (attempt / rank).exists() else attempt / f"{rank}.{os.getpid()}"


def _my_rank() -> int:
    """This process's rank as its launcher set it (RANK, or SLURM_PROCID under srun); 0 in a single process."""
    from danlu.engine import distributed

    launch = distributed.detect()
    return launch.rank if launch is not None else 0


def _job_name() -> Optional[str]:
    """The job this process is a rank of, as a folder name: torchrun's rendezvous id, or SLURM's job and step
    (slurm-4242.0); None under a bare env:// launch (Kubernetes), which names no job."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return os.environ["TORCHELASTIC_RUN_ID"]
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def _train_worker(kw: dict[str, Any]) -> dict[str, Any]:
    """One rank of `danlu train --procs/--gpus` (a Stopped run leaves through _worker, as the launcher wants)."""
    result = _train(kw)
    return {"test_accuracy": result.test_accuracy, "run_dir": str(result.run_dir)}


def _set_aside(run_dir: Path, name: str) -> None:
    """Move a failed attempt's run files (recipe, metrics, curves) into run_dir/logs/<name>/."""
    from danlu.runs import held_run_files

    held = held_run_files(run_dir)
    if held:
        (run_dir / "logs" / name).mkdir(parents=True, exist_ok=True)
        for f in held:
            (run_dir / f).rename(run_dir / "logs" / name / f)


def _train(kw: dict[str, Any], job: Optional[str] = None):
    """danlu.train(**kw); a restarted worker (the elastic launcher's --max-restarts, or torchrun's) resumes the run
    from its newest snapshot instead of starting it again. `job` (a job torchrun or SLURM started, see _job_name):
    a worker that finds snapshots of the same job in the run folder resumes too, restarted or not: a replacement
    node, a node joining an elastic job (torchrun then restarts every node's workers without counting a restart),
    or the whole job started again with the same command; every rank of the job sees the same folder, so all
    take the same decision."""
    from danlu.api import train
    from danlu.engine import distributed
    from danlu.runs import held_run_files

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    folder = kw["resume"] or kw["out"]
    seen = job is not None and folder is not None and (Path(folder) / "logs" / job).is_dir()
    if (restarts or seen) and folder and any((Path(folder) / "snapshots").glob("*.pt")):
        kw = {**kw, "recipe": None, "out": None, "resume": folder, "force": False}
    elif (restarts or seen) and folder and _my_rank() == 0:  # failed before its first snapshot:
        # start again, keeping what the failed attempt wrote
        _set_aside(Path(folder), f"restart-{restarts}" if restarts else f"rejoin-{os.getpid()}")
    if job is not None and folder is not None and _my_rank() == 0 and not held_run_files(Path(folder)):
        # this job starts here (before training, so no rank can see a snapshot of it yet); a folder that holds
        # another run gets no mark: train() refuses it
        (Path(folder) / "logs" / job).mkdir(parents=True, exist_ok=True)
    result = train(**kw)
    distributed.current().barrier()  # nobody leaves the group while rank 0 still writes the run's last files
    return result
