"""danlu.bench.plain: the plain PyTorch loop bench compares danlu against does the same training as danlu's step
(so danlu / plain measures only what danlu adds), in float64 where no rounding can hide a difference."""
import torch

from danlu.bench import Combo, bench_recipe
from danlu.bench.matrix import DanluStep
from danlu.bench.plain import Plain
from danlu.bench.timing import StepMarks
from danlu.data.imageset import ImageSet
from danlu.engine.distributed import Dist

CPU = torch.device("cpu")


def test_the_plain_loop_trains_as_danlus_step_does():
    """LeNet at 16 px, one batch of 16 as the whole set (each step sees every image, so the two loops' different
    shuffles give the same batch): the same initial weights, and after 3 SGD steps (LR, momentum and weight decay of
    the plain loop) the same weights as danlu's train_loop, to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=g)  # (N, C, H, W)
    train = ImageSet(images, torch.randint(0, 10, (16,), generator=g), [str(i) for i in range(10)])
    recipe = bench_recipe("lenet", 16, 1, 10, 16, Combo("fp64", "off", False, 1), "auto", CPU)
    danlu = DanluStep(recipe, train, CPU, "device", Dist(device=CPU))
    plain = Plain(recipe, train, CPU, danlu.channels_last, danlu.speed.compile_mode, Dist(device=CPU))
    start = {k: v.clone() for k, v in danlu.parts.model.state_dict().items()}
    assert all(torch.equal(v, start[k]) for k, v in plain.model.state_dict().items())

    danlu.run(3, StepMarks(CPU))
    plain.run(3)
    ours, theirs = danlu.parts.model.state_dict(), plain.model.state_dict()
    assert all(v.dtype == torch.float64 for v in theirs.values())
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-12
    assert max((ours[k] - start[k]).abs().max().item() for k in ours) > 1e-3  # the steps moved the weights
