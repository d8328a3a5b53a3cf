#!/usr/bin/env python
"""Serving load: `danlu serve` under N concurrent clients for T seconds, with micro-batching on and off.

    python benchmarks/serve_load.py                        # LeNet and ResNet-18, 32 clients, 10 s each (~2.5 min)
    python benchmarks/serve_load.py --models lenet --clients 8,32 --seconds 20 --json serve.json

For each model a tiny run is trained first in a temporary folder (a few iterations on synthetic images: the weights
do not matter for speed): LeNet on 28 x 28 gray digits, ResNet-18 (torchvision's, ImageNet stem) on 224 x 224 RGB.
Then, for each setting, `danlu serve RUN --port 0` starts as a subprocess on 127.0.0.1 (the way a user starts it),
the clients (keep-alive asyncio connections in this process) send `POST /v1/classify` with one PNG of the run's
input size, back to back, for `--warmup` seconds (not counted) and then for `--seconds`; then they stop and the
server is stopped.
Reported per setting: requests per second (answers completed in the window / window), p50/p95/p99 latency of those
answers, the mean number of images per forward pass (the server's `batch_images`), and errors. Batching on is
`--max-batch 64 --max-wait-ms 5`, off is `--max-batch 1`. The targets (on a 2-core CPU): batched >= 3x
the requests/s of unbatched at 32 clients, LeNet p99 under 250 ms batched; a miss is reported, not an error.

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image

MODELS = {  # name: (training overrides of a tiny run, (C, H, W) of the images sent)
    "lenet": (["model.name=lenet", "data.name=synthetic", "data.size=28", "data.channels=1", "data.batch_size=32",
               "data.train_size=256", "data.test_size=64"], (1, 28, 28)),
    "resnet18": (["model.name=tv:resnet18", "data.name=synthetic", "data.size=224", "data.channels=3",
                  "data.batch_size=8", "data.train_size=32", "data.test_size=8", "data.normalize=none"],
                 (3, 224, 224)),
}
SETTINGS = {"batched": ["--max-batch", "64", "--max-wait-ms", "5"], "unbatched": ["--max-batch", "1"]}
TARGET_RATIO, TARGET_P99_MS = 3.0, 250.0


def train_tiny(model: str, root: Path) -> Path:
    import danlu

    out = root / model
    overrides = MODELS[model][0] + ["run.max_iter=3", "run.test_interval=3", "run.tensorboard=false"]
    danlu.train(None, overrides=overrides, out=out, device="cpu", quiet=True)
    return out


def start_server(run: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", str(run), "--port", "0", "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " http://" in line:
            watchdog.cancel()
            url = next(w for w in line.split() if w.startswith("http://"))
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, url
    watchdog.cancel()
    raise SystemExit(f"danlu serve did not start:\n{''.join(lines)}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def png(shape: tuple[int, int, int]) -> bytes:
    c, h, w = shape
    a = np.random.default_rng(0).integers(0, 256, (h, w) if c == 1 else (h, w, c), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def request_bytes(url: str, image: bytes) -> bytes:
    """One `POST /v1/classify` with the image as a multipart upload, as raw HTTP/1.1 bytes (keep-alive)."""
    host = url.split("//", 1)[1]
    body = (b'--danluBoundary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--danluBoundary--\r\n")
    head = (f"POST /v1/classify?top=5 HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary=danluBoundary\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def load(url: str, image: bytes, clients: int, warmup: float, seconds: float) -> dict:
    """`clients` connections sending requests back to back; counts the answers that complete inside the measured
    window. The client is a few lines of asyncio streams (one prepared request, read the status line, headers and
    Content-Length bytes), so that on a small machine it takes little of the CPU the server is measured on."""
    done: list[tuple[float, float, int]] = []  # (finished at, latency s, batch_images)
    errors = 0
    request = request_bytes(url, image)
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while (now := time.perf_counter()) < t1:
                writer.write(request)
                status = await reader.readline()  # b"HTTP/1.1 200 OK\r\n"
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                end = time.perf_counter()
                ok = status.split(b" ", 2)[1:2] == [b"200"]
                if t0 <= end <= t1:
                    if ok:
                        done.append((end, end - now, json.loads(body)["batch_images"]))
                    else:
                        errors += 1
        finally:
            writer.close()

    results = await asyncio.gather(*[client() for _ in range(clients)], return_exceptions=True)
    errors += sum(isinstance(r, Exception) for r in results)  # a connection that failed
    lat = sorted(1000 * d[1] for d in done)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    return {"requests": len(done), "errors": errors, "req_per_s": len(done) / seconds,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_batch": statistics.fmean(d[2] for d in done) if done else 0.0}


def environment() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"date": datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "danlu", "fastapi", "uvicorn", "python-multipart")},
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet,resnet18", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--clients", default="32", help="concurrent clients, comma-separated (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per setting (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    p.add_argument("--json", metavar="OUT", help="also write {env, rows} as JSON to OUT")
    a = p.parse_args()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models {a.models}: unknown {', '.join(bad)}; expected some of {', '.join(MODELS)}")
    try:
        clients = [int(c) for c in a.clients.split(",")]
    except ValueError:
        raise SystemExit(f"--clients {a.clients}: expected comma-separated whole numbers") from None
    if min(clients) < 1 or a.seconds <= 0 or a.warmup < 0:
        raise SystemExit("--clients, --seconds: expected positive numbers; --warmup: 0 or more")

    env, rows = environment(), []
    print(f"# {env['date']}  {env['cpu']} ({env['cores']} cores)  torch {env['versions']['torch']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        for model in models:
            run = train_tiny(model, Path(tmp))
            image = png(MODELS[model][1])
            for n in clients:
                for setting, args in SETTINGS.items():
                    proc, url = start_server(run, args)
                    try:
                        r = asyncio.run(load(url, image, n, a.warmup, a.seconds))
                    finally:
                        stop_server(proc)
                    rows.append({"model": model, "setting": setting, "clients": n, **r})
                    print(f"{model:<9} {setting:<9} {n:>3} clients  {r['req_per_s']:8.1f} req/s  p50 "
                          f"{r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  mean batch "
                          f"{r['mean_batch']:5.1f}  errors {r['errors']}", flush=True)

    print("\n| model | clients | batching | req/s | p50 ms | p95 ms | p99 ms | images per forward | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        on = "on (64, 5 ms)" if r["setting"] == "batched" else "off (1)"
        print(f"| {r['model']} | {r['clients']} | {on} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['errors']} |")
    print()
    for model in models:
        for n in clients:
            by = {r["setting"]: r for r in rows if r["model"] == model and r["clients"] == n}
            ratio = by["batched"]["req_per_s"] / max(by["unbatched"]["req_per_s"], 1e-9)
            verdict = "meets" if ratio >= TARGET_RATIO else "misses"
            line = f"{model}, {n} clients: batched / unbatched = {ratio:.2f}x ({verdict} the {TARGET_RATIO:g}x target)"
            if model == "lenet":
                p99 = by["batched"]["p99_ms"]
                line += f"; batched p99 {p99:.1f} ms ({'meets' if p99 < TARGET_P99_MS else 'misses'} < " \
                        f"{TARGET_P99_MS:g} ms)"
            print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
