import math
from functools import partial

import pytest
import torch

from danlu.engine.schedule import POLICIES, lr_at
from danlu.errors import DanluError

# Defaults for the arguments a test does not care about.
lr = partial(lr_at, max_iter=1000, iters_per_epoch=100)


def close(a, b):
    return a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_fixed():
    assert lr(0, policy="fixed", base_lr=0.01) == 0.01
    assert lr(999, policy="fixed", base_lr=0.01) == 0.01


def test_step_boundaries():
    f = partial(lr, policy="step", base_lr=0.01, gamma=0.1, stepsize=300)
    assert close(f(0), 0.01)
    assert close(f(299), 0.01)  # it = stepsize - 1: not yet
    assert close(f(300), 0.001)  # it = stepsize: first drop
    assert close(f(599), 0.001)
    assert close(f(600), 0.0001)


def test_step_needs_stepsize():
    with pytest.raises(DanluError, match=r"schedule.stepsize must be > 0 for policy step"):
        lr(0, policy="step", base_lr=0.01, stepsize=0)


def test_exp():
    f = partial(lr, policy="exp", base_lr=0.01, gamma=0.999)
    assert close(f(0), 0.01)
    assert close(f(1000), 0.003676954247709637)  # 0.01 * 0.999**1000 = 0.01 * exp(1000 * ln 0.999)


def test_inv():
    f = partial(lr, policy="inv", base_lr=0.01, gamma=1e-4, power=0.75)  # Caffe's LeNet solver
    assert close(f(0), 0.01)
    assert close(f(10000), 0.005946035575013605)  # 0.01 * (1 + 1e-4 * 1e4) ** -0.75 = 0.01 * 2 ** -0.75


def test_multistep_boundaries():
    f = partial(lr, policy="multistep", base_lr=1.0, gamma=0.1, stepvalues=(100, 200, 300))
    assert close(f(0), 1.0)
    assert close(f(99), 1.0)
    assert close(f(100), 0.1)  # Caffe: current_step++ once it >= stepvalue
    assert close(f(199), 0.1)
    assert close(f(200), 0.01)
    assert close(f(300), 0.001)
    assert close(f(5000), 0.001)


def test_poly():
    f = partial(lr_at, policy="poly", base_lr=0.01, power=0.5, max_iter=100, iters_per_epoch=10)
    assert close(f(0), 0.01)
    assert close(f(75), 0.005)  # 0.01 * (1 - 0.75) ** 0.5
    assert f(100) == 0.0  # zero at max_iter
    assert f(150) == 0.0  # clamped past max_iter (no complex/nan)


def test_sigmoid():
    f = partial(lr, policy="sigmoid", base_lr=0.01, gamma=-0.001, stepsize=1000)
    assert close(f(1000), 0.005)  # it = stepsize: base / 2
    assert close(f(0), 0.007310585786300049)  # 0.01 / (1 + exp(-1))


def test_poly_decay_per_epoch():
    # max_iter 950 with 100 iterations per epoch -> max_epochs = ceil(9.5) = 10
    f = partial(lr_at, policy="poly_decay", base_lr=0.01, power=1.0, max_iter=950, iters_per_epoch=100)
    assert all(close(f(it), 0.01) for it in range(100))  # constant within epoch 0
    assert close(f(100), 0.009)  # steps at the epoch boundary: 0.01 * (1 - 1/10)
    assert close(f(199), 0.009)
    assert close(f(949), 0.001)  # epoch 9
    g = partial(f, power=2.0)
    assert close(g(500), 0.0025)  # 0.01 * (1 - 5/10) ** 2


def test_cosine_endpoints():
    f = partial(lr_at, policy="cosine", base_lr=0.1, min_lr=0.001, max_iter=100, iters_per_epoch=10)
    assert close(f(0), 0.1)
    assert close(f(50), 0.0505)  # 0.001 + 0.5 * 0.099 * (1 + cos(pi/2))
    assert close(f(100), 0.001)
    assert close(f(200), 0.001)  # clamped


@pytest.mark.parametrize("total,pct", [(100, 0.3), (100, 0.25), (37, 0.4)])
def test_onecycle_matches_torch(total, pct):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=pct,
                                                anneal_strategy="cos", three_phase=False, div_factor=25.0,
                                                final_div_factor=1e4, cycle_momentum=False)
    for it in range(total):  # torch's lr after `it` step() calls is the lr for iteration `it`
        ours = lr_at(it, policy="onecycle", base_lr=0.1, max_iter=total, iters_per_epoch=10, pct_start=pct)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=0), it
        opt.step()
        sched.step()


def test_onecycle_endpoints():
    f = partial(lr_at, policy="onecycle", base_lr=0.1, max_iter=100, iters_per_epoch=10)
    assert close(f(0), 0.004)  # 0.1 / 25
    assert close(f(29), 0.1)  # peak at pct_start * max_iter - 1
    assert close(f(99), 0.004 / 1e4)
    assert close(f(500), 0.004 / 1e4)  # constant after the cycle


def test_warmup_ramp():
    f = partial(lr, policy="fixed", base_lr=0.1, warmup=5)
    assert [round(f(it), 12) for it in range(7)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1]  # 0.1 * (it+1) / 5
    g = partial(f, warmup_start=0.01)
    assert close(g(0), 0.01)
    assert close(g(2), 0.046)  # 0.01 + (0.1 - 0.01) * 2 / 5
    assert close(g(5), 0.1)
    h = partial(lr, policy="step", base_lr=0.1, stepsize=2, gamma=0.5, warmup=4)  # target follows the policy
    assert close(h(3), 0.05 * 4 / 4)


def test_unknown_policy():
    with pytest.raises(DanluError) as e:
        lr(0, policy="cosin", base_lr=0.1)
    msg = str(e.value)
    assert msg.startswith("schedule.policy: unknown policy 'cosin'; expected one of fixed, step")
    assert "did you mean 'cosine'" in msg and "\n" not in msg


def test_all_policies_run():
    for p in POLICIES:
        v = lr(10, policy=p, base_lr=0.1, stepsize=100, stepvalues=(5,), gamma=0.5)
        assert math.isfinite(v) and v >= 0
