"""DeviceLoader: the whole set lives on the training device; an epoch is one seeded permutation cut into batches.

    loader = DeviceLoader(train.images, train.labels, batch_size=64, device="cpu", seed=0)
    for x, y in loader.epoch(3, start=10):   # (64, C, H, W) uint8, (64,) int64, from batch 10 of epoch 3
        ...

The global order depends only on (seed, epoch), never on the number of processes: with `world` ranks, global
batch i is permutation[i*B*world : (i+1)*B*world] and rank r takes its r-th slice of B. So 2 ranks with batch B
see exactly the samples 1 rank with batch 2B sees.

StreamLoader (below) gives the same batches in the same order for sets that stay in host memory (a prepared store,
memory-mapped), copying each batch to the device in the background; `make_loader` picks one of the two (or, for tar
shards, wds.loader.ShardLoader: the same interface, its own order of shards and streams).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from danlu.errors import DanluError


class Loader(Protocol):
    """What the training loop and evaluation read batches from: DeviceLoader, StreamLoader and the tar shards'
    ShardLoader (danlu.data.wds.loader) all are one."""
    device: torch.device

    @property
    def global_batch(self) -> int:
        """Images per step over all ranks (this rank's batch x ranks)."""

    def __len__(self) -> int:
        """Batches per epoch (for each rank)."""

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank: (B, C, H, W) uint8 and (B,) int64 labels, on
        `device`."""


@runtime_checkable
class DecodingLoader(Loader, Protocol):
    """A loader that decodes images as it goes (tar shards): it can cut the random resized crop while decoding, and
    it records the images that did not decode."""
    skipped: dict[Any, dict[str, Any]]  # (shard, key) -> {shard, key, reason}

    def take_crop(self, augment: Any) -> list[str]:
        """Take over the augmentation's random resized crop (and flip), cutting it from each source image as it is
        decoded; returns the ops taken off `augment` (none where it cannot)."""


@runtime_checkable
class StreamedImages(Protocol):
    """Images that are read from their source batch by batch and make their own loader (tar shards)."""

    def make_loader(self, batch_size: int, *, device: torch.device, **kw: Any) -> Loader:
        """Their loader: as make_loader's keywords (shuffle, drop_last, seed, rank, world)."""

    def stats_sample(self) -> torch.Tensor:
        """(N, C, H, W) uint8: the images normalization statistics are computed from."""


class _Sharded:
    """What both loaders share: batches of `batch_size` per rank, `world` ranks, slices of one global order."""
    labels: torch.Tensor
    batch_size: int
    world: int
    rank: int
    drop_last: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Batches per epoch (for each rank)."""
        n = len(self.labels)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _rows(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's share of global batch i of `order`."""
        gb, b = self.global_batch, self.batch_size
        return order[i * gb + self.rank * b: min(i * gb + (self.rank + 1) * b, len(order))]


class DeviceLoader(_Sharded):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device | str,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.images = images.to(device, non_blocking=True)  # (N, C, H, W) uint8, resident on the device
        self.labels = labels.to(device, non_blocking=True)  # (N,) int64
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world
        self.device = torch.device(device)

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.labels), self.seed, epoch, self.shuffle).to(self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank."""
        order = self._order(epoch)
        for i in range(start, len(self)):
            idx = self._rows(order, i)
            yield _take(self.images, idx), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def _take(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """images[idx] (B, C, H, W). On the CPU through numpy: the same values, but a plain row copy, where torch's
    threaded index kernel is several times slower and stalls when other processes share the cores."""
    if images.device.type == "cpu":
        return torch.from_numpy(np.take(images.numpy(), idx.numpy(), axis=0))
    return images[idx]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The global order of one epoch on the CPU: DeviceLoader's permutation for (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # a fresh permutation per (seed, epoch)
    return torch.randperm(n, generator=g)


class DataTimeout(DanluError):
    """A loader produced no batch for `data.timeout` seconds (a decoder that hangs, a read that stalls): one line
    naming the shard or file and the position (epoch, batch) it stopped at, instead of a run that waits forever."""


END = object()  # what a prefetch producer queues last


def prefetched(produce, depth: int, name: str, timeout: Optional[float] = None) -> Iterator:
    """Items that `produce(put, stop_event)` queues from a daemon thread, at most `depth` ahead, until it queues
    END; an exception it queues is raised here. `put(item)` waits for room and returns False, the item dropped,
    once the consumer has left (the producer then returns). Leaving early stops the producer and unblocks it from a
    full queue (the StreamLoader's and the wds ShardLoader's prefetch both run through here). `timeout`: seconds to
    wait for each item; past it DataTimeout is raised here, and a producer that does not stop within `timeout` of
    being asked (stuck for good) is left to itself, a daemon thread, rather than joined forever."""
    import queue
    import threading
    import time

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    def put(item) -> bool:  # noqa: ANN001
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    worker = threading.Thread(target=produce, args=(put, stop), daemon=True, name=name)
    worker.start()
    hung = False
    try:
        while True:
            try:
                item = q.get(timeout=timeout)
            except queue.Empty:
                hung = True
                raise DataTimeout(f"{name}: nothing came in {timeout:g} s") from None  # the caller says where
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while worker.is_alive() and not hung:  # unblock a producer waiting on a full queue
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.01)


class StreamLoader(_Sharded):
    """Batches streamed from host memory (a tensor, or a store's memory-mapped ShardedImages) to the device, in
    exactly DeviceLoader's order: same `epoch(epoch, start)`, `len()`, `device`, `global_batch`, same rank slices.

        loader = StreamLoader(store_images, labels, batch_size=256, device="cuda", seed=0)
        for x, y in loader.epoch(3, start=10):   # (256, C, H, W) uint8 and (256,) int64, already on the device

    A background thread gathers batch k+1 (and up to `prefetch` ahead) into pinned host buffers and starts its
    non-blocking copy on a side CUDA stream while the training step runs on batch k; the consumer's stream waits on
    the copy's event before using it. On the CPU the thread just gathers ahead. Leaving an epoch early (a `break`)
    stops the thread.
    """

    def __init__(self, images, labels: torch.Tensor, batch_size: int, *, device: torch.device | str,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 prefetch: int = 3):
        self.images, self.labels = images, labels.cpu()  # (N, C, H, W) uint8 on the host, (N,) int64
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.prefetch = seed, rank, world, max(1, prefetch)
        self.device = torch.device(device)

    def _gather(self, rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """uint8 (len(rows), C, H, W) on the host, into `out` when given (a pinned buffer)."""
        if isinstance(self.images, torch.Tensor):
            return torch.index_select(self.images, 0, rows, out=out) if out is not None else _take(self.images, rows)
        if out is not None:
            self.images.gather(rows.numpy(), out=out.numpy())
            return out
        return torch.from_numpy(self.images.gather(rows.numpy()))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank."""
        for x, y, ready in prefetched(lambda put, stop: self._produce(epoch, start, put), self.prefetch,
                                      "danlu-prefetch"):
            if ready is not None:  # the copy ran on a side stream: order it before this stream's use
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                x.record_stream(stream)
                y.record_stream(stream)
            yield x, y

    def _produce(self, epoch: int, start: int, put) -> None:
        try:
            order = epoch_order(len(self.labels), self.seed, epoch, self.shuffle)
            cuda = self.device.type == "cuda"
            if cuda:
                if self.device.index is not None:
                    torch.cuda.set_device(self.device.index)  # this thread's current device: the loader's
                side = torch.cuda.Stream(self.device)
                shape = (self.batch_size, *self.images.shape[1:])
                slots = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(self.prefetch + 2)]
                done: list = [None] * len(slots)  # copy-finished event of each slot's last use
            for k, i in enumerate(range(start, len(self))):
                rows = self._rows(order, i)
                if cuda:
                    s = k % len(slots)
                    if done[s] is not None:
                        done[s].synchronize()  # the previous copy out of this pinned buffer has finished
                    x = self._gather(rows, slots[s][:len(rows)])
                    y = self.labels[rows].pin_memory()
                    with torch.cuda.stream(side):
                        xd, yd = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                        done[s] = torch.cuda.Event()
                        done[s].record(side)
                    item = (xd, yd, done[s])
                else:
                    item = (self._gather(rows, None), self.labels[rows], None)
                if not put(item):
                    return
            put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def memory_budget(device: torch.device) -> int:
    """Bytes of data a loader may keep resident on `device`: 60% of the free GPU memory (the rest is for the model,
    activations and the allocator), or half the available host memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()}
        return int(info.get("MemAvailable", info.get("MemFree", 0)) * 0.5)
    except (OSError, ValueError, IndexError):
        return 2 << 30


def make_loader(images, labels: torch.Tensor, batch_size: int, *, device: torch.device | str,
                cache: bool | str = "auto", **kw) -> Loader:
    """A DeviceLoader when the set lives (or should live) whole on the device, else a StreamLoader.

    cache: True -> always resident; False -> always streamed (except a CPU-resident tensor trained on the CPU, which
    is already where it would be streamed to); "auto" -> resident when the images fit `memory_budget(device)`.
    kw: shuffle, drop_last, seed, rank, world (as DeviceLoader). Images that stream themselves (tar shards,
    wds.ShardImages) build their own loader, with the same interface."""
    device = torch.device(device)
    if isinstance(images, StreamedImages):
        return images.make_loader(batch_size, device=device, **kw)
    already = isinstance(images, torch.Tensor) and images.device == device  # e.g. a CPU tensor trained on the CPU
    if already or cache is True or (cache == "auto" and _nbytes(images) <= memory_budget(device)):
        return DeviceLoader(images, labels, batch_size, device=device, **kw)
    return StreamLoader(images, labels, batch_size, device=device, **kw)


def _nbytes(images) -> int:
    """Bytes of a uint8 image set: a tensor or a store's ShardedImages."""
    return images.numel() if isinstance(images, torch.Tensor) else images.nbytes
