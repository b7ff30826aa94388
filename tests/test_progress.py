"""What a person sees while a run trains: progress lines in piped output (loss, images/s,
time left; never NaN) and the loss plot named after the run's loss."""

from __future__ import annotations

import io
import json

import pytest

from deeppose_cli.training.reporting import IterationPlan, TrainingReporter, format_duration
from deeppose_cli.training.rundir import RunDirectory, loss_figure


def piped_console():
    from rich.console import Console

    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_piped_progress_shows_loss_speed_and_time_left_from_the_first_window(tmp_path):
    console, out = piped_console()
    run = RunDirectory(tmp_path, "pytorch")
    plan = IterationPlan(iterations_per_epoch=50, total_iterations=100)
    with TrainingReporter(run, plan, batch_size=8, log_every=10, console=console) as reporter:
        reporter.start(0)
        reporter.losses(10, [0.5] * 10)  # the first logged window prints at once
        reporter.validation(10, {"loss": 0.25, "pdj@0.2": 0.5})
        reporter.losses(20, [-0.5] * 10)  # within a minute: no second line
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("iteration 10/100 (epoch 1/2): loss 0.5, ")
    assert "images/s" in lines[0] and " left" in lines[0] and "nan" not in lines[0].lower()
    assert lines[1] == "validation at iteration 10: loss 0.2500, pdj@0.2 0.5000"
    assert len(lines) == 2


def test_a_quiet_run_prints_nothing_and_the_status_waits_for_a_measurement(tmp_path):
    console, out = piped_console()
    plan = IterationPlan(iterations_per_epoch=10, total_iterations=10)
    reporter = TrainingReporter(RunDirectory(tmp_path, "pytorch"), plan, 4,
                                show_progress=False, console=console)
    with reporter:
        assert reporter.status(0) == "starting"
        reporter.start(0)
        reporter.losses(10, [1.0] * 10)
    assert out.getvalue() == ""
    assert reporter.status(10).startswith("loss 1, ")
    assert format_duration(3725.4) == "1:02:05"


@pytest.mark.parametrize("loss, values, scale", [("laplace", [0.5, -1.2], "linear"),
                                                 ("l1", [0.5, 0.1], "log")])
def test_loss_plot_names_the_loss_and_keeps_negative_losses_visible(loss, values, scale):
    records = [{"iteration": 10 * (k + 1), "loss": v} for k, v in enumerate(values)]
    records.append({"iteration": 20, "val_loss": 0.03, "val_pdj@0.2": 0.4})
    fig = loss_figure(records, loss, "run")
    ax, ax_val = fig.axes
    assert ax.get_yscale() == scale
    assert loss in ax.get_ylabel() and "MSE" not in ax.get_ylabel()
    assert [line.get_label() for line in ax_val.lines] == [
        "masked squared error (normalized)", "PDJ@0.2"]


def test_a_run_writes_its_loss_plot(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"loss": "laplace"}))
    (tmp_path / "log.jsonl").write_text(json.dumps({"iteration": 10, "loss": -0.5}) + "\n")
    assert RunDirectory(tmp_path, "pytorch").plot_loss().stat().st_size > 0
