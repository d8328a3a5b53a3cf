"""What a run reports while it trains: Meter's running sums (a mean over samples, not over batches; summed over
ranks), and RunLog's metrics.jsonl lines, console lines and TensorBoard scalars."""
import json
import math

import pytest
import torch

from danlu.engine.metrics import Meter, RunLog

CPU = torch.device("cpu")


def _batch(losses_correct, n):
    """(loss, logits, labels) for a batch of n samples of which `losses_correct[1]` are classified right."""
    loss, correct = losses_correct
    y = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 3)
    logits[:correct, 0] = 1.0  # argmax 0 = the label
    logits[correct:, 1] = 1.0
    return torch.tensor(loss), logits, y


def test_meter_means_are_over_samples_and_reset_on_read():
    m = Meter(CPU)
    m.add(*_batch((2.0, 3), 4))  # 4 samples at loss 2.0, 3 right
    m.add(*_batch((0.5, 1), 1))  # 1 sample at loss 0.5, 1 right
    loss, acc, n = m.read(reset=False)
    assert (loss, acc, n) == (pytest.approx((2.0 * 4 + 0.5) / 5), 4 / 5, 5)  # not (2.0 + 0.5) / 2
    assert m.read() == (loss, acc, n)  # reset=False kept the sums; this read resets them
    loss, acc, n = m.read()
    assert math.isnan(loss) and math.isnan(acc) and n == 0  # nothing since the reset


class _TwoRanks:
    """A Dist of 2 ranks whose other rank saw exactly what this one saw: the all-reduce doubles every sum."""
    grouped, is_main = True, True

    def all_reduce_sum(self, t):
        return t * 2


def test_meter_sums_over_ranks_and_its_snapshot_resumes_on_rank_zero_only():
    m = Meter(CPU, dist=_TwoRanks())
    m.add(*_batch((1.5, 2), 4))
    assert m.read(reset=False, local=True) == (1.5, 0.5, 4)  # the progress bar: this rank alone
    state = m.state_dict()
    assert (float(state["loss_sum"]), int(state["correct"]), state["n"]) == (12.0, 4, 8)  # both ranks
    assert m.read() == (1.5, 0.5, 8)  # the means over both ranks' samples
    rank0, other = Meter(CPU), Meter(CPU, dist=type("Rank1", (_TwoRanks,), {"is_main": False})())
    rank0.load_state_dict(state)
    other.load_state_dict(state)  # the other ranks start from zero: the all-reduce adds rank 0's saved sums once
    assert rank0.read(local=True) == (1.5, 0.5, 8) and other.read(local=True)[2] == 0


def test_runlog_writes_rounded_events_appends_and_prints_lines(tmp_path, capsys):
    log = RunLog(tmp_path, total=100, start=0, tensorboard=False)
    log.event({"kind": "train", "iter": 10, "epoch": 0.25, "lr": 0.01, "loss": 2.123456789, "acc": 0.3333333333,
               "images_per_second": 1234.5678, "time": 1.0})
    log.event({"kind": "test", "iter": 10, "epoch": 0.25, "loss": 1.9, "acc": 0.5, "top5": None, "samples": 64,
               "time": 1.5})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[train] iter     10/100  epoch 0.25  lr 0.01  loss 2.1235  acc 0.3333  1235 img/s  eta 0:09",
                     "[test]  iter     10/100  loss 1.9000  acc 0.5000"]
    log = RunLog(tmp_path, total=100, start=10, tensorboard=False, quiet=True)  # a resumed run appends
    log.event({"kind": "test", "iter": 20, "loss": 1.5, "acc": 0.75})
    log.close()
    assert capsys.readouterr().out == ""  # quiet: nothing on the console
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in events] == [10, 10, 20]
    assert events[0]["loss"] == 2.123457 and events[0]["acc"] == 0.333333  # 6 decimals
    assert events[0]["images_per_second"] == 1234.5678 and events[1]["top5"] is None


