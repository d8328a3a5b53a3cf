"""report.py: what a person reads. curves.png plots what metrics.jsonl holds (a face run's verification accuracy
where a classifier's accuracy would be); bench's Markdown table prints each figure with its context (date, device,
versions, commit, load, skipped combinations, where MFU's peak came from)."""
import json

import pytest

from danlu.report import bench_markdown, combo_label, draw_curves, read_metrics


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the drawing functions close (inspected instead of the pixels)."""
    import matplotlib.pyplot as plt

    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), close(fig)))
    return closed


def _write(path, events):
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n\n")  # a blank last line is skipped
    return path


def test_curves_plot_the_logged_values(tmp_path, figures):
    m = _write(tmp_path / "metrics.jsonl", [
        {"kind": "train", "iter": 10, "epoch": 0.5, "loss": 2.0, "acc": 0.3},
        {"kind": "train", "iter": 20, "epoch": 1.0, "loss": 1.5, "acc": 0.5},
        {"kind": "test", "iter": 20, "epoch": 1.0, "loss": 1.6, "acc": 0.45}])
    assert [e["iter"] for e in read_metrics(m)] == [10, 20, 20] and read_metrics(tmp_path / "missing.jsonl") == []
    draw_curves(m, tmp_path / "curves.png", title="lenet")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    loss, acc = fig.axes
    assert [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in loss.lines] == [
        ("train loss", [0.5, 1.0], [2.0, 1.5]), ("test loss", [1.0], [1.6])]
    assert [list(ln.get_ydata()) for ln in acc.lines] == [[0.3, 0.5], [0.45]]
    assert loss.get_title() == "lenet" and acc.get_title() == "test accuracy 0.4500 at iteration 20"


def test_a_face_runs_curves_show_verification_accuracy(tmp_path, figures):
    m = _write(tmp_path / "metrics.jsonl", [
        {"kind": "train", "iter": 5, "epoch": 1.0, "loss": 9.0, "acc": 0.1},
        {"kind": "test", "iter": 5, "epoch": 1.0, "verification_acc": 0.8125, "threshold": 0.3},
        {"kind": "train", "iter": 10, "epoch": 2.0, "loss": 7.0, "acc": 0.2},
        {"kind": "test", "iter": 10, "epoch": 2.0, "verification_acc": 0.875, "threshold": 0.3}])
    draw_curves(m, tmp_path / "curves.png")
    (fig,) = figures
    loss, acc = fig.axes
    assert loss.lines[0].get_label() == "train loss" and list(loss.lines[0].get_ydata()) == [9.0, 7.0]
    assert acc.lines[1].get_label() == "test verification accuracy" and list(acc.lines[1].get_ydata()) == [0.8125,
                                                                                                         0.875]
    assert acc.get_title() == "verification accuracy 0.8750 at iteration 10"


def test_a_face_runs_loss_panel_shows_no_accuracy(tmp_path, figures):
    m = _write(tmp_path / "metrics.jsonl", [
        {"kind": "train", "iter": 5, "epoch": 1.0, "loss": 9.0, "acc": 0.1},
        {"kind": "test", "iter": 5, "epoch": 1.0, "verification_acc": 0.8125, "threshold": 0.3}])
    draw_curves(m, tmp_path / "curves.png")
    (fig,) = figures
    loss, _ = fig.axes
    assert all("accuracy" not in ln.get_label() for ln in loss.lines), [ln.get_label() for ln in loss.lines]


def test_combo_labels():
    assert combo_label("fp32", "off", False, 1) == "fp32 eager"
    assert combo_label("bf16", "on", True, 2) == "bf16 compile+graphs x2"
    assert combo_label("fp16", "max-autotune", False, 4) == "fp16 max-autotune x4"


def _row(**kw):
    row = {"model": "lenet", "size": 28, "batch": 512, "precision": "fp32", "compile": "off", "cuda_graphs": False,
           "procs": 1, "images_per_second": 123456.7, "ms_per_step_median": 4.1472, "ms_per_step_p90": 4.5,
           "peak_memory_mb": 1234.5, "tflops": 0.012345, "mfu": 0.0345, "speedup_vs_fp32_eager": 1.0,
           "vs_plain_loop": 1.0123, "peak_source": "measured (2048x2048 float32 matmul, best of 3)"}
    return {**row, **kw}


def test_bench_markdown_puts_each_figure_with_its_context():
    result = {"env": {"date": "2026-12-01T01:02:03+00:00", "device": "NVIDIA H100 80GB HBM3", "driver": "570.1",
                      "cuda": "13.0", "torch": "2.14.1", "danlu": "0.1.0", "danlu_commit": "75f9442a30f4bc01-dirty",
                      "load_average_start": [0.5, 0.4, 0.3], "load_average_end": [1.25, 1.0, 0.8]},
              "rows": [_row(), _row(precision="bf16", compile="on", cuda_graphs=True, procs=2, peak_memory_mb=None,
                                mfu=None, tflops=None, speedup_vs_fp32_eager=2.5, peak_source=None)],
              "skipped": [{"precision": "tf32", "compile": "off", "cuda_graphs": False, "procs": 1,
                           "reason": "tf32 needs CUDA"}],
              "complete": False}
    lines = bench_markdown(result, command="danlu bench --model lenet").splitlines()
    assert lines[0] == ("2026-12-01, NVIDIA H100 80GB HBM3, driver 570.1, CUDA 13.0, torch 2.14.1, danlu 0.1.0 "
                        "(75f9442a30f4-dirty); load average 0.5 before, 1.25 after")
    assert lines[1] == "`danlu bench --model lenet`"
    assert lines[5] == "| lenet | 28 | 512 | fp32 | off | off | 1 | 123,457 | 4.15 | 4.50 | 1,234 | 0.0123 | 3.5% " \
                       "| 1.00 | 1.012 |"
    assert lines[6] == "| lenet | 28 | 512 | bf16 | on | on | 2 | 123,457 | 4.15 | 4.50 | - | - | - | 2.50 | 1.012 |"
    assert lines[8:] == ["- skipped: tf32 compile off (procs 1): tf32 needs CUDA",
                         "- MFU against fp32: measured (2048x2048 float32 matmul, best of 3)",
                         "- incomplete: the run stopped before the whole matrix was measured"]


def _drawn(ax):
    """What a panel shows: per line (label, points, marker), and its y scale."""
    return [(ln.get_label(), len(ln.get_xdata()), ln.get_marker()) for ln in ax.lines], ax.get_yscale()


def test_a_short_face_run_shows_its_lone_display_event_and_only_what_it_logged(tmp_path, figures):
    """30 one-step epochs with display 50: one train event. Its point has a marker (a one-point line without one
    draws nothing), and the legend lists only what is drawn: the face run's tests have no loss."""
    m = _write(tmp_path / "metrics.jsonl", [
        *({"kind": "test", "iter": i, "epoch": float(i), "verification_acc": 0.6 + i / 100} for i in (10, 20)),
        {"kind": "train", "iter": 30, "epoch": 30.0, "loss": 14.2, "acc": 0.05},
        {"kind": "test", "iter": 30, "epoch": 30.0, "verification_acc": 0.9}])
    draw_curves(m, tmp_path / "curves.png")
    (fig,) = figures
    loss, acc = fig.axes
    assert _drawn(loss) == ([("train loss", 1, "o")], "linear")
    assert _drawn(acc) == ([("train accuracy", 1, "o"), ("test verification accuracy", 3, "o")], "linear")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train loss"]


