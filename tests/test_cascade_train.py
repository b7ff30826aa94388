"""Refinement stages end to end: they improve on stage 1 in each framework, a cascade may mix
frameworks, run directories are self-sufficient, and the CLI chains it all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.data.annotations import read_index
from deeppose_cli.core.cascade import run_cascade_on_records
from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.metrics import pdj
from deeppose_cli.apps.convert import convert_run
from deeppose_cli.training.runs import load_cascade
from deeppose_cli.training.rundir import RunDirectory
from deeppose_cli.training.stages import train_stage

from conftest import CALIBRATED, assert_no_escaped_exception, tiny_config

TORSO = (9, 2)
# Stage 1 as calibrated in test_train_torch.py (PDJ@0.2 ~0.5 against the mean pose's ~0.31).
STAGE1 = dict(input_size=131, width=0.125, batch_size=8, epochs=24, optimizer="Adam", lr=3e-4,
              weight_decay=0.0, jitter_translation=0.0, jitter_scale=0.0, flip=False,
              colour_noise=0.0, checkpoint_every=5000)
# Two epochs of simulated refinement samples (~6500 joint crops each) in a box of one torso
# diameter, with the refinement recipe's batch norm and L1 loss: the paper's network (no batch
# norm, L2) passed or stayed on its plateau (+0.001) depending on the thread count alone.
STAGE2 = dict(STAGE1, epochs=2, sigma=1.0, flip=True, batch_norm=True, loss="l1", dropout=0.0)


def refinement_config(framework, index_dir, out, previous, stage=2, **overrides):
    from deeppose_cli.core.manifests import load_stage_recipe
    from deeppose_cli.core.config import TrainConfig

    recipe = load_stage_recipe(stage)
    recipe.update(CALIBRATED)
    recipe.update(overrides)
    return TrainConfig.from_recipe(recipe, stage=stage, framework=framework, dataset="synthetic",
                                   train_index=str(index_dir / "train.jsonl"),
                                   val_index=str(index_dir / "val.jsonl"), out=str(out),
                                   previous=str(previous))


@pytest.fixture(scope="module")
def stage1_run(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    config = tiny_config("pytorch", index_dir, tmp_path_factory.mktemp("s1") / "stage1", **STAGE1)
    run, _ = train_stage(config, show_progress=False)
    return run.path


def pdj_at(run_dir: Path, records, alpha: float) -> list[float]:
    stages, _ = load_cascade(run_dir)
    gt = np.stack([r.joints for r in records])
    vis = np.stack([r.visible for r in records])
    return [pdj(p, gt, vis, TORSO).at(alpha)[0]
            for p in run_cascade_on_records(stages, records, TORSO)]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["pytorch", "chainer"])
def test_stage2_improves_pdj_over_stage1(framework, synthetic_dataset, stage1_run, tmp_path):
    _, index_dir = synthetic_dataset
    config = refinement_config(framework, index_dir, tmp_path / "stage2", stage1_run, **STAGE2)
    run, summary = train_stage(config, show_progress=False)
    val = read_index(index_dir / "val.jsonl")
    stage1_only, with_stage2 = pdj_at(run.path, val, 0.1)
    print(f"{framework}: PDJ@0.1 stage 1 {stage1_only:.3f} -> stages 1-2 {with_stage2:.3f}")
    assert with_stage2 > stage1_only + 0.03
    meta = run.meta()
    assert meta["stage"] == 2 and meta["sigma"] == 1.0 and meta["complete"]
    assert [e["stage"] for e in meta["chain"]] == [1]
    stats = json.loads((run.path / "displacement.json").read_text())
    assert np.asarray(stats["cov"]).shape == (14, 2, 2)


def quick(framework, index_dir, out, stage, previous=None):
    """A few iterations: enough for weights that differ from the initialisation."""
    common = dict(input_size=67, width=0.125, batch_size=8, optimizer="Adam", lr=1e-3,
                  weight_decay=0.0, max_iterations=3, checkpoint_every=100)
    if stage == 1:
        config = tiny_config(framework, index_dir, out, **common)
    else:
        config = refinement_config(framework, index_dir, out, previous, stage, sigma=2.0,
                                   **common)
    return train_stage(config, show_progress=False)[0].path


@pytest.fixture(scope="module")
def mixed_cascade(synthetic_dataset, tmp_path_factory):
    """Chainer stage 1 + PyTorch stage 2 + Chainer stage 3."""
    _, index_dir = synthetic_dataset
    root = tmp_path_factory.mktemp("mixed")
    s1 = quick("chainer", index_dir, root / "stage1-chainer", 1)
    s2 = quick("pytorch", index_dir, root / "stage2-pytorch", 2, s1)
    s3 = quick("chainer", index_dir, root / "stage3-chainer", 3, s2)
    return s1, s2, s3


@pytest.mark.slow
def test_mixed_cascade_predicts_like_the_converted_pytorch_cascade(mixed_cascade,
                                                                   synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    _, _, s3 = mixed_cascade
    meta = RunDirectory(s3).meta()
    assert [e["framework"] for e in meta["chain"]] == ["chainer", "pytorch"]
    converted = convert_run(s3, "pytorch", tmp_path / "all-pytorch")
    frameworks = [e["framework"] for e in RunDirectory(converted).meta()["chain"]]
    assert frameworks == ["pytorch", "pytorch"] and RunDirectory(converted).meta()["framework"] == "pytorch"
    records = read_index(index_dir / "val.jsonl")[:12]
    mixed = run_cascade_on_records(load_cascade(s3)[0], records, TORSO)
    pure = run_cascade_on_records(load_cascade(converted)[0], records, TORSO)
    assert len(mixed) == 3
    # within 1e-4 in the networks' normalized coordinates: pixels divided by the box side
    side = np.array([r.box[2] for r in records])[:, None, None]
    for a, b in zip(mixed, pure):
        np.testing.assert_array_less(np.abs(a - b) / side, 1e-4)
    # the refinements really move the joints, so the comparison covers stages 2 and 3
    assert np.abs(mixed[2] - mixed[0]).max() > 0.1


@pytest.mark.slow
def test_run_directory_is_self_sufficient(mixed_cascade, synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    s1, s2, s3 = mixed_cascade
    moved = tmp_path / "elsewhere"
    shutil.copytree(s3, moved)
    records = read_index(index_dir / "val.jsonl")[:4]
    original = run_cascade_on_records(load_cascade(s3)[0], records, TORSO)
    copied = run_cascade_on_records(load_cascade(moved)[0], records, TORSO)
    np.testing.assert_array_equal(original[-1], copied[-1])
    assert len(load_cascade(moved, stages=2)[0]) == 2
    # a tampered earlier stage is refused
    stage1_model = moved / "chain" / "stage1" / "model.npz"
    data = bytearray(stage1_model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage1_model.write_bytes(bytes(data))
    with pytest.raises(DeepPoseError, match="checksum"):
        load_cascade(moved)
    with pytest.raises(DeepPoseError, match="--stages must be between 1 and 3"):
        load_cascade(s3, stages=4)


@pytest.mark.slow
def test_previous_must_be_the_stage_before(mixed_cascade, synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    s1, _, _ = mixed_cascade
    config = refinement_config("pytorch", index_dir, tmp_path / "s3", s1, 3, sigma=2.0)
    with pytest.raises(DeepPoseError, match="is a stage-1 run; stage 3 refines a stage-2 run"):
        train_stage(config, show_progress=False)


TINY = ["--input-size", "67", "--width", "0.125", "--batch-size", "8", "--max-iterations",
        "3", "--quiet", "--optimizer", "Adam", "--lr", "1e-3"]


@pytest.mark.slow
def test_cli_chain_fetch_to_evaluate_then_predict_and_convert(tmp_path, monkeypatch):
    import cv2

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "data"))
    runner = CliRunner()
    result = runner.invoke(main, ["fetch", "synthetic", "index", "synthetic",
                                  "train-stage", "1", "--framework", "chainer", *TINY,
                                  "train-stage", "2", "--framework", "pytorch", *TINY,
                                  "evaluate"])
    assert result.exit_code == 0, result.output
    s2 = tmp_path / "runs" / "synthetic" / "stage2-pytorch"
    metrics = json.loads((s2 / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["mean pose", "stage 1", "stages 1-2"]
    assert (s2 / "eval" / "pdj.png").stat().st_size > 0
    predictions = json.loads((s2 / "eval" / "predictions.json").read_text())
    assert len(predictions) == 120 and len(predictions[0]["stages"]) == 2
    assert "stages 1-2" in result.output and "mean pose" in result.output

    image = tmp_path / "data" / "synthetic" / "images" / "im00001.jpg"
    (tmp_path / "notes.txt").write_text("not an image")
    result = runner.invoke(main, ["predict", str(image), "notes.txt", "missing.jpg", "--draw",
                                  "--out", "drawn"])
    assert result.exit_code == 2
    assert "notes.txt: not an image" in result.output and "missing.jpg: no such file" in result.output
    assert "right_ankle" in result.output
    assert_no_escaped_exception(result)
    drawn = cv2.imread(str(tmp_path / "drawn" / "im00001_pose.png"))
    assert drawn is not None and drawn.shape == cv2.imread(str(image)).shape

    result = runner.invoke(main, ["predict", str(image), "--json", "--stages", "1",
                                  "--bbox", "10,10,120,120"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)
    assert entry["bbox"] == [10, 10, 120, 120] and len(entry["keypoints"]) == 14
    assert set(entry["keypoints"][0]) == {"name", "x", "y"}

    result = runner.invoke(main, ["convert", str(s2), "--to", "chainer"])
    assert result.exit_code == 0, result.output
    converted = Path(f"{s2}-chainer")
    assert (converted / "model.npz").is_file() and (converted / "chain" / "stage1" / "model.npz").is_file()
    again = runner.invoke(main, ["convert", str(s2), "--to", "chainer"])
    assert again.exit_code == 1 and "already exists" in again.output