def test_face_and_gpu_figures_in_console_lines(tmp_path, capsys):
    from danlu.tasks.verification import VerificationTask

    log = RunLog(tmp_path, total=50, start=0, tensorboard=False, test_line=VerificationTask().test_line)
    log.event({"kind": "train", "iter": 5, "epoch": 1.0, "lr": 0.1, "loss": 1.0, "acc": 0.5, "images_per_second": 10.0,
               "gpu_memory_mb": 1234.4, "gpu_utilization": 84, "data_wait_share": 0.02})
    log.event({"kind": "test", "iter": 5, "verification_acc": 0.9, "verification_std": 0.05, "pairs": 600,
               "tar_at_far_1e-2": 0.8, "tar_at_far_1e-3": None, "lowest_far": 1 / 300, "tar_at_lowest_far": 0.7,
               "different_pairs": 300})
    face = {"kind": "test", "iter": 10, "verification_acc": 0.5, "verification_std": 0.05, "pairs": 600,
            "tar_at_far_1e-2": 0.1, "tar_at_far_1e-3": None, "lowest_far": 1 / 300, "tar_at_lowest_far": 0.1,
            "different_pairs": 300}
    log.event({**face, "head_cosine": 0.95})  # a margin head whose identity weights all point one way
    log.event({**face, "head_cosine": 0.05})
    log.close()
    train, test, collapsed, spread = capsys.readouterr().out.splitlines()
    assert train.endswith("10 img/s  gpu 84% 1234 MB, data wait 2%")
    assert test.startswith("[test]  iter      5/50  verification 0.9000 +- 0.0500 (600 pairs)  TAR 0.8000 at FAR 1e-2")
    assert "collapsed" not in test and "collapsed" not in spread
    assert collapsed.endswith("collapsed: the identity weights point one way (mean cosine 0.95); a longer "
                              "model.margin_warmup or a smaller model.margin lets them spread")


def test_a_disabled_log_writes_nothing(tmp_path, capsys):
    log = RunLog(tmp_path, total=10, start=0, enabled=False)  # ranks other than 0
    log.event({"kind": "train", "iter": 1, "epoch": 0.1, "lr": 0.1, "loss": 1.0, "acc": 0.5, "images_per_second": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert capsys.readouterr().out == ""


def test_tensorboard_gets_each_number_under_its_kind(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, total=10, start=0, quiet=True)
    log.event({"kind": "train", "iter": 3, "epoch": 0.5, "lr": 0.1, "loss": 1.25, "acc": 0.5, "time": 9.0})
    log.event({"kind": "test", "iter": 3, "loss": 1.5, "acc": 0.25, "top5": None})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/epoch", "train/lr", "train/loss", "train/acc", "test/loss", "test/acc"}  # no kind, time
    (point,) = acc.Scalars("test/acc")
    assert (point.step, point.value) == (3, 0.25)


def test_test_lines_keep_their_label_in_a_terminal():
    """With a progress bar (a terminal), a test line is printed as text: rich would read '[test]' as markup and drop
    it, and test lines would look like train lines."""
    from rich.console import Console

    from danlu.engine.metrics import _Bar

    console = Console(record=True, force_terminal=True, width=200)
    bar = _Bar(10, 0, console)
    try:
        bar.show({"kind": "test", "iter": 5}, "[test]  iter      5/10  loss 0.5000  acc 0.9000")
    finally:
        bar.stop()
    assert "[test]  iter      5/10  loss 0.5000  acc 0.9000" in console.export_text()


def test_train_lines_without_a_terminal_say_the_time_left_at_the_runs_own_pace(tmp_path, capsys):
    """Printed lines (no terminal, no progress bar) end with the time left: the run's seconds so far per iteration
    done in this process, times the iterations left; a resumed run counts from its snapshot."""
    from danlu.engine.metrics import as_clock

    assert [as_clock(s) for s in (0, 9, 59.6, 253, 3600, 3723)] == ["0:00", "0:09", "1:00", "4:13", "1:00:00",
                                                                     "1:02:03"]
    train = {"kind": "train", "epoch": 1.0, "lr": 0.1, "loss": 1.0, "acc": 0.5, "images_per_second": 10.0}
    log = RunLog(tmp_path, total=1000, start=0, tensorboard=False)
    log.event({**train, "iter": 100, "time": 50.0})  # 0.5 s an iteration, 900 left: 450 s
    log.event({**train, "iter": 1000, "time": 500.0})  # the end: nothing left to wait for
    log.close()
    log = RunLog(tmp_path, total=1000, start=400, tensorboard=False)  # resumed at 400: its own pace since then
    log.event({**train, "iter": 500, "time": 20.0})  # 0.2 s an iteration, 500 left: 100 s
    log.close()
    first, last, resumed = capsys.readouterr().out.splitlines()
    assert first.endswith("10 img/s  eta 7:30") and last.endswith("10 img/s") and resumed.endswith("eta 1:40")
