"""The micro-batcher on its own: who shares a forward pass, who gets which rows, and what a failure does."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from danlu.errors import DanluError
from danlu.serve.batcher import MicroBatcher


class Model:
    """Doubles its input and records each batch size (and whether it ran under inference_mode, off the loop)."""

    def __init__(self, fail_on: int | None = None):
        self.sizes, self.inference, self.threads, self.fail_on = [], [], set(), fail_on

    def __call__(self, x):  # (B, 1, 2, 2) uint8 -> (B, 4) float
        self.sizes.append(len(x))
        self.inference.append(torch.is_inference_mode_enabled())
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on in x.flatten().tolist():
            raise RuntimeError("model failed")
        return 2 * x.flatten(1).float()


def images(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def run(batcher: MicroBatcher, requests: list[torch.Tensor], stagger_s: float = 0.0):
    async def go():
        await batcher.start()
        try:
            tasks = []
            for r in requests:
                tasks.append(asyncio.create_task(batcher.submit(r)))
                if stagger_s:
                    await asyncio.sleep(stagger_s)
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
    model = Model()
    out = run(MicroBatcher(model, max_batch=64, max_wait_ms=30), [images(1), images(2)], stagger_s=0.5)
    assert model.sizes == [1, 1]  # the second came after the first's wait was over
    assert all(20 <= o.queue_ms < 400 for o in out)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    model = Model(fail_on=7)
    out = run(MicroBatcher(model, max_batch=1, max_wait_ms=0), [images(1), images(7), images(3)])
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "model failed"
    assert out[0].rows[0, 0].item() == 2 and out[2].rows[0, 0].item() == 6


@pytest.mark.parametrize("kw,words", [({"max_batch": 0}, "--max-batch 0"), ({"max_wait_ms": -1}, "--max-wait-ms -1")])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(DanluError, match=words):
        MicroBatcher(Model(), **kw)
