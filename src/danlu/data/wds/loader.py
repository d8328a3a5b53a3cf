"""ShardLoader: batches of decoded shard samples on the device, in an order of (seed, epoch) only, read and decoded
as they stream; what `make_loader` returns for a ShardSet's images.

    loader = make_loader(train.images, None, 64, device="cuda", seed=0, rank=r, world=w)   # a ShardLoader
    for x, y in loader.epoch(3, start=10):   # (64, C, H, W) uint8 and (64,) int64 on the device, from batch 10

The order of an epoch depends on (seed, epoch) only, never on the number of processes, and each rank reads its own
shards:
  1. the shards are permuted by (seed, epoch), and each shard's samples are shuffled by (seed, epoch, shard), giving
     one sequence of all N samples (a shard's samples are read whole, as bytes, and shuffled in memory);
  2. the sequence is cut into K = `data.streams` equal streams (contiguous, N // K samples each; the last N mod K
     samples of the epoch are left out);
  3. global batch i (G = batch x processes samples, G a multiple of K) takes G / K samples from each stream, in
     stream order: rows [s G/K, (s + 1) G/K) come from stream s, samples [i G/K, (i + 1) G/K) of it;
  4. rank r of W (W divides K) takes streams [r K/W, (r + 1) K/W): its rows are the r-th contiguous B of the global
     batch (what `Augment.for_rank` expects), and it reads only the shards under its streams, a contiguous 1/W of the
     epoch's shard sequence (a shard cut by a stream boundary is read by both sides; at most W - 1 an epoch).
Batches per epoch: N // G, the same every epoch. `epoch(e, start=i)` resumes at batch i without decoding anything
before it: shards that lie wholly before batch i are not even opened.

Decoding: `decode="cpu"` for training in `data.workers` worker processes (torch's DataLoader, started at the first
epoch and kept, going on into the next epoch while this one's last batches train; each one reads the shards of, and
decodes, its own contiguous share of this rank's streams into shared-memory slots, so a batch is their parts one after
the other, the same as one thread's), else (testing, one worker, or streams that do not split) in a pool of threads; a
JPEG at least twice the target is decoded at a reduced DCT scale (`decode.decode_crop`: simplejpeg, the size from the
header alone; `decode.decode_image`: Pillow's draft).
`"cuda"`: batched with `torchvision.io.decode_jpeg(..., device="cuda")` (nvJPEG; PNG/WebP and what nvJPEG refuses
fall back to the CPU); `"auto"`: cuda on a CUDA device. Shards are read ahead (two reader threads, in each decode
process) and the next batches are decoded while the step runs. `take_crop(augment)` (training
loaders; `danlu train` calls it): each image is decoded straight into augment's random resized crop, a box of the
source's own pixels drawn from (seed, epoch, position in the epoch's sequence), at the smallest JPEG scale that covers
it (nvJPEG: cropped and resized on the GPU), and mirrored there by a draw of the same stream where augment flips.
An image that does not decode is
replaced by another image of its stream's share of the batch (the same on any number of processes; where that share
holds no other good image, of this process's batch), counted, and listed in data_report.json at the end of the run.

Hangs: a batch that does not come within `timeout` seconds (`data.timeout`: a decode process or thread that hangs,
a shard read that stalls) raises DataTimeout, one line naming the shard (and, decoded in threads, the samples) and
the position (epoch, batch), instead of a run that waits forever; the threads and processes stuck are left behind
(daemon threads) or terminated (decode processes), so the process can exit.
"""
from __future__ import annotations

import concurrent.futures
import copy
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing
from typing import Any, Optional

import numpy as np
import torch

from danlu.data.decode import ResizedCrop, decode_cuda, decode_rows, default_workers
from danlu.data.loader import END, DataTimeout, prefetched
from danlu.data.wds.samples import read_shard
from danlu.data.wds.urls import short_name
from danlu.errors import DanluError, few

