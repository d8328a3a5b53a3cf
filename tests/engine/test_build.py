"""engine/build.py is the one place a training step is built: `danlu bench` times the step `danlu.train` runs. The
same recipe through both gives the same losses, step for step."""
import json

import pytest
import torch

import danlu
from danlu.bench import Combo, bench_recipe
from danlu.bench.matrix import DanluStep
from danlu.bench.timing import StepMarks
from danlu.engine.distributed import Dist

CPU = torch.device("cpu")


class _Events(StepMarks):
    """train_loop's log, keeping every event (StepMarks keeps the last)."""

    def __init__(self):
        super().__init__(CPU)
        self.events = []

    def event(self, record):
        self.events.append(record)


@pytest.fixture(scope="module")
def data():
    return danlu.load_dataset("synthetic", size=16, train_size=256, test_size=64)


@pytest.mark.parametrize("loader", ["device", "stream"])
def test_bench_and_train_take_the_same_steps(tmp_path, data, loader):
    """bench's recipe for LeNet in float64 (no rounding differences to hide behind), 3 steps: each step's loss
    through bench's DanluStep equals the one danlu.train logs. The losses after the first depend on the steps
    before, so the model, data order, optimizer, LR and precision must all agree."""
    train, test = data
    recipe = bench_recipe("lenet", 16, 1, 10, 32, Combo("fp64", "off", False, 1), "auto", CPU)
    step = DanluStep(recipe, train, CPU, loader, Dist(device=CPU))
    benched = []
    for _ in range(3):  # one step per call: train_loop logs the loss of its last step
        log = _Events()
        step.run(1, log)
        benched += [e["loss"] for e in log.events if e["kind"] == "train"]

    tree = recipe.to_dict()
    tree["run"].update(max_iter=3, display=1, snapshot_every=0)
    danlu.train(tree, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [e["loss"] for e in events if e["kind"] == "train"]
    assert len(benched) == len(trained) == 3
    assert trained == pytest.approx(benched, abs=1e-6, rel=0)  # metrics.jsonl keeps 6 decimals
    assert benched[0] != benched[1] != benched[2]  # the steps changed the weights


@pytest.mark.parametrize("per_epoch, max_iter, every", [
    (1, 30, 3),  # 80 faces at batch 64: 30 one-step epochs, tested every 3 steps (not after every step)
    (62, 1240, 124),  # lenet_mnist5k: 20 epochs of 62 steps, tested every 2 epochs
    (62, 620, 62),  # up to 10 epochs: once an epoch, as before
    (62, 1241, 186),  # a last partial epoch counts: 21 epochs, every 3
    (62, 10, 62),  # shorter than an epoch: only the test at the end
])
def test_left_to_danlu_a_run_tests_at_most_about_ten_times_a_whole_number_of_epochs_apart(per_epoch, max_iter, every):
    from danlu.engine.build import build_plan

    plan = build_plan(danlu.load_recipe(None), per_epoch, max_iter)
    assert plan.test_interval == every
    assert len([it for it in range(1, max_iter + 1) if it % every == 0 or it == max_iter]) <= 11  # the loop's rule
    exact = build_plan(danlu.load_recipe(None, ["run.test_interval=1"]), per_epoch, max_iter)
    assert exact.test_interval == 1  # asked for: kept exactly


def test_a_short_run_on_a_small_set_spends_its_steps_training(tmp_path):
    """The real CLI, 30 epochs of 2 steps: 10 test events (it used to be 30, one an epoch)."""
    from conftest import TINY, run_cli, sets

    out = tmp_path / "run"
    r = run_cli("train", "--out", str(out), "--device", "cpu", "--quiet",
                *sets(*TINY, "data.train_size=64", "run.epochs=30", "run.display=20"))
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in events if e["kind"] == "test"] == list(range(6, 61, 6))
