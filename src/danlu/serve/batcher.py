"""Micro-batching: concurrent requests share one forward pass on the device.

    batcher = MicroBatcher(model_fn, max_batch=64, max_wait_ms=5)   # model_fn: uint8 (B, C, H, W) -> (B, ...)
    await batcher.start()
    out = await batcher.submit(images)       # images (n, C, H, W) uint8 -> out.rows (n, ...), out.queue_ms, ...
    await batcher.stop()

One worker task takes the first waiting request, then waits at most `max_wait_ms` for more until the batch holds
`max_batch` images, and runs `model_fn` once on all of them in a single worker thread (the event loop keeps accepting
and decoding meanwhile; the device sees one batch at a time). A request never waits more than `max_wait_ms` for
company, and none waits at all when the batch is already full. `max_batch=1` is no batching: one image per call.
A request of more images than `max_batch` runs alone, in slices of `max_batch`.

The wait and the times in `Batched` are read from `clock` and waited out with `sleep` (default: the host's
`time.perf_counter` and `asyncio.sleep`); a test passes a clock it moves by hand, so what it checks does not depend on
how busy the machine is.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from danlu.errors import DanluError


@dataclass
class Batched:
    """What one request gets back: its rows of the model's output and where its time went."""
    rows: torch.Tensor  # (n, ...) the model's output for this request's n images, on the CPU
    queue_ms: float  # from submit() to the start of the forward pass that took it
    model_ms: float  # that forward pass (all of its batch), or the sum of them for a request run in slices
    batch_images: int  # images in that forward pass (the largest, for a request run in slices)


@dataclass
class _Waiting:
    images: torch.Tensor  # (n, C, H, W) uint8
    future: asyncio.Future
    since: float  # the batcher's clock at submit


class MicroBatcher:
    def __init__(self, model_fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 64,
                 max_wait_ms: float = 5.0, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        """`clock()`: seconds; `sleep(s)`: returns once `clock` has moved `s` seconds on (see the module's
        docstring)."""
        if max_batch < 1:
            raise DanluError(f"--max-batch {max_batch}: expected at least 1 (1: no batching)")
        if max_wait_ms < 0:
            raise DanluError(f"--max-wait-ms {max_wait_ms}: expected 0 or more")
        self.model_fn, self.max_batch, self.max_wait = model_fn, max_batch, max_wait_ms / 1000
        self._clock, self._sleep = clock, sleep
        self._queue: Optional[asyncio.Queue[_Waiting]] = None
        self._worker: Optional[asyncio.Task] = None
        self._held: Optional[_Waiting] = None  # taken from the queue but did not fit the last batch: goes first next
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="danlu-model")  # one batch at a time

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="danlu-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        waiting = [self._held] if self._held else []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for w in waiting:
            if not w.future.done():
                w.future.set_exception(RuntimeError("the server is shutting down"))
        self._held = None
        self._thread.shutdown(wait=True)

    async def submit(self, images: torch.Tensor) -> Batched:
        """Queue `images` (n, C, H, W) uint8 for the next batch; returns when the model has seen them."""
        if self._queue is None or self._worker is None or self._worker.done():
            raise RuntimeError("MicroBatcher.submit before start() (or after stop())")
        w = _Waiting(images, asyncio.get_running_loop().create_future(), self._clock())
        self._queue.put_nowait(w)
        return await w.future

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(e)

    async def _collect(self) -> list[_Waiting]:
        """The first waiting request, then more until max_batch images or max_wait has passed."""
        first, self._held = self._held or await self._queue.get(), None
        batch, n = [first], len(first.images)
        deadline = self._clock() + self.max_wait  # from the first request's start: company never moves it
        while n < self.max_batch:
            if self._queue.empty():
                left = deadline - self._clock()
                if left <= 0:
                    break
                w = await self._next(left)
                if w is None:
                    break
            else:
                w = self._queue.get_nowait()
            if n + len(w.images) > self.max_batch:
                self._held = w  # starts the next batch
                break
            batch.append(w)
            n += len(w.images)
        return batch

    async def _next(self, timeout: float) -> Optional[_Waiting]:
        """The next request to arrive within `timeout` seconds (of `sleep`'s clock), or None."""
        get = asyncio.ensure_future(self._queue.get())
        timer = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait((get, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not get.done():
                get.cancel()  # nothing came in time: a request arriving now stays queued for the next batch
        return get.result() if get.done() and not get.cancelled() else None

    async def _run(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        start = self._clock()
        if len(batch) == 1 and len(batch[0].images) > self.max_batch:  # one big request: slices of max_batch
            x = batch[0].images
            parts = [await loop.run_in_executor(self._thread, self._forward, x[i:i + self.max_batch])
                     for i in range(0, len(x), self.max_batch)]
            out, size = torch.cat([p for p, _ in parts]), self.max_batch
            model_ms = sum(ms for _, ms in parts)
        else:
            x = torch.cat([w.images for w in batch]) if len(batch) > 1 else batch[0].images  # (B, C, H, W)
            out, model_ms = await loop.run_in_executor(self._thread, self._forward, x)
            size = len(x)
        i = 0
        for w in batch:
            n = len(w.images)
            if not w.future.done():  # its client may have gone
                w.future.set_result(Batched(out[i:i + n], 1000 * (start - w.since), model_ms, size))
            i += n

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        t0 = self._clock()
        with torch.inference_mode():
            out = self.model_fn(x)  # the model_fn returns CPU tensors, so the time includes the device's work
        return out, 1000 * (self._clock() - t0)
