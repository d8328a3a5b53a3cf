"""The time-to-accuracy recipes (mnist_fast, cifar10_fast): valid, their own model runs, and the target stops them.
Their figures on the real sets are in docs/evidence/benchmarks.md (benchmarks/time_to_accuracy.py), not timed here."""
import torch

import danlu
from danlu.config import load_recipe


def test_mnist_fast_is_a_bn_lenet_with_a_target_on_the_whole_test_set():
    r = load_recipe("mnist_fast")
    assert (r.model.name, r.model.kwargs, r.data.name, r.schedule.policy) == ("lenet", {"bn": True}, "mnist", "onecycle")
    assert (r.run.target.metric, r.run.target.value, r.run.test_iter) == ("acc", 0.99, None)  # every test image
    assert r.precision == "auto"


def test_mnist_fast_trains_and_stops_at_its_target_on_the_bundled_digits(tmp_path):
    # the bundled 5,000 digits stand in for MNIST (no download here); a lower target this run reaches
    r = danlu.train("mnist_fast", overrides=["data.name=mnist5k", "run.target.value=0.9", "run.test_interval=10",
                                            "run.tensorboard=false"], out=tmp_path / "run", device="cpu", quiet=True)
    s = r.summary
    assert s["target_reached"] and s["iterations_to_target"] == r.iterations < s["recipe"]["run"]["epochs"] * 31
    assert r.test_accuracy >= 0.9


def test_the_bn_lenet_normalizes_after_each_convolution():
    plain = danlu.create_model("lenet", num_classes=10, in_channels=1)
    bn = danlu.create_model("lenet", num_classes=10, in_channels=1, bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 2
    assert bn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _cifar10_4k():
    """The first 4,000 CIFAR-10 training images (shared data's PNG sprites; skipped where they are absent)."""
    import numpy as np
    import pytest
    from PIL import Image

    from conftest import SHARED_DATA

    folder = SHARED_DATA / "cifar10_4k"
    if not (folder / "labels_derived.txt").is_file():
        pytest.skip(f"{folder} is missing (the project's shared real data)")
    rows = [np.asarray(Image.open(folder / f"cifar10_batch_{i}.png").convert("RGB")) for i in range(4)]
    x = np.concatenate(rows).reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)  # (4000, 3, 32, 32): a row is an image
    y = np.array([int(v) for v in (folder / "labels_derived.txt").read_text().split()])
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return (danlu.ImageSet(torch.from_numpy(np.ascontiguousarray(x[:3500])), torch.from_numpy(y[:3500]), classes),
            danlu.ImageSet(torch.from_numpy(np.ascontiguousarray(x[3500:])), torch.from_numpy(y[3500:]), classes))


def test_cifar10_fast_runs_its_own_model_augmentation_and_test_flip_on_real_cifar(tmp_path):
    train, test = _cifar10_4k()
    r = danlu.train("cifar10_fast", overrides=["data.batch_size=64", "run.max_iter=4", "run.test_interval=4",
                                              "compile=false", "run.tensorboard=false"],
                    train_data=train, test_data=test, out=tmp_path / "run", device="cpu", quiet=True)
    s = r.summary
    assert s["recipe"]["model"]["name"] == "airbench" and s["recipe"]["model"]["test_flip"] is True
    assert r.iterations == 4 and torch.isfinite(torch.tensor(r.test_loss)) and 0 <= r.test_accuracy <= 1
    assert s["target"] == {"metric": "acc", "value": 0.94} and s["target_reached"] is False
    load = load_recipe("cifar10_fast")
    assert (load.compile, load.precision, load.augment.flip, load.augment.crop) == (True, "auto", True, 2)
