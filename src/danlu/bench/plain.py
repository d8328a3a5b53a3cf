"""The plain PyTorch training loop bench measures danlu against: written out as a user would, with the same model,
batch and switches (autocast, one GradScaler for fp16, torch.compile, channels-last, CUDA graphs by hand)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # SGD as in Caffe's LeNet solver (and the project's raw_loop.py check)


class Plain:
    """A plain PyTorch training loop, written out as a user would, with the same switches as the danlu row (and
    DistributedDataParallel over the same process group where there are several processes)."""

    def __init__(self, recipe, train, device: torch.device, channels_last: bool, compile_mode: Optional[str],
                 dist):
        from danlu.engine.build import build_model

        self.float = torch.float64 if recipe.precision == "fp64" else torch.float32  # weights and batches
        torch.manual_seed(recipe.run.seed)  # the same initial weights as danlu's model (engine.build)
        model = build_model(recipe, train.shape, len(train.classes)).to(device, self.float)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision)
        self.device, self.batch, self.rank, self.world = device, recipe.data.batch_size, dist.rank, dist.world
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
        cache = not recipe.cuda_graphs
        self.autocast = (lambda: torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache)) \
            if self.dtype else contextlib.nullcontext
        if recipe.compile:
            model = torch.compile(model, mode=compile_mode)
        elif recipe.cuda_graphs:
            sample = torch.randn(self.batch, *train.shape, device=device).contiguous(memory_format=self.memory_format)
            with self.autocast():
                model = torch.cuda.make_graphed_callables(model, (sample,))
        self.model = model
        self.images, self.labels = train.images.to(device), train.labels.to(device)  # (N, C, H, W) uint8, (N,)
        self.g, self.order, self.pos = torch.Generator().manual_seed(1), None, 0

    def step(self) -> None:
        """One training step on the next batch."""
        model, opt, b, n = self.model, self.opt, self.batch, len(self.labels)
        gb = b * self.world  # a global batch; this process takes its slice
        if self.order is None or self.pos + gb > n:  # a new epoch: a fresh permutation, as DeviceLoader makes
            self.order, self.pos = torch.randperm(n, generator=self.g).to(self.device), 0
        idx = self.order[self.pos + self.rank * b:self.pos + (self.rank + 1) * b]
        self.pos += gb
        x = self.images[idx].to(self.float, memory_format=self.memory_format).mul_(1 / 255)  # (B, C, H, W)
        y = self.labels[idx]
        with self.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            self.step()

