"""danlu.bench.timing: the two loops interleaved step by step, each step timed from the end of the other loop's,
the loader's waits counted apart from the step, and numpy's percentile rule."""
import random

import numpy as np
import pytest
import torch

from danlu.bench.timing import Paired, StepMarks, WaitTimer, percentile
from danlu.engine import speed


class _Plain:
    """Stands for the plain loop: records how many marks were made when each of its steps ran."""

    def __init__(self):
        self.paired, self.seen = None, []

    def step(self) -> None:
        self.seen.append(len(self.paired.marks))


def test_a_plain_step_runs_between_the_end_of_each_danlu_step_and_the_next():
    plain = _Plain()
    paired = plain.paired = Paired(torch.device("cpu"), plain)
    paired.mark()  # the start
    for it in range(1, 4):  # train_loop's per-step call at the end of danlu's steps 1, 2, 3
        paired.tick(it, None, 0.0)
    assert plain.seen == [2, 4, 6]  # each right after the mark that ends a danlu step, before its own end mark
    assert len(paired.marks) == 7
    paired.marks = [0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0]  # the clock's readings at those marks
    assert paired.split() == ([1.0, 3.0, 5.0], [2.0, 4.0, 6.0])  # danlu's steps, the plain loop's


def test_step_marks_time_the_intervals_between_consecutive_marks():
    marks = StepMarks(torch.device("cpu"))
    marks.mark()
    for it in (1, 2):
        marks.tick(it, None, 0.0)
    seconds = marks.seconds()
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)  # the first mark only starts the count
    marks.marks = [5.0, 5.5, 7.0]
    assert marks.seconds() == [0.5, 1.5]


class _Clock:
    """A clock moved only by the loader and the consumer below: seconds as integers."""
    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


class _Loader:
    device, global_batch = torch.device("cpu"), 8

    def __len__(self) -> int:
        return 3

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, 3):
            _Clock.now += 2  # each batch takes the loader 2 s
            yield i


def test_the_loaders_waits_are_counted_and_the_steps_between_them_are_not(monkeypatch):
    monkeypatch.setattr(speed, "time", _Clock)  # the clock engine.speed.timed reads
    _Clock.now = 0.0
    loader = WaitTimer(_Loader())
    got = []
    for batch in loader.epoch(0):
        got.append(batch)
        _Clock.now += 5  # the training step on that batch: 5 s, not waiting
    assert got == [0, 1, 2] and len(loader) == 3 and loader.global_batch == 8
    assert loader.wait == 6  # 3 batches x 2 s
    assert list(loader.epoch(1, start=2)) == [2] and loader.wait == 8  # a resumed epoch waits for its one batch


@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_percentile_is_numpys_linear_rule(n):
    rng = random.Random(n)
    values = [rng.random() for _ in range(n)]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12), (n, q)
