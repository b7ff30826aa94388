"""deeppose benchmark: its statistics and bookkeeping, and a whole run on tiny settings."""

from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from deeppose_cli.apps.benchmark import (BenchmarkSettings, Timing, interleaved, report_tables,
                                    run_benchmark, targets, time_repeats)
from deeppose_cli.cli import main
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
