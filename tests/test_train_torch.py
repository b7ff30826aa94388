"""PyTorch training backend: it learns, resumes exactly, stops on NaN, and its files load safely.

One real training run (module fixture) on the synthetic dataset backs the learning, run
directory and predictor tests; the other tests train a few iterations on a 64-image subset.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deeppose_cli.engines import torch_engine as tb
from deeppose_cli.engines.torch_model import AlexNetRegressor, to_numpy_params
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.training.rundir import RunDirectory
from deeppose_cli.training.stages import train_stage1

from conftest import subset_index, tiny_config

TORSO_PAIR = (9, 2)  # LSP: left shoulder, right hip
NO_AUGMENTATION = dict(jitter_translation=0.0, jitter_scale=0.0, flip=False, colour_noise=0.0)
# Calibrated on two CPU cores, one torch thread: the net leaves the mean-pose plateau after
# ~10 epochs and reaches PDJ@0.2 ~0.52 against the mean pose's ~0.31 by epoch 24 (~20 s).
LEARNING = dict(input_size=131, width=0.125, batch_size=8, epochs=24, optimizer="Adam",
                lr=3e-4, weight_decay=0.0, checkpoint_every=500, **NO_AUGMENTATION)
SMALL = dict(input_size=67, width=0.125, batch_size=16)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    config = tiny_config("pytorch", index_dir, tmp_path_factory.mktemp("trained") / "run",
                         **LEARNING)
    run, summary = train_stage1(config, show_progress=False)
    return config, run, summary


@pytest.fixture(scope="module")
def small_index(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    return subset_index(index_dir, tmp_path_factory.mktemp("small"), 64, 32)


def small_config(index_dir: Path, out: Path, **overrides):
    return tiny_config("pytorch", index_dir, out, **{**SMALL, **overrides})


def mean_pose_pdj(run: RunDirectory, val_index: Path) -> float:
    from deeppose_cli.data.annotations import read_index
    from deeppose_cli.core.geometry import denormalize_pose
    from deeppose_cli.core.metrics import pdj

    records = read_index(val_index)
    mean = np.asarray(run.meta()["mean_pose"], dtype=np.float64)
    boxes = np.stack([r.box for r in records])
    pred = denormalize_pose(np.broadcast_to(mean, (len(records),) + mean.shape), boxes)
    gt = np.stack([r.joints for r in records])
    visible = np.stack([r.visible for r in records])
    return pdj(pred, gt, visible, TORSO_PAIR).at(0.2)[0]


def model_file(path: Path, num_joints: int = 14, input_size: int = 67, width: float = 0.125,
               seed: int = 0) -> tuple[dict, dict]:
    """Write a fresh model with an O(1)-output fc8 to ``path``; returns (params, meta)."""
    torch.manual_seed(seed)
    params = to_numpy_params(AlexNetRegressor(num_joints, input_size, width))
    rng = np.random.default_rng(seed)
    params["fc8/W"] = rng.normal(0, 0.3, params["fc8/W"].shape).astype(np.float32)
    meta = {"num_joints": num_joints, "input_size": input_size, "width": width}
    tb.write_model(params, meta, path)
    return params, meta


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_training_lowers_loss_and_beats_mean_pose(trained):
    config, run, summary = trained
    log = run.read_log()
    losses = [r["loss"] for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    baseline = mean_pose_pdj(run, Path(config.val_index))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; val PDJ@0.2 {summary['val']['pdj@0.2']:.3f}"
          f" vs mean pose {baseline:.3f}")
    assert losses[-1] < 0.5 * losses[0]
    assert val[-1]["val_loss"] < 0.75 * val[0]["val_loss"]
    assert summary["val"]["pdj@0.2"] > baseline + 0.1
    assert summary["iterations"] == 24 * 60
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["images_per_second"] > 0


@pytest.mark.slow
def test_run_directory_contents(trained):
    _, run, _ = trained
    for name in ("recipe.json", "run.json", "log.jsonl", "loss.png", "checkpoint.pt", "model.pt"):
        assert (run.path / name).is_file(), name
    assert run.meta()["complete"] is True
    assert json.loads(run.recipe_path.read_text())["lr"] == LEARNING["lr"]
    log = run.read_log()
    train_records = [r for r in log if "loss" in r]
    val_records = [r for r in log if "val_loss" in r]
    assert train_records and len(val_records) == LEARNING["epochs"]
    for r in train_records:
        assert {"iteration", "epoch", "loss", "elapsed", "images_per_second"} <= set(r)
    assert {"val_loss", "val_pdj@0.2"} <= set(val_records[-1])
    checkpoint = torch.load(run.checkpoint_path, weights_only=True)
    assert checkpoint["format"] == "deeppose-checkpoint" and checkpoint["framework"] == "pytorch"
    assert checkpoint["iteration"] == 24 * 60


@pytest.mark.slow
def test_load_predictor_matches_model_and_validation(trained):
    config, run, summary = trained
    predict = tb.load_predictor(run.model_path, run.meta())
    from deeppose_cli.training.reporting import validation_metrics
    from deeppose_cli.training.stages import stage1_datasets
    from deeppose_cli.core.manifests import load_dataset_manifest

    _, val_set = stage1_datasets(config, load_dataset_manifest("synthetic"))
    metrics = validation_metrics(predict, val_set, config.batch_size, TORSO_PAIR)
    assert metrics["pdj@0.2"] == pytest.approx(summary["val"]["pdj@0.2"])
    assert metrics["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- resume / NaN


def test_resumed_run_ends_with_identical_weights(small_index, tmp_path):
    # 4 iterations per epoch: stopping at 6 is mid-epoch and between checkpoints (every 4).
    settings = dict(epochs=3, checkpoint_every=4)
    full = small_config(small_index, tmp_path / "full", **settings)
    train_stage1(full, show_progress=False)

    part = small_config(small_index, tmp_path / "part", max_iterations=6, **settings)
    _, summary = train_stage1(part, show_progress=False)
    assert summary["iterations"] == 6
    resumed = small_config(small_index, tmp_path / "part", **settings)
    _, summary = train_stage1(resumed, resume=True, show_progress=False)
    assert summary["iterations"] == 12

    a = tb.read_params(tmp_path / "full" / "model.pt")
    b = tb.read_params(tmp_path / "part" / "model.pt")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    iterations = [r["iteration"] for r in RunDirectory(tmp_path / "part").read_log() if "loss" in r]
    assert iterations == sorted(set(iterations))  # the redone iterations are not logged twice


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small_index, tmp_path, monkeypatch):
    calls, pose_loss = [], tb.pose_loss

    def loss_turning_nan(pred, target, visible, use_visibility=True, norm="l2"):
        calls.append(1)
        loss = pose_loss(pred, target, visible, use_visibility, norm)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(tb, "pose_loss", loss_turning_nan)
    config = small_config(small_index, tmp_path / "run", checkpoint_every=2, epochs=3)
    with pytest.raises(DeepPoseError, match="at iteration 5") as info:
        train_stage1(config, show_progress=False)
    assert "checkpoint" in str(info.value) and "\n" not in str(info.value)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert not (tmp_path / "run" / "model.pt").exists()


def test_huge_learning_rate_is_stopped(small_index, tmp_path):
    config = small_config(small_index, tmp_path / "run", optimizer="MomentumSGD", lr=1e6,
                          epochs=3, checkpoint_every=1)
    with pytest.raises(DeepPoseError, match=r"loss became .* at iteration \d+"):
        train_stage1(config, show_progress=False)
    torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # still loadable


def test_explicit_backward_trains_like_autograd(small_index, tmp_path, monkeypatch):
    from deeppose_cli.training import loop

    monkeypatch.setattr(loop, "TrainingReporter",
                        functools.partial(loop.TrainingReporter, log_every=1))
    params, losses = {}, {}
    for explicit in (False, True):
        out = tmp_path / str(explicit)
        config = small_config(small_index, out, optimizer="MomentumSGD", lr=0.01,
                              max_iterations=4, explicit_backward=explicit)
        train_stage1(config, show_progress=False)
        losses[explicit] = [r["loss"] for r in RunDirectory(out).read_log() if "loss" in r]
        params[explicit] = tb.read_params(out / "model.pt")
    assert len(losses[True]) == 4 and all(math.isfinite(v) for v in losses[True])
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-6)
    for name in params[False]:
        np.testing.assert_allclose(params[True][name], params[False][name], rtol=1e-4, atol=1e-6)


def test_training_without_validation_set(small_index, tmp_path):
    config = dataclasses.replace(small_config(small_index, tmp_path / "run", max_iterations=2),
                                 val_index=None)
    _, summary = train_stage1(config, show_progress=False)
    assert summary["iterations"] == 2 and summary["val"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(small_index, tmp_path):
    config = small_config(small_index, tmp_path / "run", device="cuda")
    with pytest.raises(DeepPoseError, match="CUDA is not available"):
        train_stage1(config, show_progress=False)


# ----------------------------------------------------------------------------- model files


def test_model_file_round_trip_and_predictions(tmp_path):
    params, meta = model_file(tmp_path / "model.pt")
    loaded = tb.read_params(tmp_path / "model.pt")
    assert loaded.keys() == params.keys()
    assert all(np.array_equal(loaded[k], params[k]) for k in params)

    images = np.random.default_rng(1).normal(0, 1, (70, 3, 67, 67)).astype(np.float32)
    pred = tb.load_predictor(tmp_path / "model.pt", meta)(images).coords  # 70 > one batch
    assert pred.shape == (70, 14, 2) and pred.dtype == np.float64
    model = AlexNetRegressor(14, 67, 0.125).eval()
    with torch.no_grad():
        for name, value in params.items():
            layer, kind = name.split("/")
            getattr(getattr(model, layer), "weight" if kind == "W" else "bias").copy_(
                torch.from_numpy(value))
        expected = model(torch.from_numpy(images)).numpy().reshape(70, 14, 2)
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 1e-3  # the comparison is not between zeros


def test_truncated_model_file(tmp_path):
    model_file(tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeepPoseError, match="truncated or corrupt"):
        tb.read_params(tmp_path / "model.pt")


def test_chainer_npz_given_to_torch_loader(tmp_path):
    _, meta = model_file(tmp_path / "model.pt")
    np.savez(tmp_path / "model.npz", **{"conv1/W": np.zeros((3, 3), np.float32)})
    with pytest.raises(DeepPoseError, match="Chainer model.*deeppose convert"):
        tb.load_predictor(tmp_path / "model.npz", meta)


def test_missing_model_file(tmp_path):
    with pytest.raises(DeepPoseError, match="does not exist"):
        tb.load_predictor(tmp_path / "nope.pt", {"num_joints": 14, "input_size": 67,
                                                 "width": 0.125})


def test_checkpoint_given_as_model(small_index, tmp_path):
    config = small_config(small_index, tmp_path / "run", max_iterations=1)
    run, _ = train_stage1(config, show_progress=False)
    with pytest.raises(DeepPoseError, match="checkpoint, not a model"):
        tb.load_predictor(run.checkpoint_path, run.meta())


def test_model_file_that_disagrees_with_run(tmp_path):
    _, meta = model_file(tmp_path / "model.pt")
    with pytest.raises(DeepPoseError, match="width"):
        tb.load_predictor(tmp_path / "model.pt", {**meta, "width": 0.25})
    torch.save({"format": "deeppose-model", "framework": "chainer"}, tmp_path / "other.pt")
    with pytest.raises(DeepPoseError, match="chainer model"):
        tb.read_params(tmp_path / "other.pt")


def test_worker_processes_load_the_same_batches(small_index, tmp_path):
    # 4 iterations per epoch: 6 iterations cross an epoch boundary, so the workers must see
    # the new epoch's augmentation seed too.
    params = {}
    for workers in (0, 2):
        config = small_config(small_index, tmp_path / str(workers), max_iterations=6,
                              workers=workers)
        train_stage1(config, show_progress=False)
        params[workers] = tb.read_params(tmp_path / str(workers) / "model.pt")
    assert all(np.array_equal(params[0][k], params[2][k]) for k in params[0])
