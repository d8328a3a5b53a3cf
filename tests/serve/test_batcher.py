"""The micro-batcher on its own: who shares a forward pass, who gets which rows, and what a failure does."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from danlu.errors import DanluError
from danlu.serve.batcher import MicroBatcher


class Model:
    """Doubles its input and records each batch size (and whether it ran under inference_mode, off the loop). With
    a `clock` (FakeClock), each call moves it `takes_s` seconds on."""

    def __init__(self, fail_on: int | None = None, clock: FakeClock | None = None, takes_s: float = 0.0):
        self.sizes, self.inference, self.threads, self.fail_on = [], [], set(), fail_on
        self.clock, self.takes_s = clock, takes_s

    def __call__(self, x):  # (B, 1, 2, 2) uint8 -> (B, 4) float
        self.sizes.append(len(x))
        self.inference.append(torch.is_inference_mode_enabled())
        self.threads.add(threading.current_thread().name)
        if self.clock is not None:
            self.clock.t += self.takes_s  # (the batcher's loop waits for this call meanwhile: no one else moves it)
        if self.fail_on is not None and self.fail_on in x.flatten().tolist():
            raise RuntimeError("model failed")
        return 2 * x.flatten(1).float()


class FakeClock:
    """The batcher's clock, moved by the test alone: `now()` in seconds; `sleep(s)` returns once the test has moved
    the clock `s` seconds on, and puts the time it waits for in `asked`. Nothing depends on the machine's speed."""

    def __init__(self):
        self.t = 0.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []
        self.asked: asyncio.Queue[float] = asyncio.Queue()  # (created inside the test's event loop)

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + seconds, wake))
        self.asked.put_nowait(self.t + seconds)
        try:
            await wake
        finally:
            self.sleepers = [(t, f) for t, f in self.sleepers if f is not wake]

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for t, wake in self.sleepers:
            if t <= self.t and not wake.done():
                wake.set_result(None)


HANG_S = 60  # only a broken batcher makes the test wait this long: every wait below is on the FakeClock


async def _asked(clock: FakeClock, *requests: asyncio.Task) -> float:
    """The clock time the batcher's next wait for company ends at; fails at once if a request is answered first
    (the batcher did not wait), or if the batcher never waits."""
    asked = asyncio.ensure_future(clock.asked.get())
    done, _ = await asyncio.wait([asked, *requests], timeout=HANG_S, return_when=asyncio.FIRST_COMPLETED)
    if asked not in done:
        asked.cancel()
        raise AssertionError("a request was answered before its wait for company was over" if done else
                             f"the batcher did not wait for company (nothing in {HANG_S} s)")
    return asked.result()


async def _answered(*requests: asyncio.Task):
    done, _ = await asyncio.wait(requests, timeout=HANG_S)
    assert len(done) == len(requests), f"the wait was over on the batcher's clock, yet no answer in {HANG_S} s"
    return [r.result() for r in requests]


def images(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def run(batcher: MicroBatcher, requests: list[torch.Tensor]):
    """All `requests` submitted at once (each its own task); their answers, or their exceptions."""
    async def go():
        await batcher.start()
        try:
            tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(go())


def test_concurrent_requests_share_one_forward_pass_and_get_their_own_rows():
    model = Model()
    out = run(MicroBatcher(model, max_batch=64, max_wait_ms=200), [images(i) for i in range(10)])
    assert model.sizes == [10]
    assert [o.rows[0, 0].item() for o in out] == [2.0 * i for i in range(10)]
    assert all(o.batch_images == 10 and o.model_ms > 0 and o.queue_ms >= 0 for o in out)
    assert model.inference == [True] and model.threads == {"danlu-model_0"}  # inference_mode, off the event loop


def test_max_batch_one_is_no_batching():
    model = Model()
    out = run(MicroBatcher(model, max_batch=1, max_wait_ms=200), [images(i) for i in range(5)])
    assert model.sizes == [1] * 5 and [o.rows[0, 0].item() for o in out] == [0, 2, 4, 6, 8]


def test_batches_never_exceed_max_batch_and_keep_whole_requests():
    model = Model()
    requests = [images(*range(i, i + 3)) for i in range(0, 30, 3)]  # 10 requests of 3 images
    out = run(MicroBatcher(model, max_batch=8, max_wait_ms=200), requests)
    assert sum(model.sizes) == 30 and max(model.sizes) <= 8 and all(s % 3 == 0 for s in model.sizes)
    assert [o.rows[:, 0].tolist() for o in out] == [[2.0 * v for v in range(i, i + 3)] for i in range(0, 30, 3)]


def test_a_request_larger_than_max_batch_runs_alone_in_slices():
    model = Model()
    out = run(MicroBatcher(model, max_batch=4, max_wait_ms=1), [images(*range(10))])
    assert model.sizes == [4, 4, 2] and out[0].rows[:, 0].tolist() == [2.0 * v for v in range(10)]


def test_a_lone_request_waits_at_most_max_wait():
    """On a clock the test moves: the first request waits for company until max_wait after it was taken; one that
    comes meanwhile joins it without moving that end; when the clock reaches it the batch runs. A lone request
    waits max_wait, no more. queue_ms and model_ms are the clock's, exactly."""
    async def go():
        clock = FakeClock()
        model = Model(clock=clock, takes_s=0.125)
        batcher = MicroBatcher(model, max_batch=64, max_wait_ms=500, clock=clock.now, sleep=clock.sleep)
        await batcher.start()
        try:
            a = asyncio.create_task(batcher.submit(images(1)))  # at 0 s
            assert await _asked(clock, a) == 0.5
            clock.advance(0.25)
            b = asyncio.create_task(batcher.submit(images(2)))  # at 0.25 s, while a waits
            assert await _asked(clock, a, b) == 0.5  # b joined a: the wait still ends 0.5 s after a, not after b
            clock.advance(0.25)
            first = await _answered(a, b)
            c = asyncio.create_task(batcher.submit(images(3)))  # at 0.625 s (the forward pass took 0.125 s)
            assert await _asked(clock, c) == 1.125
            clock.advance(0.5)
            return model, first + await _answered(c)
        finally:
            await batcher.stop()

    model, (a, b, c) = asyncio.run(go())
    assert model.sizes == [2, 1]
    assert [o.rows[0, 0].item() for o in (a, b, c)] == [2.0, 4.0, 6.0]
    assert [(o.queue_ms, o.model_ms, o.batch_images) for o in (a, b, c)] == [(500, 125, 2), (250, 125, 2),
                                                                              (500, 125, 1)]


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    model = Model(fail_on=7)
    out = run(MicroBatcher(model, max_batch=1, max_wait_ms=0), [images(1), images(7), images(3)])
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "model failed"
    assert out[0].rows[0, 0].item() == 2 and out[2].rows[0, 0].item() == 6


@pytest.mark.parametrize("kw,words", [({"max_batch": 0}, "--max-batch 0"), ({"max_wait_ms": -1}, "--max-wait-ms -1")])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(DanluError, match=words):
        MicroBatcher(Model(), **kw)
