"""What load_dataset("wds") returns (wds.sets): probes and normalization statistics read only the first images."""
from __future__ import annotations

import numpy as np
import pytest

from danlu.data.datasets import channel_stats
import shardfiles
from shardfiles import load, sample_ids

shards = shardfiles.shards  # the shared fixture, found by pytest under this name


def test_statistics_and_probes_read_only_the_first_images(shards):
    train, _ = load(shards, streams=4)
    first = train.images[:5]
    assert first.shape == (5, 3, 10, 12) and sample_ids(first) == [0, 1, 2, 3, 4]
    mean, std = channel_stats(train.images)
    assert len(mean) == 3 and mean[2] == pytest.approx(np.mean([40 * (i % 3) for i in range(65)]) / 255, rel=1e-6)