def test_a_loss_spanning_decades_gets_a_log_axis_and_long_series_no_markers(tmp_path, figures):
    train = [{"kind": "train", "iter": i, "epoch": i / 10, "loss": 2.3 / i, "acc": 0.5} for i in range(1, 31)]
    m = _write(tmp_path / "metrics.jsonl", [*train, {"kind": "test", "iter": 30, "epoch": 3.0, "loss": 1044.0,
                                                     "acc": 0.1}])
    draw_curves(m, tmp_path / "curves.png")
    loss, acc = figures[0].axes
    assert _drawn(loss) == ([("train loss", 30, "None"), ("test loss", 1, "o")], "log")  # 0.077 .. 1044
    assert _drawn(acc)[1] == "linear"


def test_panels_only_for_what_the_run_logged(tmp_path, figures):
    m = _write(tmp_path / "metrics.jsonl", [{"kind": "train", "iter": 5, "epoch": 1.0, "loss": 0.7},
                                            {"kind": "train", "iter": 10, "epoch": 2.0, "loss": float("nan")}])
    draw_curves(m, tmp_path / "curves.png")
    (ax,) = figures[0].axes  # no accuracy logged: no accuracy panel; the NaN loss is not drawn
    assert _drawn(ax) == ([("train loss", 1, "o")], "linear")
    draw_curves(_write(tmp_path / "empty.jsonl", []), tmp_path / "empty.png")
    (ax,) = figures[1].axes
    assert len(ax.lines) == 0 and [t.get_text() for t in ax.texts] == ["no train or test events yet"]
