"""The time-to-accuracy recipes (mnist_fast, cifar10_fast): valid, their own model runs, and the target stops them.
Their figures on the real sets are in docs/BENCHMARKS.md (benchmarks/time_to_accuracy.py), not timed here."""
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
