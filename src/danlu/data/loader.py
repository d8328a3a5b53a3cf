"""DeviceLoader: the whole set lives on the training device; an epoch is one seeded permutation cut into batches.

    loader = DeviceLoader(train.images, train.labels, batch_size=64, device="cpu", seed=0)
    for x, y in loader.epoch(3, start=10):   # (64, C, H, W) uint8, (64,) int64, from batch 10 of epoch 3
        ...

The global order depends only on (seed, epoch), never on the number of processes: with `world` ranks, global
batch i is permutation[i*B*world : (i+1)*B*world] and rank r takes its r-th slice of B. So 2 ranks with batch B
see exactly the samples 1 rank with batch 2B sees.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class DeviceLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device | str,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.images = images.to(device, non_blocking=True)  # (N, C, H, W) uint8, resident on the device
        self.labels = labels.to(device, non_blocking=True)  # (N,) int64
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world
        self.device = torch.device(device)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Batches per epoch (for each rank)."""
        n = len(self.labels)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # a fresh permutation per (seed, epoch)
        return torch.randperm(n, generator=g).to(self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank."""
        order = self._order(epoch)
        gb, b = self.global_batch, self.batch_size
        for i in range(start, len(self)):
            idx = order[i * gb + self.rank * b: min(i * gb + (self.rank + 1) * b, len(order))]
            yield self.images[idx], self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
