"""The two loaders give one global order: DeviceLoader (the set resident on the device) and StreamLoader (host
memory, gathered ahead in a thread) yield the same batches; ranks take slices of the same global batches, so every
world size trains on the same samples and evaluates each sample once. (tests/data/test_store.py streams from a store,
tests/data/test_datasets.py checks the permutations.)"""
import itertools

import pytest
import torch

from danlu.data.loader import DeviceLoader, StreamLoader, epoch_order

N = 23  # a prime: no batch size divides it, so every last batch is partial


def _set():
    images = torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 2, 3).contiguous()  # pixel = index
    return images, torch.arange(N) * 10  # labels tell the sample too


def _batches(loader, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start)]


@pytest.mark.parametrize("world, shuffle, drop_last", list(itertools.product([1, 2, 3], [True, False], [True, False])))
def test_stream_and_device_loaders_give_the_same_batches_on_every_rank(world, shuffle, drop_last):
    images, labels = _set()
    for rank in range(world):
        kw = dict(device="cpu", shuffle=shuffle, drop_last=drop_last, seed=7, rank=rank, world=world)
        resident, streamed = DeviceLoader(images, labels, 3, **kw), StreamLoader(images, labels, 3, prefetch=2, **kw)
        assert len(resident) == len(streamed) == (N // (3 * world) if drop_last else -(-N // (3 * world)))
        for epoch, start in ((0, 0), (2, 1)):
            a, b = _batches(resident, epoch, start), _batches(streamed, epoch, start)
            assert len(a) == len(b) == len(resident) - start
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
                assert torch.equal(xa[:, 0, 0, 0].long() * 10, ya)  # images and labels stay paired


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_slice_each_global_batch_of_one_order(world):
    """Rank r's batch i is the r-th slice of B of global batch i; the global batches are the epoch's permutation
    cut into B x world, whatever the world size."""
    images, labels = _set()
    order = epoch_order(N, seed=5, epoch=1)
    ranks = [DeviceLoader(images, labels, 2, device="cpu", seed=5, rank=r, world=world) for r in range(world)]
    per_rank = [[y // 10 for _, y in loader.epoch(1)] for loader in ranks]
    for i, batches in enumerate(zip(*per_rank)):
        assert torch.equal(torch.cat(batches), order[i * 2 * world:(i + 1) * 2 * world])
    assert len(per_rank[0]) == N // (2 * world)  # training drops the last partial global batch


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_evaluation_over_ranks_sees_every_sample_once(world):
    images, labels = _set()
    seen = []
    for r in range(world):
        loader = StreamLoader(images, labels, 4, device="cpu", shuffle=False, drop_last=False, rank=r, world=world)
        seen += [int(v) // 10 for _, y in loader.epoch(0) for v in y]
    assert sorted(seen) == list(range(N))


def test_prefetched_raises_data_timeout_when_its_producer_hangs_and_leaves_it_behind():
    """prefetched(timeout=T) (what the wds ShardLoader streams through): a producer that queues nothing for T seconds
    is a DataTimeout (a DanluError), and leaving does not wait for that producer, stuck for good; without a
    timeout (StreamLoader) items come as before."""
    import threading

    from danlu.data.loader import END, DataTimeout, prefetched
    from danlu.errors import DanluError

    released = threading.Event()

    def stuck(put, stop):
        put(1)
        released.wait(60)  # hangs (until the test ends)

    items = prefetched(stuck, 2, "stuck", timeout=0.2)
    try:
        assert next(items) == 1
        with pytest.raises(DataTimeout, match="^stuck: nothing came in 0.2 s") as e:
            next(items)
        assert isinstance(e.value, DanluError)
        assert any(t.name == "stuck" and t.is_alive() for t in threading.enumerate())  # not waited for
    finally:
        released.set()

    def three(put, stop):
        for item in (1, 2, 3, END):
            put(item)

    assert list(prefetched(three, 1, "three")) == [1, 2, 3]
