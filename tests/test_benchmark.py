"""deeppose benchmark: its statistics and bookkeeping, and a whole run on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deeppose_cli.apps.benchmark import (BenchmarkSettings, Timing, failure_line, interleaved,
                                         report_tables, run_benchmark, scaling_rows, scaling_run,
                                         targets, throughput_from_log, time_repeats)
from deeppose_cli.cli import main
from deeppose_cli.core.distributed import find_mpiexec
from deeppose_cli.core.errors import DeepPoseError

from conftest import assert_no_escaped_exception

TINY = dict(recipe=dict(input_size=67, width=0.0625, batch_size=4), max_batch_log2=1,
            repeats=2, warmup=1, pipeline_iterations=4, cascade_stages=2, cli_repeats=1,
            dataset="synthetic", precisions=("fp32", "bf16"), workers=(0, 2))


def test_timing_statistics():
    stats = Timing([0.3, 0.1, 100.0, 0.2, 0.4]).to_json()
    assert stats["median"] == pytest.approx(0.3)
    assert (stats["q1"], stats["q3"]) == pytest.approx((0.2, 0.4))
    assert (stats["min"], stats["max"], stats["repeats"]) == (0.1, 100.0, 5)
    assert Timing([0.3, 0.1, 100.0]).best == 0.1


def test_time_repeats_warms_up_then_syncs_every_call():
    calls, syncs = [], []
    timing = time_repeats(lambda: calls.append(1), repeats=3, warmup=2,
                          sync=lambda: syncs.append(len(calls)))
    assert len(calls) == 5 and len(timing.seconds) == 3
    assert syncs == [2, 3, 4, 5]  # once after the warm-up, then after each timed call


def test_interleaved_alternates_candidates():
    order = []
    seconds = interleaved([lambda: order.append("a"), lambda: order.append("b")], rounds=3,
                          sync=lambda: None)
    assert order == ["a", "b"] * 3
    assert [len(s) for s in seconds] == [3, 3]


def test_targets_compare_each_value_with_its_bound():
    result = {
        "pipeline": [{"framework": "pytorch", "workers": 2, "efficiency": 0.95},
                     {"framework": "chainer", "workers": 0, "efficiency": 0.85}],
        "overhead": [{"framework": "pytorch", "ratio": 0.96}],
        "cascade": [{"framework": "chainer", "stages": 2, "ratio": 1.31}],
        "cli": {"ratio": 1.2},
    }
    met = {(t["target"], t["what"]): t["met"] for t in targets(result)}
    assert met == {("pipeline_efficiency", "pytorch, 2 workers"): True,
                   ("pipeline_efficiency", "chainer, 0 workers"): False,
                   ("model_vs_bare", "pytorch"): True,
                   ("cascade_vs_forward_sum", "chainer, 2 stages"): False,
                   ("help_vs_import", "cli"): True}


def test_an_impossible_efficiency_is_reported_as_a_measurement_error():
    """1.878 (end to end faster than compute only) was once printed as a met target."""
    result = {"pipeline": [{"framework": "pytorch", "workers": 0, "efficiency": 1.878},
                           {"framework": "chainer", "workers": 0, "efficiency": 1.04}]}
    rows = {t["what"]: t for t in targets(result)}
    assert rows["pytorch, 0 workers"]["met"] is False
    assert rows["pytorch, 0 workers"]["invalid"].startswith("measurement error")
    assert rows["chainer, 0 workers"]["met"] is True and "invalid" not in rows["chainer, 0 workers"]
    (table,) = report_tables({"targets": targets(result)})
    assert table.title == "Targets"
    assert [row[-1][:27] for row in table.rows] == ["invalid: measurement error:", "yes"]


def test_settings_are_checked():
    with pytest.raises(DeepPoseError, match="framework"):
        run_benchmark(BenchmarkSettings(frameworks=("tensorflow",)))
    with pytest.raises(DeepPoseError, match="workers"):
        run_benchmark(BenchmarkSettings(frameworks=("pytorch",), workers=()))
    with pytest.raises(DeepPoseError, match="precision must be one of"):
        run_benchmark(BenchmarkSettings(frameworks=("pytorch",), precisions=("fp8",)))
    with pytest.raises(DeepPoseError, match="needs a training index"):
        run_benchmark(BenchmarkSettings(frameworks=("pytorch",), index=None,
                                        sections=("pipeline",)))


@pytest.fixture(scope="module")
def tiny_result(synthetic_dataset):
    _, index_dir = synthetic_dataset
    return run_benchmark(BenchmarkSettings(index=str(index_dir / "train.jsonl"), **TINY))


def test_every_section_is_measured_for_both_frameworks(tiny_result):
    result = tiny_result
    assert result["format"] == "deeppose-benchmark"
    # Chainer has no bfloat16: only PyTorch has the bf16 rows. The recipe's laplace loss has
    # no hand-written backward, so l1 compares the two backwards.
    assert {(r["framework"], r["loss"], r["backward"], r["precision"], r["batch_size"])
            for r in result["compute"]} == {
        (f, loss, backward, p, b)
        for f, p in (("chainer", "fp32"), ("pytorch", "fp32"), ("pytorch", "bf16"))
        for loss, backward in (("laplace", "autograd"), ("l1", "autograd"), ("l1", "explicit"))
        for b in (1, 2)}
    assert {(r["framework"], r["batch_size"]) for r in result["forward"]} == {
        (f, b) for f in ("chainer", "pytorch") for b in (1, 2)}
    for row in result["compute"] + result["forward"]:
        seconds = row["time"]["seconds"]  # the raw clock readings, one per repeat
        assert row["time"]["repeats"] == len(seconds) == 2 and min(seconds) > 0
        assert row["time"]["median"] == pytest.approx(statistics.median(seconds))
        assert row["images_per_second"] == pytest.approx(row["batch_size"] /
                                                         statistics.median(seconds))
    assert [r["framework"] for r in result["overhead"]] == ["chainer", "pytorch"]
    assert [(r["framework"], r["stages"]) for r in result["cascade"]] == [
        ("chainer", 1), ("chainer", 2), ("pytorch", 1), ("pytorch", 2)]
    assert result["cli"]["help_time"]["median"] > 0
    assert [(r["framework"], r["workers"]) for r in result["pipeline"]] == [
        ("chainer", 0), ("chainer", 2), ("pytorch", 0), ("pytorch", 2)]
    assert {t["target"] for t in result["targets"]} == {
        "pipeline_efficiency", "model_vs_bare", "cascade_vs_forward_sum", "help_vs_import"}
    json.dumps(result)  # JSON-ready as it is


def test_every_row_names_the_network_of_the_resolved_recipe(tiny_result):
    """The step timed is the one train-stage runs: the stage-1 recipe's network and loss
    with the flags given (here --input-size 67 --width 0.0625)."""
    from deeppose_cli.core.manifests import load_stage_recipe

    recipe = {**load_stage_recipe(1), "input_size": 67, "width": 0.0625}
    expected = {key: recipe[key] for key in ("architecture", "input_size", "width",
                                             "batch_norm", "dropout", "optimizer")}
    rows = (tiny_result["compute"] + tiny_result["forward"] + tiny_result["overhead"]
            + tiny_result["pipeline"])
    for row in rows:
        network = row["network"]
        assert {key: network[key] for key in expected} == expected, row
    recipe_rows = [r for r in tiny_result["compute"] if r["backward"] == "autograd"
                   and r["loss"] == recipe["loss"]]
    assert recipe_rows and all(r["network"]["uncertainty"] for r in recipe_rows)
    for row in tiny_result["overhead"] + tiny_result["pipeline"] + tiny_result["forward"]:
        assert row["network"]["loss"] == recipe["loss"] == "laplace"


def test_ratios_are_computed_from_the_measurements(tiny_result):
    for row in tiny_result["pipeline"]:
        images = row["block_iterations"] * row["batch_size"]
        # 4 iterations in blocks of 1 without workers; blocks of 8 (4 per worker) with 2
        assert row["end_to_end_time"]["repeats"] == (4 if row["workers"] == 0 else 1)
        assert row["end_to_end_images_per_second"] == pytest.approx(
            images / row["end_to_end_time"]["min"])
        assert row["compute_images_per_second"] == pytest.approx(
            images / row["compute_time"]["min"])
        assert row["efficiency"] == pytest.approx(row["end_to_end_images_per_second"] /
                                                  row["compute_images_per_second"])
        assert row["records"] == 480 and row["precision"] == "fp32"
    for row in tiny_result["overhead"]:
        assert row["ratio"] == pytest.approx(row["bare_time"]["min"] / row["model_time"]["min"])
        assert row["ratio_of_medians"] == pytest.approx(row["bare_time"]["median"] /
                                                        row["model_time"]["median"])
    for row in tiny_result["cascade"]:
        assert row["ratio"] == pytest.approx(row["latency"]["min"] / row["forward_time"]["min"])
        assert row["latency"]["repeats"] == row["forward_time"]["repeats"] == 2
    cli = tiny_result["cli"]
    assert cli["ratio"] == pytest.approx(cli["help_time"]["min"] / cli["import_time"]["min"])


def test_cli_writes_json_and_charts(tmp_path, synthetic_dataset):
    root, _ = synthetic_dataset
    argv = ["benchmark", "--framework", "pytorch", "--dataset", "synthetic", "--root", str(root),
            "--input-size", "67", "--width", "0.0625", "--max-batch-log2", "1",
            "--repeats", "1", "--batch-size", "2", "--iterations", "2", "--stages", "2",
            "--skip", "cli", "--out", str(tmp_path / "bench")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert saved["settings"]["frameworks"] == ["pytorch"] and saved["cli"] is None
    assert (tmp_path / "bench" / "compute-time.png").stat().st_size > 0
    assert (tmp_path / "bench" / "autograd-vs-explicit.png").stat().st_size > 0
    for title in ("Step time", "Training throughput on real images", "Predict one image",
                  "Targets"):
        assert title in result.output


def test_cli_without_an_index_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["benchmark", "--dataset", "lspet"])
    assert result.exit_code == 1
    assert "--skip pipeline" in result.output
    assert_no_escaped_exception(result)


# ----------------------------------------------------------------------------- scaling

SCALING = dict(frameworks=("pytorch",), dataset="synthetic", sections=("scaling",),
               processes=(2,), scaling_iterations=20,
               recipe=dict(input_size=67, width=0.0625, batch_size=8), scaling_timeout=600)


def test_scaling_rows_give_speed_up_and_efficiency():
    rows = scaling_rows("pytorch", {2: {"images_per_second": 150.0},
                                    1: {"images_per_second": 100.0},
                                    4: {"images_per_second": 200.0}})
    assert [r["processes"] for r in rows] == [1, 2, 4]
    assert [r["speed_up"] for r in rows] == pytest.approx([1.0, 1.5, 2.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.75, 0.5])
    # a missing figure leaves the ratios empty and keeps the reason
    rows = scaling_rows("chainer", {1: {"reason": "no mpi4py"}, 2: {"images_per_second": 9.0}})
    assert [(r["images_per_second"], r["speed_up"], r["efficiency"]) for r in rows] == [
        (None, None, None), (9.0, None, None)]
    assert rows[0]["reason"] == "no mpi4py"


def test_scaling_report_has_a_row_per_run_and_a_line_per_missing_figure():
    result = {"scaling": scaling_rows("pytorch", {1: {"images_per_second": 100.0},
                                                  2: {"images_per_second": 150.0}})
              + scaling_rows("chainer", {1: {"reason": "no mpi4py: install it"},
                                         2: {"reason": "no mpi4py: install it"}})}
    table, *notes = report_tables(result)
    assert table.columns == ["framework", "processes", "images/s", "speed-up", "efficiency"]
    assert table.rows == [["pytorch", "1", "100.0", "1.00x", "100%"],
                          ["pytorch", "2", "150.0", "1.50x", "75%"],
                          ["chainer", "1", "-", "-", "-"], ["chainer", "2", "-", "-", "-"]]
    assert notes == ["chainer on 1 process: no figure (no mpi4py: install it)",
                     "chainer on 2 processes: no figure (no mpi4py: install it)"]


def test_throughput_comes_from_the_log_without_its_first_window():
    log = [{"iteration": 10, "loss": 1.0, "elapsed": 3.0, "images_per_second": 26.7},
           {"iteration": 10, "epoch": 1, "elapsed": 3.5, "val_loss": 0.5},
           {"iteration": 20, "loss": 1.0, "elapsed": 4.0, "images_per_second": 80.0},
           {"iteration": 40, "loss": 1.0, "elapsed": 6.0, "images_per_second": 160.0}]
    measured = throughput_from_log(log, batch_size=8)
    assert measured["images_per_second"] == pytest.approx(30 * 8 / 3.0)
    assert measured["measured_iterations"] == [10, 40]
    assert measured["window_images_per_second"] == [26.7, 80.0, 160.0]
    assert throughput_from_log(log[:2], batch_size=8) is None


def test_scaling_settings_are_checked():
    with pytest.raises(DeepPoseError, match="at least 2"):
        run_benchmark(BenchmarkSettings(**{**SCALING, "processes": (1,)}))
    with pytest.raises(DeepPoseError, match="scaling-iterations must be at least 20"):
        run_benchmark(BenchmarkSettings(**{**SCALING, "scaling_iterations": 15}))


def test_the_recipe_options_become_train_stage_flags():
    from deeppose_cli.core.settings import setting_flags

    assert setting_flags({"width": 0.0625, "flip": False, "batch_norm": True,
                          "use_visibility": False, "image_cache_gib": 1.5, "max_iterations": None}) \
        == ["--width", "0.0625", "--no-flip", "--batch-norm", "--no-visibility",
            "--image-cache", "1.5"]


def test_a_missing_launcher_is_a_reason_not_an_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mpi4py" else real(name, *a))
    run = scaling_run(BenchmarkSettings(**{**SCALING, "frameworks": ("chainer",)}), "chainer",
                      2, tmp_path / "train.jsonl", tmp_path / "run")
    assert run["reason"].startswith("no mpi4py") and "distributed" in run["reason"]
    assert failure_line("Traceback ...\n  File x\nError: rank 1 of 2: boom\n") == \
        "Error: rank 1 of 2: boom"
    assert failure_line("starting\nKilled\n\n") == "Killed"


def test_cli_runs_scaling_only_when_asked(tmp_path):
    skip = [a for s in ("compute", "overhead", "pipeline", "cascade", "cli")
            for a in ("--skip", s)]
    result = CliRunner().invoke(main, ["benchmark", "--framework", "pytorch", *skip,
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["settings"]["sections"] == [] and saved["scaling"] == []
    result = CliRunner().invoke(main, ["benchmark", "--processes", "1", *skip])
    assert result.exit_code == 2 and "--processes" in result.output


def scaling_settings(synthetic_dataset, **changes) -> BenchmarkSettings:
    _, index_dir = synthetic_dataset
    return BenchmarkSettings(**{**SCALING, "index": str(index_dir / "train.jsonl"), **changes})


@pytest.mark.slow
def test_scaling_section_trains_on_one_and_two_processes(synthetic_dataset):
    result = run_benchmark(scaling_settings(synthetic_dataset))
    one, two = result["scaling"]
    assert (one["processes"], two["processes"]) == (1, 2)
    for row in (one, two):
        assert "reason" not in row, row["reason"]
        assert row["launcher"] == "torchrun" and row["measured_iterations"] == [10, 20]
        assert row["images_per_second"] > 0 and row["batch_size"] == 8
        assert row["network"]["width"] == 0.0625
    assert two["batch_size_per_process"] == 4
    assert two["efficiency"] == pytest.approx(two["images_per_second"]
                                              / (2 * one["images_per_second"]))
    assert [t.title for t in report_tables(result) if not isinstance(t, str)] == [
        "Training on several processes: images/s of each run (from its log), efficiency "
        "N-process / (N x 1-process)"]
    json.dumps(result)


@pytest.mark.slow
def test_a_failing_launch_gives_one_line(synthetic_dataset, tmp_path):
    """A global batch of 1 cannot be split over 2 processes: train-stage refuses it."""
    settings = scaling_settings(synthetic_dataset, recipe=dict(input_size=67, width=0.0625,
                                                               batch_size=1))
    run = scaling_run(settings, "pytorch", 2, Path(settings.index), tmp_path / "run")
    assert run["reason"].startswith("exit status 1: Error: ")
    assert "at least one" in run["reason"] and "\n" not in run["reason"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or find_mpiexec(sys.executable)
                    is None, reason="needs mpiexec and mpi4py (the distributed extra)")
def test_scaling_section_under_mpiexec(synthetic_dataset):
    result = run_benchmark(scaling_settings(synthetic_dataset, frameworks=("chainer",)))
    one, two = result["scaling"]
    assert "reason" not in one and "reason" not in two, (one.get("reason"), two.get("reason"))
    assert two["efficiency"] == pytest.approx(two["images_per_second"]
                                              / (2 * one["images_per_second"]))
