import torch

from danlu.data.datasets import ImageSet, load_dataset, stratified_split
from danlu.data.loader import DeviceLoader


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    train, test = load_dataset("mnist5k")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    again, _ = load_dataset("mnist5k")
    assert torch.equal(again.images, train.images)
    assert train.images.float().mean() > 20  # real digits, not blank


def test_stratified_split_is_exact_and_disjoint():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    keep, held = stratified_split(labels, 0.2, seed=1)
    assert len(held) == 3 and len(keep) == 12
    assert not set(keep.tolist()) & set(held.tolist())
    assert set(labels[held].tolist()) <= {0, 1, 2}


def test_synthetic_is_seeded_and_learnable_in_principle():
    a, _ = load_dataset("synthetic", size=(12, 16), channels=3, num_classes=4, train_size=64, test_size=8)
    b, _ = load_dataset("synthetic", size=(12, 16), channels=3, num_classes=4, train_size=64, test_size=8)
    assert a.images.shape == (64, 3, 12, 16) and len(a.classes) == 4
    assert torch.equal(a.images, b.images)
    # the class signal: images of one class are closer to each other than to other classes
    m = torch.stack([a.images[a.labels == c].float().mean(0) for c in range(4)])
    assert (m[0] - m[1]).abs().mean() > 20


def _all_batches(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


def test_an_epoch_is_a_seeded_permutation_with_drop_last():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    loader = DeviceLoader(images, torch.arange(10), 3, device="cpu", seed=5)
    batches = _all_batches(loader, 0)
    assert len(loader) == 3 and len(batches) == 3
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 9  # a permutation, last partial batch dropped
    assert torch.equal(seen, torch.cat([y for _, y in _all_batches(loader, 0)]))  # same seed and epoch: same order
    assert not torch.equal(seen, torch.cat([y for _, y in _all_batches(loader, 1)]))  # a new order each epoch
    # starting mid-epoch gives the rest of the same epoch
    assert torch.equal(torch.cat([y for _, y in loader.epoch(0, start=1)]), seen[3:])


def test_evaluation_keeps_the_last_partial_batch():
    loader = DeviceLoader(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10), 4, device="cpu",
                          shuffle=False, drop_last=False)
    assert [len(y) for _, y in loader.epoch(0)] == [4, 4, 2]


def test_ranks_split_one_global_order():
    """2 ranks with batch B see exactly what 1 rank with batch 2B sees, whatever the world size."""
    images = torch.zeros(40, 1, 1, 1, dtype=torch.uint8)
    one = DeviceLoader(images, torch.arange(40), 8, device="cpu", seed=3)
    r0 = DeviceLoader(images, torch.arange(40), 4, device="cpu", seed=3, rank=0, world=2)
    r1 = DeviceLoader(images, torch.arange(40), 4, device="cpu", seed=3, rank=1, world=2)
    for (_, y), (_, a), (_, b) in zip(one.epoch(2), r0.epoch(2), r1.epoch(2)):
        assert torch.equal(y, torch.cat([a, b]))


def test_imageset_rejects_float_images():
    import pytest

    from danlu.errors import DanluError

    with pytest.raises(DanluError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a", "b"])