DECODES = ("auto", "cpu", "cuda")
_CROP_WORD = 0x52524331  # "RRC1": keeps the crop draws' random streams apart from the order's


def _seeded(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


class _Threads:
    """A fixed set of daemon threads that run submitted calls, as a ThreadPoolExecutor does, except that a thread
    stuck for good (a decoder that hangs, a read that stalls) can be left behind: an executor's threads are joined
    when the interpreter exits, so one hung call would keep the process from exiting after DataTimeout."""

    def __init__(self, n: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{k}", daemon=True) for k in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - raised by the caller's result()
                    future.set_exception(e)

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Cancel the calls not started yet and end the threads; with `wait`, after the running calls finish."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()


class ShardLoader:
    """Batches of decoded shard samples on the device, in an order that depends on (seed, epoch) only (the module
    docstring). The same interface as DeviceLoader: `len()`, `epoch(e, start=i)` -> (uint8 (B, C, H, W) on the
    device, int64 (B,)), `global_batch`, `device`.

    drop_last=True (training): K = `streams` streams, len = N // G, each rank its own streams' shards.
    drop_last=False (testing): every sample once, in the shards' own order; rank r takes the r-th contiguous share
    (N / W samples), in batches of `batch_size` (the last one short; none past the share's end).
    `timeout`: seconds a batch may take to come (None: no limit); past it, DataTimeout."""

    def __init__(self, images: Any, batch_size: int, *, device, shuffle: bool = True,  # noqa: ANN001
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world: int = 1, prefetch: int = 3,
                 timeout: Optional[float] = None):
        # images: a wds.sets.ShardImages (not imported: its module imports this one to build ShardLoaders)
        self.images, self.batch_size, self.shuffle, self.drop_last = images, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.prefetch = seed, rank, world, max(1, prefetch)
        self.device = torch.device(device)
        if timeout is not None and not timeout > 0:
            raise DanluError(f"data.timeout={timeout}: expected a positive number of seconds")
        self.timeout = timeout
        self.counts = np.array([s.count for s in images.shards], np.int64)  # (S,) valid samples per shard
        self.n = int(self.counts.sum())
        self.workers = images.workers or default_workers()
        decode = images.decode
        if decode not in DECODES:
            raise DanluError(f"data.decode={decode}: expected one of {', '.join(DECODES)}")
        if decode == "cuda" and self.device.type != "cuda":
            raise DanluError(f"data.decode=cuda: the run's device is {self.device}; expected data.decode=auto or cpu "
                             f"(nvJPEG decodes on a CUDA device)")
        self.decode = "cuda" if decode == "auto" and self.device.type == "cuda" else ("cpu" if decode == "auto"
                                                                                       else decode)
        self.skipped: dict[tuple[str, str], dict[str, Any]] = {}  # (shard, key) -> entry: images that did not decode
        self.crop: Optional[ResizedCrop] = None  # training: each image's random resized crop, done by the decoder
        K = self.streams = images.streams
        if drop_last:
            G = self.global_batch
            if K % world:
                raise DanluError(f"data.streams={K}: {world} processes do not divide it; expected data.streams a "
                                 f"multiple of the number of processes (e.g. data.streams="
                                 f"{world * max(1, K // world)})")
            if G % K:
                step = K // math.gcd(K, world)  # per-process batches b with b * world a multiple of K
                below = batch_size // step * step
                near = [b for b in (below, below + step, below + 2 * step) if b >= step][:2]
                raise DanluError(f"data.batch_size={batch_size}: the global batch {G} ({batch_size} x {world} "
                                 f"process(es), x optim.accumulate where set) is not a multiple of data.streams={K}; "
                                 f"expected a per-process batch that is a multiple of {step}, e.g. "
                                 f"{near[0]} or {near[1]}")
            self.per_stream = self.n // K  # samples each stream holds in an epoch
        local = K // world if drop_last else 0  # decode processes split this rank's streams between them
        self.procs = max((d for d in range(1, min(self.workers, local) + 1) if local % d == 0), default=1)
        if self.procs < 2 or self.decode != "cpu":
            self.procs = 0  # decoded in threads of this process (testing, one worker, nvJPEG)
        self._decoders: Optional[tuple[_DecodeShare, Any]] = None  # (its dataset, the DataLoader) once started
        self._next: Optional[tuple[Iterator, tuple[int, int]]] = None  # (their running iterator, where it is)
        self._reading: dict[int, float] = {}  # shard -> when its read began, for the reads in flight (threads)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def take_crop(self, augment) -> list[str]:  # noqa: ANN001 - an Augment
        """Training: decode each image straight into `augment`'s random resized crop, a box of the source's own
        pixels (at the smallest JPEG scale that covers it), as DALI's and FFCV's decoders do, mirrored there too
        where `augment.flip` is on, and take those ops off `augment` (its device warp keeps rotation, zoom and
        translation; flipping a batch on the trainer's CPU had cost a fifth of the shard pipeline's speed on 2 cores,
        its threads waking beside the decode processes). Returns the augmentation's ops it took over."""
        if not self.drop_last or augment.resized_crop is None:
            return []
        self.crop = ResizedCrop(augment.resized_crop, augment.ratio, flip=bool(augment.flip))
        took = ["resized_crop"] + (["flip"] if augment.flip else [])
        augment.resized_crop, augment.flip = None, False
        return took

    def __len__(self) -> int:
        """Batches per epoch (for each rank): N // G in training; in testing, enough for the largest rank's share."""
        if self.drop_last:
            return self.n // self.global_batch
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    def _share(self) -> tuple[int, int]:
        """Test mode: (first position, count) of this rank's contiguous share of the N samples."""
        lo, hi = self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world
        return lo, hi - lo

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's sequence of all N samples: (shard index, index among the shard's valid samples) per position,
        shards permuted by (seed, epoch), each shard's samples by (seed, epoch, shard)."""
        S = len(self.counts)
        shards = _seeded(self.seed, epoch, S).permutation(S) if self.shuffle else np.arange(S)
        within = [(_seeded(self.seed, epoch, k, self.counts[k]).permutation(int(self.counts[k])) if self.shuffle
                   else np.arange(self.counts[k])) for k in shards]
        return np.repeat(shards, self.counts[shards]), (np.concatenate(within) if within else np.zeros(0, np.int64))

    def positions(self, i: int) -> np.ndarray:
        """This rank's rows of global batch i, as positions of the epoch's sequence (stream-major)."""
        if self.drop_last:
            b, K, W = self.global_batch // self.streams, self.streams, self.world
            mine = np.arange(self.rank * K // W, (self.rank + 1) * K // W)  # this rank's streams
            return (mine[:, None] * self.per_stream + i * b + np.arange(b)[None, :]).ravel()
        lo, count = self._share()
        return lo + np.arange(i * self.batch_size, min(count, (i + 1) * self.batch_size))

    def stream_of(self, positions: np.ndarray) -> np.ndarray:
        """The stream each row belongs to (bad images are replaced within their stream's share of the batch)."""
        return positions // self.per_stream if self.drop_last else np.zeros(len(positions), np.int64)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank."""
        if self.procs:
            yield from self._epoch_in_processes(epoch, start)
            return
        decoder = _Threads(self.workers, "danlu-wds-decode")
        hung, i = False, start  # i: the batch waited for
        try:
            with closing(prefetched(lambda put, stop: self._produce(epoch, start, put, stop, decoder), self.prefetch,
                                    "danlu-wds", self.timeout)) as items:
                while True:
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    except DataTimeout:  # the producer queued nothing: a shard read stalls
                        hung = True
                        raise self._late(epoch, i, "reading", self._stalled_reads(epoch, i)) from None
                    try:
                        batch = self._finish(item, epoch, i)
                    except DataTimeout:
                        hung = True
                        raise
                    yield batch
                    i += 1
        finally:
            decoder.shutdown(wait=not hung)  # a thread stuck for good is left behind, a daemon

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def close(self) -> None:
        """End the decode processes now (kept from epoch to epoch, they otherwise end when the loader is collected:
        left to the garbage collector, torch's finalizer may wait seconds for them); a later epoch starts new ones."""
        self._decoders = self._next = None  # the last references to the DataLoader: its finalizer runs here

    def _late(self, epoch: int, i: int, doing: str, samples: list[tuple[str, Optional[str]]]) -> DataTimeout:
        """The one line of batch i of `epoch` not coming within `timeout` seconds: what was `doing` ('decoding',
        'reading', ...) which (shard url, sample key or None) when time ran out."""
        shards = list(dict.fromkeys(url for url, _ in samples))
        keys = [key for _, key in samples if key is not None]
        what = (f"sample{'s' if len(keys) > 1 else ''} {few(keys, 3)} of " if keys else "") + \
            f"shard{'s' if len(shards) > 1 else ''} {few(shards, 2)}"
        at = f"epoch {epoch}, batch {i}" if self.drop_last else f"test batch {i}"  # (testing reads epoch 0 only)
        rank = f" on rank {self.rank}" if self.world > 1 else ""
        return DataTimeout(f"data.timeout={self.timeout:g}: no batch for {self.timeout:g} s at {at} of {len(self)}"
                           f"{rank}: {doing} {what} did not finish; expected each batch within data.timeout seconds "
                           f"(a hung decoder or a stalled read; raise data.timeout for slow remote shards)")

    def _rows_shards(self, epoch: int, positions: np.ndarray) -> list[tuple[str, Optional[str]]]:
        """(shard url, None) of the shards that hold these positions of the epoch's sequence, in their order."""
        shard_at, _ = self.order(epoch)
        return [(self.images.shards[int(k)].url, None) for k in dict.fromkeys(shard_at[positions].tolist())]

    def _stalled_reads(self, epoch: int, i: int) -> list[tuple[str, Optional[str]]]:
        """The shards being read now, the longest-running first; none in flight: the shards of batch i."""
        reading = sorted(dict(self._reading).items(), key=lambda kv: kv[1])
        if reading:
            return [(self.images.shards[k].url, None) for k, _ in reading]
        return self._rows_shards(epoch, self.positions(i))

    # -- the producer thread: read shards ahead, queue each batch's decoding

    def _produce(self, epoch: int, start: int, put, stop: threading.Event, decoder: _Threads) -> None:  # noqa: ANN001
        try:
            ahead = self.streams // self.world + 2 if self.drop_last else 2  # shards read ahead of the batch's own
            with closing(self._picked(epoch, start, self.positions, ahead)) as batches:
                for rws, picked in batches:
                    if stop.is_set() or not put(self._submit(picked, self.stream_of(rws), self._draws(epoch, rws),
                                                             decoder)):
                        return
            put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    def _picked(self, epoch: int, start: int, rows_of, ahead: int) -> Iterator[tuple[np.ndarray, list]]:  # noqa: ANN001
        """(positions, samples) of batches start, start + 1, ... of `epoch`, `rows_of(i)` the positions wanted of
        batch i: the shards they lie in are read in the order needed (two reader threads, `ahead` shards beyond the
        batch's own in flight), each dropped after the last batch that needs it."""
        n_batches = len(self)
        if start >= n_batches:
            return
        shard_at, within = self.order(epoch)
        rows = [rows_of(i) for i in range(start, n_batches)]
        need = [shard_at[r] for r in rows]  # shard of every row, per batch
        first = list(dict.fromkeys(int(k) for nd in need for k in nd))  # shards in the order they are needed
        last = {int(k): j for j, nd in enumerate(need) for k in np.unique(nd)}
        reader = _Threads(2, "danlu-wds-read")
        try:
            live: dict[int, Future] = {}
            nxt = 0
            for j, rws in enumerate(rows):
                for k in np.unique(need[j]).tolist():
                    if k not in live:
                        live[k] = reader.submit(self._read, k)
                while nxt < len(first) and len(live) < len(np.unique(need[j])) + ahead:
                    if first[nxt] not in live and last.get(first[nxt], -1) >= j:
                        live[first[nxt]] = reader.submit(self._read, first[nxt])
                    nxt += 1
                picked = [live[int(k)].result()[int(w)] for k, w in zip(need[j], within[rws])]
                for k in [k for k in live if last[k] == j]:  # no later batch needs these shards
                    del live[k]
                yield rws, picked
        finally:  # leaving early (a break, an error): the reads not started yet are dropped
            reader.shutdown(wait=True)

    def _read(self, k: int) -> list[tuple[str, str, bytes, int]]:
        """Shard k's valid samples as (shard url, key, image bytes, label); its count must be the index's."""
        url = self.images.shards[k].url
        self._reading[k] = time.monotonic()  # named by DataTimeout if this read stalls
        try:
            good, _ = read_shard(url, self.images.labels)
        finally:
            self._reading.pop(k, None)
        if len(good) != self.counts[k]:
            raise DanluError(f"data.root: shard {url} holds {len(good)} readable samples, its index {self.counts[k]} "
                             f"(the shard changed or was damaged after it was indexed); expected the shards as "
                             f"indexed: prepare again, or delete index.json to count them anew")
        return [(url, key, data, label) for key, data, label in good]

    def _draws(self, epoch: int, positions: np.ndarray) -> Optional[np.ndarray]:
        """(B, 5) uniforms choosing each row's crop box and whether it is mirrored (`crop` set, training only), from
        (seed, epoch, position in the epoch's sequence): the same on any number of processes, and when resumed
        mid-epoch."""
        if self.crop is None or not self.drop_last:
            return None
        return np.stack([_seeded(self.seed, epoch, int(q), _CROP_WORD).random(5) for q in positions])

    def _submit(self, picked: list, streams: np.ndarray, draws: Optional[np.ndarray], decoder: _Threads) -> tuple:
        """Queue the decoding of one batch: (samples, streams, labels, crop draws, images buffer, [(future, lo, hi)]
        of its rows' decoding, each future giving its bad rows); on CUDA no buffer nor futures: the batch is decoded
        when it is taken."""
        B, (h, w), c = len(picked), self.images.size, self.images.channels
        labels = np.array([p[3] for p in picked], np.int64)
        if self.decode == "cuda":
            return picked, streams, labels, draws, None, []
        out = torch.empty((B, c, h, w), dtype=torch.uint8, pin_memory=self.device.type == "cuda")  # pinned: copied
        # to the device without blocking
        arr, data = out.numpy(), [p[2] for p in picked]
        step = max(1, math.ceil(B / (self.workers * 2)))
        futures = [(decoder.submit(decode_rows, data, arr, lo, min(B, lo + step), self.images.size,
                                   self.images.channels, self.images.resize, self.crop, draws), lo, min(B, lo + step))
                   for lo in range(0, B, step)]
        return picked, streams, labels, draws, out, futures

    # -- decode processes: each one reads and decodes the rows of its own streams of every batch

    def _epoch_in_processes(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches decoded by `procs` worker processes (torch's DataLoader: started at the first epoch and kept,
        their parts handed over in shared memory, in turn), process j taking the j-th contiguous share of this rank's
        streams: their rows of each batch are contiguous too, so a batch is its parts one after the other. The
        processes go on into the next epoch without waiting: an epoch taken whole leaves them decoding the next one's
        first batches, which `epoch(e + 1)` then takes; any other start (a resume, an epoch left early) restarts them
        there. A part that does not come within `timeout` seconds: DataTimeout, and the processes are ended."""
        from torch.utils.data import DataLoader  # its worker machinery is only needed where processes decode

        W = self.procs
        if self._decoders is None:  # started at the first epoch, kept for the next ones
            share = _DecodeShare(self)
            self._decoders = share, DataLoader(share, batch_size=None, num_workers=W, prefetch_factor=self.prefetch,
                                               pin_memory=self.device.type == "cuda", persistent_workers=True,
                                               timeout=self.timeout or 0)
        share, decoders = self._decoders
        if self._next is None or self._next[1] != (epoch, start):
            self._next = None  # (the DataLoader's reset drops what the processes decoded ahead)
            share.at[0], share.at[1] = epoch, start  # read by each process as it starts there
            it = iter(decoders)
        else:
            it = self._next[0]
        self._next = None  # until this epoch is taken whole
        held: list = []  # the last parts' shared memory, kept mapped: a slot sent again maps no new pages (CUDA:
        # the DataLoader's pinned copies, nothing to keep)
        for i in range(start, len(self)):
            parts: list = []
            while len(parts) < W:
                try:
                    parts.append(next(it))
                except RuntimeError as e:  # torch's "DataLoader timed out after T seconds"
                    if self.timeout is None or "timed out" not in str(e):
                        raise
                    break  # (raised below, outside this handler: the error keeps no reference to the iterator)
            if len(parts) < W:
                # Drop the DataLoader now: its iterator's finalizer asks the processes to stop, waits up to a few
                # seconds for them (torch's MP_STATUS_CHECK_INTERVAL) and terminates the one that hangs.
                self.close()
                share = decoders = it = None  # noqa: F841 - the last references
                j, b = len(parts), self.batch_size // W  # the process that did not deliver, its rows of batch i
                raise self._late(epoch, i, f"decode process {j} of {W}, reading or decoding",
                                 self._rows_shards(epoch, self.positions(i)[j * b:(j + 1) * b]))
            for part in parts:
                if isinstance(part, _Failed):
                    part.throw()
            if self.device.type != "cuda":
                held = [p[0] for p in parts] + held[:W * (self.prefetch + 2)]
            x = (torch.from_numpy(np.concatenate([p[0].numpy() for p in parts])) if self.device.type == "cpu"
                 else torch.cat([p[0].to(self.device, non_blocking=p[0].is_pinned()) for p in parts]))  # numpy:
            # one thread's copy, no intra-op team to wake and spin beside the decode processes; a slot (unpinned) is
            # copied before the next part is asked for
            labels, streams = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
            bad = {i + k * len(parts[0][1]): b for k, p in enumerate(parts) for i, b in p[3].items()}
            if bad:
                self._mend(x, labels, streams, bad)
            yield x, torch.from_numpy(labels).to(self.device, non_blocking=True)
        self._next = it, (epoch + 1, 0)

    # -- the consumer: wait for the batch, mend bad rows, hand it to the device

    def _finish(self, item: tuple, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i of `epoch` from its queued decoding: wait for it (at most `timeout` seconds), mend bad rows, hand
        it to the device."""
        picked, streams, labels, draws, out, futures = item
        if self.decode == "cuda":
            x, bad = decode_cuda([p[2] for p in picked], self.images.size, self.images.channels, self.images.resize,
                                 self.device, self.crop, draws)
        else:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            bad = {}
            for f, lo, hi in futures:
                try:
                    bad.update(f.result(None if deadline is None else max(0.0, deadline - time.monotonic())))
                except concurrent.futures.TimeoutError:  # (Python 3.10: not the builtin TimeoutError)
                    raise self._late(epoch, i, "decoding", [(p[0], p[1]) for p in picked[lo:hi]]) from None
            x = out
        bad = {i: (picked[i][0], picked[i][1], reason) for i, reason in bad.items()}
        if bad:
            self._mend(x, labels, streams, bad)
        y = torch.from_numpy(labels)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)

    def _mend(self, x: torch.Tensor, labels: np.ndarray, streams: np.ndarray,
              bad: dict[int, tuple[str, str, str]]) -> None:
        """Replace each row that did not decode ({row: (shard, key, reason)}) by the next good row of its stream's
        share of the batch (cyclically; the same on any number of processes), else by the next good row of this
        rank's batch, else by zeros."""
        for i, (url, key, reason) in sorted(bad.items()):
            entry = {"shard": url, "key": key, "reason": reason}
            if not self.skipped:
                warnings.warn(f"data: {short_name(url)} {key}: {reason}; replaced by another image of its batch (every "
                              f"such sample is listed in data_report.json in the run folder)", stacklevel=4)
            self.skipped.setdefault((url, key), entry)
            good = []
            for rows in (np.flatnonzero(streams == streams[i]), np.arange(len(streams))):
                good = good or [j for j in np.roll(rows, -int(np.searchsorted(rows, i))) if j not in bad]
            if good:
                x[i] = x[good[0]]
                labels[i] = labels[good[0]]
            else:
                x[i] = 0


class _Failed:
    """An error in a decode process, handed to the training process to raise there as itself (a DanluError keeps
    its one line), rather than as the DataLoader's multi-line report of a worker's traceback."""

    def __init__(self, e: BaseException):
        self.error = e if isinstance(e, DanluError) else \
            RuntimeError(f"shard decoding process: {type(e).__name__}: {e}")

    def throw(self) -> None:
        raise self.error


class _DecodeShare(torch.utils.data.IterableDataset):
    """What decode process j of a ShardLoader's `procs` yields for an epoch: for each batch from `start`, the rows of
    its streams (the j-th contiguous share of this rank's), read and decoded here, as (uint8 (b, C, H, W), labels,
    streams, {row: (shard, key, reason)} of rows that did not decode)."""

    def __init__(self, loader: ShardLoader):
        self.loader = copy.copy(loader)  # without the processes: no reference cycle keeps them alive, and a process
        self.loader._decoders = None  # forked later (another loader's) inherits no DataLoader of this one's to collect
        self.at = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start), set by the training process

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        j, W = (info.id, info.num_workers) if info is not None else (0, 1)
        L, (epoch, start) = self.loader, self.at.tolist()
        b = L.batch_size // W  # rows of a batch this process decodes
        (h, w), c = L.images.size, L.images.channels
        # Each part is decoded straight into one of a ring of shared-memory slots, sent without a copy. A slot is
        # written again prefetch + 3 parts later: by then the training process has copied it out (it holds at most
        # the `prefetch` parts it asked for ahead, and the one it is copying).
        sent = 0
        try:
            slots = [torch.empty((b, c, h, w), dtype=torch.uint8).share_memory_() for _ in range(L.prefetch + 3)] \
                if info is not None else []
            while len(L):  # epoch after epoch, until the training process stops asking (or restarts this elsewhere)
                with closing(L._picked(epoch, start, lambda i: L.positions(i)[j * b:(j + 1) * b],
                                       L.streams // L.world // W + 2)) as batches:
                    for rws, picked in batches:
                        out = slots[sent % len(slots)] if slots else torch.empty((b, c, h, w), dtype=torch.uint8)
                        sent += 1
                        bad = decode_rows([p[2] for p in picked], out.numpy(), 0, len(picked), L.images.size,
                                          L.images.channels, L.images.resize, L.crop, L._draws(epoch, rws))
                        yield (out, np.array([p[3] for p in picked], np.int64), L.stream_of(rws),
                               {i: (picked[i][0], picked[i][1], reason) for i, reason in bad.items()})
                if info is None:  # in this process (tests): one epoch
                    return
                epoch, start = epoch + 1, 0
        except Exception as e:  # noqa: BLE001 - raised in the training process
            yield _Failed(e)
