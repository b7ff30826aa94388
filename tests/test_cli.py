"""The CLI spine through Click's CliRunner, and start-up cost of --help."""

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from deeppose_cli.cli import main
from conftest import LSPET_MINI, assert_no_escaped_exception, needs_lspet_mini

COMMANDS = ["info", "fetch", "index", "train-stage", "show-augmentation", "evaluate",
            "predict", "convert", "export", "benchmark"]
HEAVY = ("numpy", "torch", "chainer", "cv2", "scipy", "matplotlib", "onnx", "onnxscript",
         "onnxruntime", "mpi4py", "chainermn")


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_imports_neither_numpy_nor_a_framework(argv):
    code = ("import sys; from deeppose_cli.cli import main\n"
            "try:\n    main(%r, prog_name='deeppose')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "loaded = [m for m in %r if m in sys.modules]\n"
            "assert not loaded, loaded\n" % (argv, HEAVY))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage: deeppose" in result.stdout


def test_fetch_synthetic_then_index_in_one_chain(tmp_path):
    runner = CliRunner()
    root = tmp_path / "data"
    result = runner.invoke(main, ["fetch", "synthetic", "--root", str(root), "index",
                                  "--val-fraction", "0.25", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "Generated 600" in result.output
    train = (root / "synthetic" / "index" / "train.jsonl").read_text().splitlines()
    val = (root / "synthetic" / "index" / "val.jsonl").read_text().splitlines()
    assert (len(train), len(val)) == (450, 150)
    assert json.loads(train[0])["image"].startswith("../images/im")
    again = runner.invoke(main, ["fetch", "synthetic", "--root", str(root)])
    assert again.exit_code == 0 and "already complete" in again.output


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "env-root"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["index", "lspet"])
    assert result.exit_code == 1
    assert "env-root/lspet/joints.mat not found" in result.output
    assert "deeppose fetch lspet" in result.output
    assert_no_escaped_exception(result)


@needs_lspet_mini
def test_fetch_local_archive_and_index_real_lspet(tmp_path):
    # A long root: messages with paths and checksums must not be wrapped mid-path.
    root = tmp_path / ("deep" * 30)
    runner = CliRunner()
    result = runner.invoke(main, ["fetch", "lspet", "--root", str(root), "--archive",
                                  str(LSPET_MINI), "index", "lspet", "--val-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    assert f"into {root / 'lspet'} (" in result.output
    assert re.search(r"pin it with --sha256 [0-9a-f]{64}\.", result.output)
    assert len((root / "lspet" / "index" / "train.jsonl").read_text().splitlines()) == 180


@pytest.mark.parametrize("argv, message", [
    (["fetch", "lspet", "--archive", "missing.zip"], "archive missing.zip not found"),
    (["fetch", "nope"], "Invalid value for"),
    (["index", "lspet", "--val-fraction", "1.5"], "--val-fraction"),
    (["train-stage", "1", "--dataset", "lspet"], "run `deeppose fetch lspet index lspet` first"),
    (["predict", "x.jpg", "--bbox", "1,2,3"], "--bbox must be X,Y,W,H"),
    (["evaluate", "--model", "nowhere"], "--model nowhere: no such run directory"),
])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "data"))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert message in result.output
    assert_no_escaped_exception(result)


def test_info_lists_versions_at_once_and_devices_when_asked():
    code = ("import sys; from deeppose_cli.cli import main\n"
            "try:\n    main(['info'], prog_name='deeppose')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "loaded = [m for m in %r if m in sys.modules]\n"
            "assert not loaded, loaded\n" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for word in ("python", "numpy", "torch", "chainer", "cupy", "opencv"):
        assert word in result.stdout
    assert "deeppose info --devices" in result.stdout
    result = CliRunner().invoke(main, ["info", "--devices"])
    assert result.exit_code == 0, result.output
    for word in ("torch devices", "chainer devices", "cpu"):
        assert word in result.output


@pytest.mark.parametrize("framework", ["pytorch", "chainer"])
def test_train_stage_resume_and_bad_device_through_the_cli(framework, synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    out = tmp_path / "run"
    base = ["train-stage", "1", "--framework", framework, "--train",
            str(index_dir / "train.jsonl"), "--dataset", "synthetic", "--out", str(out),
            "--input-size", "67", "--width", "0.125", "--batch-size", "4", "--quiet"]
    runner = CliRunner()
    first = runner.invoke(main, base + ["--max-iterations", "2"])
    assert first.exit_code == 0, first.output
    # --resume reads recipe.json from the run; only flags given again override it
    resumed = runner.invoke(main, ["train-stage", "1", "--framework", framework, "--out",
                                   str(out), "--resume", "--max-iterations", "4", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    iterations = [json.loads(l)["iteration"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert iterations[-1] == 4 and len(iterations) == len(set(iterations))
    assert json.loads((out / "recipe.json").read_text())["width"] == 0.125
    before = sorted(p.name for p in out.iterdir())
    bad = runner.invoke(main, base + ["--device", "cuda:0"])
    assert bad.exit_code == 1
    assert_no_escaped_exception(bad)
    assert "cuda" in bad.output.lower()
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier run is untouched


def test_evaluate_flips_by_default_only_stages_trained_on_mirrored_images(synthetic_dataset,
                                                                          tmp_path):
    _, index_dir = synthetic_dataset
    runner = CliRunner()
    flipped_stages = {}
    for name, flip in (("mirrored", []), ("unmirrored", ["--no-flip"])):
        out = tmp_path / name
        trained = runner.invoke(main, ["train-stage", "1", "--framework", "pytorch", "--train",
                                       str(index_dir / "train.jsonl"), "--dataset", "synthetic",
                                       "--out", str(out), "--input-size", "67", "--width",
                                       "0.125", "--batch-size", "4", "--max-iterations", "1",
                                       "--quiet", *flip])
        assert trained.exit_code == 0, trained.output
        assert json.loads((out / "recipe.json").read_text())["flip"] is not bool(flip)
        for choice in ([], ["--flip-test"], ["--no-flip-test"]):
            metrics = tmp_path / f"{name}{''.join(choice)}.json"
            done = runner.invoke(main, ["evaluate", "--model", str(out), "--index",
                                        str(index_dir / "val.jsonl"), "--json", str(metrics),
                                        "--plot", str(tmp_path / "pdj.png"), "--save-predictions",
                                        str(tmp_path / "predictions.json"), *choice])
            assert done.exit_code == 0, done.output
            saved = json.loads(metrics.read_text())
            flipped_stages[name, tuple(choice)] = saved["flip_test_stages"]
            assert saved["flip_test"] is bool(saved["flip_test_stages"])
            assert ("test-time flip: off" in done.output) is not saved["flip_test"]
    assert flipped_stages == {("mirrored", ()): [1], ("mirrored", ("--flip-test",)): [1],
                              ("mirrored", ("--no-flip-test",)): [],
                              ("unmirrored", ()): [], ("unmirrored", ("--flip-test",)): [1],
                              ("unmirrored", ("--no-flip-test",)): []}
    # the laplace stage's flip test weights its two views unless told otherwise
    predictions = {}
    for weights in ("scales", "equal"):
        metrics, saved_predictions = tmp_path / f"w-{weights}.json", tmp_path / f"p-{weights}.json"
        done = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "mirrored"), "--index",
                                    str(index_dir / "val.jsonl"), "--json", str(metrics),
                                    "--plot", str(tmp_path / "pdj.png"), "--save-predictions",
                                    str(saved_predictions), "--flip-weights", weights])
        assert done.exit_code == 0, done.output
        assert json.loads(metrics.read_text())["flip_weights"] == weights
        predictions[weights] = saved_predictions.read_text()
    assert predictions["scales"] != predictions["equal"]
    bad = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "mirrored"),
                               "--flip-weights", "median"])
    assert bad.exit_code == 2 and "median" in bad.output
    assert_no_escaped_exception(bad)


@pytest.mark.slow
def test_cascade_example_trains_every_stage_and_evaluates_both_ways(synthetic_dataset, tmp_path):
    import os
    from pathlib import Path

    root, _ = synthetic_dataset
    runs = tmp_path / "runs"
    env = {**os.environ, "DEEPPOSE": str(Path(sys.executable).parent / "deeppose"),
           "DEEPPOSE_DATA": str(root), "RUNS": str(runs), "STAGES": "3",
           "TRAIN_FLAGS": "--input-size 67 --width 0.125 --batch-size 4 --max-iterations 3"}
    script = Path(__file__).resolve().parents[1] / "examples" / "cascade.sh"
    done = subprocess.run(["bash", str(script), "synthetic", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    walls = (runs / "wall.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in walls] == ["stage 1", "stage 2", "stage 3"]
    stage3 = json.loads((runs / "stage3" / "run.json").read_text())
    assert stage3["stage"] == 3 and stage3["complete"]
    plain = json.loads((runs / "stage3" / "eval" / "metrics.json").read_text())
    flipped = json.loads((runs / "stage3" / "eval" / "metrics-flip.json").read_text())
    assert [r["name"] for r in plain["rows"]][-1] == "stages 1-2-3"
    assert not plain["flip_test"] and flipped["flip_test"]


# ----------------------------------------------------------------------------- chaining


def test_a_value_or_a_required_argument_named_like_a_command_is_not_a_command(tmp_path,
                                                                             monkeypatch):
    """`predict info` predicts on a file named info; `--out index` is a directory named
    index: neither starts the command of that name."""
    from deeppose_cli.cli import chain_split, main as group

    names = set(group.commands)
    assert chain_split(group.commands["predict"], ["info"], names) == 1
    assert chain_split(group.commands["predict"], ["a.jpg", "info"], names) == 1
    assert chain_split(group.commands["train-stage"], ["1", "--out", "index"], names) == 3
    assert chain_split(group.commands["train-stage"], ["1", "--out=index", "evaluate"],
                       names) == 2
    assert chain_split(group.commands["index"], ["train-stage", "1"], names) == 0
    assert chain_split(group.commands["fetch"], ["lspet", "index", "lspet"], names) == 1
    assert chain_split(group.commands["train-stage"], ["1", "--flip", "evaluate"], names) == 2

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["predict", "info", "--model", str(tmp_path / "run")])
    assert "Missing argument" not in result.output
    assert "--model" in result.output and "no such run directory" in result.output
    result = CliRunner().invoke(main, ["train-stage", "1", "--out", "index", "--train",
                                       str(tmp_path / "missing.jsonl")])
    assert "requires an argument" not in result.output
    assert "missing.jsonl" in result.output and result.exit_code == 1
    assert_no_escaped_exception(result)


def test_refinement_crop_diagnostics_are_asked_for_and_decode_each_image_once(
        synthetic_dataset, tmp_path, monkeypatch):
    """evaluate reports how often a refinement stage moved joints closer from the predictions
    it made anyway; running the stage on its own simulated crops costs two more forward
    passes per joint and image, so it happens with --refinement-crops only, and then each
    image is decoded once, not once per joint."""
    import deeppose_cli.data.pipeline as pipeline

    _, index_dir = synthetic_dataset
    runner = CliRunner()
    tiny = ["--framework", "pytorch", "--train", str(index_dir / "train.jsonl"), "--dataset",
            "synthetic", "--input-size", "67", "--width", "0.0625", "--batch-size", "4",
            "--max-iterations", "2", "--quiet"]
    for stage, extra in (("1", []), ("2", ["--previous", str(tmp_path / "s1")])):
        done = runner.invoke(main, ["train-stage", stage, *tiny, "--out",
                                    str(tmp_path / f"s{stage}"), *extra])
        assert done.exit_code == 0, done.output
    from conftest import subset_index

    val = subset_index(index_dir, tmp_path / "index", 1, 12) / "val.jsonl"
    decodes = []
    real = pipeline.read_rgb
    monkeypatch.setattr(pipeline, "read_rgb", lambda path: decodes.append(path) or real(path))
    refinement = {}
    for flag in ([], ["--refinement-crops"]):
        done = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "s2"), "--index",
                                    str(val), "--json", str(tmp_path / "m.json"), *flag])
        assert done.exit_code == 0, done.output
        (refinement[bool(flag)],) = json.loads((tmp_path / "m.json").read_text())["refinement"]
    assert refinement[False]["crops"] == {}
    assert set(refinement[True]["crops"]) == {"loss", "err", "err_none", "closer",
                                              "err_centred"}
    assert refinement[False]["moved_closer"] == refinement[True]["moved_closer"]
    assert len(decodes) == len(set(decodes)) == 12  # the crops' images, one decode each
