#!/usr/bin/env python
"""Soak: `danlu serve` for hours, compressed into minutes. Many concurrent clients send a bounded stream of mixed
requests (classify, face embed, bad uploads) at a steady rate; every interval (a minute by default) the benchmark
records p50 and p99 latency, errors and the server's resident memory, and draws them (PNG).

    python benchmarks/serve_soak.py                               # a tiny face run, 32 clients, 100 req/s, 10 x 1 min
    python benchmarks/serve_soak.py --rate 0                       # back to back: the server saturated
    python benchmarks/serve_soak.py --minutes 2 --interval 15      # a quick look
    python benchmarks/serve_soak.py --run runs/faces --out soak/   # a run of yours (a classifier: no embed requests)

Without --run a tiny face run is trained first, in seconds (MobileFaceNet x0.25, 4 steps of the light ArcFace recipe
on 32 px synthetic identities, one thread), which serves both POST /v1/classify (its identities) and
POST /v1/faces/embed. `danlu serve RUN --port 0 --device cpu` then runs as a subprocess on 127.0.0.1, the way a user
starts it; the clients (keep-alive asyncio connections in this process, one prepared request each time) send, each
at its share of --rate (open loop: a request's latency counts from when it was due, so a server that falls behind is
not hidden by clients that wait for it), or with --rate 0 each as soon as its last answer came (closed loop):

- classify (45%): one 48 x 48 RGB PNG (one of 16 noise images), `?top=3`;
- embed (35%): one or two such PNGs (face runs only; a classifier run gets classify instead);
- bad (20%): a PNG cut in half, an empty file, a text file, a 9000 x 9000 PNG header (over the server's pixel
  limit), or the wrong form field. Each must be refused with a 4xx; a 2xx is counted as an error too.

Each interval also records the server's own CPU time per request and the share of the machine's CPU that other
processes took (a neighbour's load raises the latency of a server that did not change). The first --warmup seconds
are not counted. Pass (exit code 0): no 5xx and no failed connection over the whole run,
no bad upload accepted, resident memory grew by less than 5% over the last half (from the sample at the middle of
the measured time to the last), and the last interval's p99 is within 1.5x of the first interval's. Written to --out:
soak.json (every interval, every 1 s memory sample, the environment) and soak.png.

The clients run on the same machine as the server: on a small machine they take part of its CPU (the figures are
for the pair, as a load test on one box is).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image

from serve_load import start_server, stop_server  # benchmarks/serve_load.py: a `danlu serve` on a free port

MIX = (("classify", 0.45), ("embed", 0.35), ("bad", 0.20))
RSS_GROWTH_LIMIT, P99_DRIFT_LIMIT = 0.05, 1.5


def train_tiny_face_run(out: Path) -> Path:
    """The tiny face run of tests/face/synth.py: seconds on one CPU thread."""
    import torch

    import danlu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        danlu.train("face_arcface_light", overrides=[
            "data.name=synthetic", "data.channels=3", "data.num_classes=8", "data.train_size=64", "data.test_size=32",
            "data.batch_size=8", "data.test_pairs=10", "data.size=32", "model.kwargs={width_mult: 0.25}",
            "precision=fp32", "run.max_iter=4", "run.tensorboard=false", "run.snapshot_every=0"],
            out=out, device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used (all its threads; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have been busy (not idle, not waiting for I/O) since boot."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def png(seed: int, size: int = 48) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(width: int = 9000, height: int = 9000) -> bytes:
    """A valid PNG signature and IHDR of width x height (81 Mpx) and a tiny IDAT: over the server's 40 Mpx limit,
    refused from its header before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def post(host: str, path: str, files: list[tuple[str, str, bytes]]) -> bytes:
    """A multipart POST as raw HTTP/1.1 bytes (keep-alive); files: (field, filename, content)."""
    body = b"".join(f'--soakBoundary\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in files) + b"--soakBoundary--\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=soakBoundary\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def requests(url: str, face: bool) -> dict[str, list[bytes]]:
    """Prepared requests of each kind: {kind: [raw HTTP request, ...]}."""
    host = url.split("//", 1)[1]
    images = [png(seed) for seed in range(16)]
    good = images[0]
    return {
        "classify": [post(host, "/v1/classify?top=3", [("file", f"{k}.png", im)]) for k, im in enumerate(images)],
        "embed": ([post(host, "/v1/faces/embed", [("file", f"{k}.png", im)]) for k, im in enumerate(images)] +
                  [post(host, "/v1/faces/embed", [("file", "a.png", images[k]), ("file", "b.png", images[k + 1])])
                   for k in range(0, 16, 2)]) if face else [],
        "bad": [post(host, "/v1/classify", [("file", "cut.png", good[:len(good) // 2])]),
                post(host, "/v1/classify", [("file", "empty.png", b"")]),
                post(host, "/v1/classify", [("file", "notes.txt", b"not an image at all\n" * 20)]),
                post(host, "/v1/classify", [("file", "huge.png", huge_png_header())]),
                post(host, "/v1/classify", [("image", "x.png", good)])],  # the wrong field name
    }


async def soak(url: str, pid: int, face: bool, clients: int, warmup: float, intervals: int, interval: float,
               seed: int, rate: float) -> tuple[list[dict], list[tuple[float, float]]]:
    """Run the clients for warmup + intervals x interval seconds, at `rate` requests/s in all (0: back to back).
    Returns (one dict per interval, [(seconds since the measured start, RSS MiB)] sampled every second from the start
    of the warm-up)."""
    prepared = requests(url, face)
    kinds = [(k, w) for k, w in MIX if prepared[k]]
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    start = time.perf_counter()
    t0 = start + warmup
    t_end = t0 + intervals * interval
    # per interval: kind -> latencies of answered requests; status counts; failed connections; bad accepted
    stats = [{"lat": {k: [] for k, _ in kinds}, "status": {}, "connection_errors": 0, "bad_accepted": 0}
             for _ in range(intervals)]
    memory: list[tuple[float, float]] = []

    # at each interval's end: (server CPU s, this benchmark's CPU s, machine busy s): what the server spent per
    # request, and how much of the machine other processes took (a neighbour's load raises latency too)
    cpu_marks = [(cpu_seconds(pid), cpu_seconds(os.getpid()), machine_busy_seconds())]

    async def mark_cpu() -> None:
        for k in range(intervals + 1):
            await asyncio.sleep(max(0.0, t0 + k * interval - time.perf_counter()))
            if k == 0:
                cpu_marks[0] = (cpu_seconds(pid), cpu_seconds(os.getpid()), machine_busy_seconds())
            else:
                cpu_marks.append((cpu_seconds(pid), cpu_seconds(os.getpid()), machine_busy_seconds()))

    def slot(at: float):
        k = int((at - t0) // interval)
        return stats[k] if 0 <= k < intervals else None

    async def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        reader = writer = None
        every = clients / rate if rate > 0 else 0.0  # this client's share of the rate: one request every `every` s
        due = start + rng.uniform(0, every)  # a random phase, so the clients do not send in step
        while time.perf_counter() < t_end:
            kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
            request = rng.choice(prepared[kind])
            if every:  # open loop: the latency counts from when the request was due, so a server that falls
                await asyncio.sleep(max(0.0, due - time.perf_counter()))  # behind is not hidden by the clients
                sent, due = due, due + every                            # waiting for it
            else:
                sent = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                status_line = await reader.readline()  # b"HTTP/1.1 200 OK\r\n"
                length, close = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    low = line.lower()
                    if low.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    elif low.startswith(b"connection:") and b"close" in low:
                        close = True
                await reader.readexactly(length)
                status = int(status_line.split(b" ", 2)[1])
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                s = slot(time.perf_counter())
                if s is not None:
                    s["connection_errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.1)
                continue
            done = time.perf_counter()
            s = slot(done)
            if s is not None:
                s["status"][status] = s["status"].get(status, 0) + 1
                if kind == "bad" and status < 400:
                    s["bad_accepted"] += 1
                elif 200 <= status < 300:
                    s["lat"][kind].append(1000 * (done - sent))
            if close:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def sample_memory() -> None:
        while (now := time.perf_counter()) < t_end:
            memory.append((round(now - t0, 3), rss_mb(pid)))
            await asyncio.sleep(1.0)
        memory.append((round(time.perf_counter() - t0, 3), rss_mb(pid)))

    await asyncio.gather(sample_memory(), mark_cpu(), *[client(n) for n in range(clients)])
    rows, cores = [], os.cpu_count() or 1
    for k, s in enumerate(stats):
        every = sorted(v for lat in s["lat"].values() for v in lat)
        rss_at = [m for t, m in memory if t <= (k + 1) * interval]
        (server0, self0, busy0), (server1, self1, busy1) = cpu_marks[k], cpu_marks[k + 1]
        others = max(0.0, (busy1 - busy0) - (server1 - server0) - (self1 - self0))
        rows.append({"interval": k + 1, "end_s": (k + 1) * interval,
                     "requests": sum(s["status"].values()), "answered_2xx": len(every),
                     "p50_ms": pct(every, 50), "p99_ms": pct(every, 99),
                     **{f"{kind}_p99_ms": pct(sorted(lat), 99) for kind, lat in s["lat"].items()},
                     "status": {str(c): n for c, n in sorted(s["status"].items())},
                     "errors_5xx": sum(n for c, n in s["status"].items() if c >= 500),
                     "refused_4xx": sum(n for c, n in s["status"].items() if 400 <= c < 500),
                     "connection_errors": s["connection_errors"], "bad_accepted": s["bad_accepted"],
                     "rss_mb": rss_at[-1] if rss_at else float("nan"),
                     "server_cpu_ms_per_request": 1000 * (server1 - server0) / max(1, sum(s["status"].values())),
                     "server_cpu_share": (server1 - server0) / (interval * cores),
                     "others_cpu_share": others / (interval * cores)})
    return rows, memory


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def verdict(rows: list[dict], memory: list[tuple[float, float]], measured: float) -> tuple[bool, list[str]]:
    """(pass, the lines that say why) against the three criteria."""
    errors = sum(r["errors_5xx"] for r in rows)
    failed = sum(r["connection_errors"] for r in rows)
    accepted = sum(r["bad_accepted"] for r in rows)
    after = [(t, m) for t, m in memory if t >= 0]
    mid = min(after, key=lambda tm: abs(tm[0] - measured / 2))
    growth = (after[-1][1] - mid[1]) / mid[1]
    drift = rows[-1]["p99_ms"] / rows[0]["p99_ms"]
    checks = [(errors == 0 and failed == 0 and accepted == 0,
               f"5xx: {errors}, failed connections: {failed}, bad uploads accepted: {accepted} (want 0)"),
              (growth < RSS_GROWTH_LIMIT,
               f"server RSS over the last half: {mid[1]:.1f} -> {after[-1][1]:.1f} MiB ({100 * growth:+.2f}%, want "
               f"< {100 * RSS_GROWTH_LIMIT:g}%)"),
              (drift <= P99_DRIFT_LIMIT,
               f"p99 last interval / first: {rows[-1]['p99_ms']:.1f} / {rows[0]['p99_ms']:.1f} ms = {drift:.2f}x "
               f"(want <= {P99_DRIFT_LIMIT:g}x)")]
    return all(ok for ok, _ in checks), [("pass" if ok else "FAIL") + ": " + line for ok, line in checks]


def plot(rows: list[dict], memory: list[tuple[float, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["end_s"] / 60 for r in rows]
    fig, (lat, mem, count) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    lat.plot(minutes, [r["p50_ms"] for r in rows], "o-", label="p50 (all 2xx)")
    lat.plot(minutes, [r["p99_ms"] for r in rows], "o-", label="p99 (all 2xx)")
    for key, style in (("classify_p99_ms", ":"), ("embed_p99_ms", "--")):
        if key in rows[0]:
            lat.plot(minutes, [r[key] for r in rows], style, label=key.replace("_ms", "").replace("_", " "))
    lat.set_ylabel("latency, ms (per interval)")
    lat.legend(fontsize=8)
    lat.set_title(title, fontsize=9)
    mem.plot([t / 60 for t, _ in memory], [m for _, m in memory], "-", color="tab:green")
    mem.set_ylabel("server RSS, MiB")
    count.bar(minutes, [r["answered_2xx"] for r in rows], width=0.6 * (minutes[0] if minutes else 1),
              label="answered 2xx")
    count.bar(minutes, [r["refused_4xx"] for r in rows], bottom=[r["answered_2xx"] for r in rows],
              width=0.6 * (minutes[0] if minutes else 1), label="refused 4xx (bad uploads)")
    count.plot(minutes, [r["errors_5xx"] + r["connection_errors"] for r in rows], "rx-", label="5xx + failed")
    count.set_ylabel("requests per interval")
    share = count.twinx()
    share.plot(minutes, [100 * r["others_cpu_share"] for r in rows], "k.--", label="CPU taken by other processes")
    share.set_ylabel("other processes, % of all cores")
    share.set_ylim(0, 100)
    share.legend(fontsize=8, loc="lower right")
    count.set_xlabel("minutes of measured load")
    count.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(args: argparse.Namespace, run: Path) -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "commit": commit, "run": str(run),
            "versions": {p: version(p) for p in ("torch", "danlu", "fastapi", "uvicorn", "python-multipart")},
            "torch_threads": torch.get_num_threads(),
            "command": " ".join(["python benchmarks/serve_soak.py"] + sys.argv[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a run folder to serve (default: train a tiny face run first)")
    p.add_argument("--minutes", type=float, default=10.0, help="measured minutes (default 10)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds per recorded interval (default 60)")
    p.add_argument("--clients", type=int, default=32, help="concurrent keep-alive clients (default 32)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="requests per second from all clients together (default 100); 0: each client sends its next "
                        "request as soon as the last is answered (saturation)")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of load before measuring (default 15)")
    p.add_argument("--seed", type=int, default=0, help="the clients' choice of requests (default 0)")
    p.add_argument("--out", default=None, help="folder for soak.json and soak.png (default serve-soak-DATE-TIME)")
    a = p.parse_args()
    intervals = int(round(a.minutes * 60 / a.interval)) if a.interval > 0 else 0
    if intervals < 2 or a.clients < 1 or a.warmup < 0 or a.rate < 0:
        raise SystemExit("--minutes / --interval: expected at least 2 intervals; --clients >= 1; --warmup, --rate "
                         ">= 0")
    out = Path(a.out or f"serve-soak-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve_soak-") as tmp:
        if a.run:
            run = Path(a.run)
        else:
            t = time.perf_counter()
            run = train_tiny_face_run(Path(tmp) / "face")
            print(f"trained a tiny face run in {time.perf_counter() - t:.1f} s: {run}", flush=True)
        env = environment(a, run)
        face = (run / "face.json").is_file()
        proc, url = start_server(run, [])
        try:
            print(f"# {env['date']}  {env['cpu']} ({env['cores']} cores)  torch {env['versions']['torch']}  "
                  f"danlu serve {url} (pid {proc.pid}), {a.clients} clients, "
                  f"{f'{a.rate:g} requests/s' if a.rate else 'back to back'}, {intervals} x {a.interval:g} s after "
                  f"{a.warmup:g} s warm-up; mix {', '.join(f'{k} {w:.0%}' for k, w in MIX if face or k != 'embed')}",
                  flush=True)
            rows, memory = asyncio.run(soak(url, proc.pid, face, a.clients, a.warmup, intervals, a.interval, a.seed,
                                            a.rate))
        finally:
            stop_server(proc)
    print("\n| minute | requests | 2xx | 4xx | 5xx | failed | p50 ms | p99 ms | classify p99 | embed p99 | RSS MiB "
          "| server CPU ms / request | CPU taken by other processes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['end_s'] / 60:.2f} | {r['requests']} | {r['answered_2xx']} | {r['refused_4xx']} | "
              f"{r['errors_5xx']} | {r['connection_errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r.get('classify_p99_ms', float('nan')):.1f} | {r.get('embed_p99_ms', float('nan')):.1f} | "
              f"{r['rss_mb']:.1f} | {r['server_cpu_ms_per_request']:.2f} | {100 * r['others_cpu_share']:.0f}% |")
    ok, lines = verdict(rows, memory, intervals * a.interval)
    print("\n" + "\n".join(lines))
    (out / "soak.json").write_text(json.dumps({"env": env, "intervals": rows, "rss_mb_every_second": memory,
                                               "verdict": lines, "pass": ok}, indent=1) + "\n")
    plot(rows, memory, f"danlu serve soak: {a.clients} clients, {f'{a.rate:g} req/s' if a.rate else 'back to back'}, "
                       f"{env['cpu']} ({env['cores']} cores), {env['date']}", out / "soak.png")
    print(f"{'PASS' if ok else 'FAIL'}: {out / 'soak.json'}, {out / 'soak.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
