"""Chainer training end to end on the synthetic dataset: learning, run files, resume, NaN
guard, the MultiprocessIterator path, and the model file format and its load errors."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from deeppose_cli.engines import chainer_engine as cb
from deeppose_cli.engines.chainer_compat import import_chainer
from deeppose_cli.engines.chainer_model import AlexNetRegressor, load_numpy_params
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.geometry import denormalize_pose
from deeppose_cli.core.manifests import load_dataset_manifest
from deeppose_cli.core.metrics import pdj
from deeppose_cli.training.reporting import TrainingReporter
from deeppose_cli.training.stages import stage1_datasets, train_stage1
from deeppose_cli.core.weights import PARAMETER_NAMES

chainer = import_chainer()

TORSO_PAIR = (9, 2)  # left shoulder, right hip: the LSP torso diameter
# Calibrated on the synthetic data (480 training images): val PDJ@0.2 ends near 0.39 against
# 0.31 for the mean pose, and stays above 0.34 over the last epochs (seeds 0 and 1).
LEARNING = dict(epochs=20, lr=2e-4, batch_size=8, checkpoint_every=400)
ITERATIONS_PER_EPOCH = 480 // LEARNING["batch_size"]


def losses(run) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in run.read_log() if "loss" in r]


def val_crops(config):
    _train, val_set = stage1_datasets(config, load_dataset_manifest("synthetic"))
    images = np.stack([val_set[i][0] for i in range(len(val_set))])
    return val_set, images


def manual_forward(model_path: Path, meta: dict, images: np.ndarray) -> np.ndarray:
    model = AlexNetRegressor(meta["num_joints"], meta["input_size"], meta["width"])
    load_numpy_params(model, cb.read_params(model_path))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(images).array.reshape(len(images), -1, 2)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    """The calibrated training run (tens of seconds), for the tests that need a model that
    has learned something."""
    _root, index_dir = synthetic_dataset
    config = tiny_config("chainer", index_dir, tmp_path_factory.mktemp("trained") / "run",
                         **LEARNING)
    run, summary = train_stage1(config, show_progress=False)
    return config, run, summary


@pytest.fixture(scope="module")
def quick(synthetic_dataset, tmp_path_factory):
    """One epoch (30 iterations, 3 snapshots, 1 validation): a complete run in seconds."""
    _root, index_dir = synthetic_dataset
    config = tiny_config("chainer", index_dir, tmp_path_factory.mktemp("quick") / "run")
    run, summary = train_stage1(config, show_progress=False)
    return config, run, summary


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_lowers_loss_and_beats_mean_pose(trained):
    config, run, summary = trained
    logged = losses(run)
    first, last = logged[0][1], logged[-1][1]
    assert last < 0.7 * first, (first, last)

    meta = run.meta()
    val_set, images = val_crops(config)
    boxes = np.stack([r.box for r in val_set.records])
    gt = np.stack([r.joints for r in val_set.records])
    visible = np.stack([r.visible for r in val_set.records])
    baseline_pose = np.broadcast_to(np.asarray(meta["mean_pose"]), gt.shape)
    baseline = pdj(denormalize_pose(baseline_pose, boxes), gt, visible, TORSO_PAIR).at(0.2)[0]
    predicted = cb.load_predictor(run.model_path, meta)(images).coords
    model = pdj(denormalize_pose(predicted, boxes), gt, visible, TORSO_PAIR).at(0.2)[0]
    assert model > baseline + 0.04, (model, baseline)
    # The backend's own validation saw the same model.
    assert summary["val"]["pdj@0.2"] == pytest.approx(model, abs=1e-9)
    assert summary["iterations"] == ITERATIONS_PER_EPOCH * LEARNING["epochs"]
    assert math.isfinite(summary["final_loss"]) and summary["images_per_second"] > 0


def test_run_directory_holds_exactly_the_run_files(quick):
    _config, run, summary = quick
    names = {p.name for p in run.path.iterdir()}
    assert names == {"recipe.json", "run.json", "log.jsonl", "loss.png", "checkpoint.npz",
                     "model.npz"}
    assert run.meta()["complete"] is True
    records = run.read_log()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert train and val
    for record in train:
        assert {"iteration", "epoch", "loss", "elapsed", "images_per_second"} <= set(record)
    assert [r["iteration"] for r in train] == [10, 20, 30]
    assert [r["iteration"] for r in val] == [30] and summary["iterations"] == 30
    assert summary["val"] == {k[4:]: v for k, v in val[-1].items() if k.startswith("val_")}


def test_model_file_holds_canonical_names_and_metadata(quick):
    _config, run, _summary = quick
    with np.load(run.model_path) as npz:
        keys = set(npz.files)
        assert str(npz["deeppose_format"]) == "deeppose-model"
        assert str(npz["deeppose_framework"]) == "chainer"
        assert (int(npz["num_joints"]), int(npz["input_size"]), float(npz["width"])) == (14, 67, 0.25)
    assert keys == set(PARAMETER_NAMES) | {"deeppose_format", "deeppose_framework",
                                            "num_joints", "input_size", "width", "batch_norm",
                                            "uncertainty"}
    params = cb.read_params(run.model_path)
    assert set(params) == set(PARAMETER_NAMES)
    assert all(p.dtype == np.float32 for p in params.values())


@pytest.mark.slow
def test_load_predictor_matches_a_manual_forward(trained):
    config, run, _summary = trained
    meta = run.meta()
    _val_set, images = val_crops(config)
    images = images[:70]  # more than one internal batch of 64
    predicted = cb.load_predictor(run.model_path, meta)(images).coords
    assert predicted.shape == (70, 14, 2) and predicted.dtype == np.float64
    np.testing.assert_allclose(predicted, manual_forward(run.model_path, meta, images),
                               rtol=1e-5, atol=1e-6)
    # Test mode: no dropout, so the same input gives the same output.
    np.testing.assert_array_equal(predicted, cb.load_predictor(run.model_path, meta)(images).coords)


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_with_a_larger_budget_reproduces_an_uninterrupted_run(synthetic_dataset, tmp_path):
    _root, index_dir = synthetic_dataset
    full = dict(epochs=2, batch_size=32, checkpoint_every=5)  # 15 iterations per epoch
    reference, _ = train_stage1(tiny_config("chainer", index_dir, tmp_path / "ref", **full),
                                show_progress=False)
    out = tmp_path / "resumed"
    run, first = train_stage1(tiny_config("chainer", index_dir, out, max_iterations=20, **full),
                              show_progress=False)
    assert first["iterations"] == 20
    run, summary = train_stage1(tiny_config("chainer", index_dir, out, **full), resume=True,
                                show_progress=False)
    assert summary["iterations"] == 30
    iterations = [i for i, _ in losses(run)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 30
    assert run.meta()["complete"] is True
    # SerialIterator order, Adam state and NumPy's generator (dropout) all come back from the
    # snapshot, so the resumed weights equal the uninterrupted run's exactly.
    expected, got = cb.read_params(reference.model_path), cb.read_params(run.model_path)
    for name in PARAMETER_NAMES:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert losses(run) == losses(reference)


@pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # inside chainer
def test_multiprocess_iterator_trains(synthetic_dataset, tmp_path):
    _root, index_dir = synthetic_dataset
    config = tiny_config("chainer", index_dir, tmp_path / "run", workers=2, max_iterations=4)
    run, summary = train_stage1(config, show_progress=False)
    assert summary["iterations"] == 4 and math.isfinite(summary["final_loss"])
    assert run.model_path.is_file()


# ----------------------------------------------------------------------------- losses


def test_nan_loss_stops_training_and_keeps_the_last_good_snapshot(synthetic_dataset, tmp_path,
                                                                  monkeypatch, capfd):
    _root, index_dir = synthetic_dataset
    calls = []
    real_loss = cb.pose_loss

    def loss_turning_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * np.float32("nan") if len(calls) >= 15 else loss

    monkeypatch.setattr(cb, "pose_loss", loss_turning_nan)
    config = tiny_config("chainer", index_dir, tmp_path / "run", checkpoint_every=10)
    with pytest.raises(DeepPoseError, match=r"at iteration 15\b.*last good checkpoint kept"):
        train_stage1(config, show_progress=False)
    assert "Traceback" not in capfd.readouterr().err  # chainer's loop message is switched off

    checkpoint = tmp_path / "run" / "checkpoint.npz"
    assert not (tmp_path / "run" / "model.npz").exists()
    with np.load(checkpoint) as npz:
        assert int(npz["updater/iteration"]) == 10
    model = AlexNetRegressor(14, config.input_size, config.width)
    chainer.serializers.load_npz(str(checkpoint), model, path="updater/model:main/")
    assert all(np.isfinite(p.array).all() for p in model.params())


def test_explicit_backward_trains_like_autograd(synthetic_dataset, tmp_path, monkeypatch):
    _root, index_dir = synthetic_dataset
    seen: list[float] = []
    real_losses = TrainingReporter.losses

    def spy(self, iteration, losses):
        seen.extend(losses)
        return real_losses(self, iteration, losses)

    monkeypatch.setattr(TrainingReporter, "losses", spy)
    per_mode = {}
    for explicit in (False, True):
        seen.clear()
        config = tiny_config("chainer", index_dir, tmp_path / f"run{explicit}", max_iterations=3,
                             explicit_backward=explicit)
        train_stage1(config, show_progress=False)
        per_mode[explicit] = list(seen)
    assert len(per_mode[True]) == 3 and all(math.isfinite(x) for x in per_mode[True])
    assert per_mode[True][0] == pytest.approx(per_mode[False][0], rel=1e-6)
    # Same gradients: the next steps stay together too.
    np.testing.assert_allclose(per_mode[True], per_mode[False], rtol=1e-4)


# ----------------------------------------------------------------------------- model files


def test_load_errors_are_one_line(quick, tmp_path):
    _config, run, _summary = quick
    meta = run.meta()

    def error_of(path: Path, meta=meta, device="cpu") -> str:
        with pytest.raises(DeepPoseError) as info:
            cb.load_predictor(path, meta, device)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "not found" in error_of(tmp_path / "missing.npz")

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(run.model_path.read_bytes()[:100_000])
    assert "truncated or corrupt" in error_of(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 1000)
    assert "truncated or corrupt" in error_of(garbage)

    import torch

    torch_file = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, torch_file)
    message = error_of(torch_file)
    assert "PyTorch model" in message and "deeppose convert" in message

    message = error_of(run.checkpoint_path)
    assert "checkpoint" in message and "model.npz" in message
    with pytest.raises(DeepPoseError, match="checkpoint"):
        cb.read_params(run.checkpoint_path)

    message = error_of(run.model_path, meta={**meta, "num_joints": 16})
    assert "fc8/W" in message and "expected" in message


def test_write_model_round_trips_and_checks_shapes(tmp_path):
    np.random.seed(3)
    meta = {"num_joints": 14, "input_size": 67, "width": 0.125}
    model = AlexNetRegressor(**meta)
    from deeppose_cli.engines.chainer_model import to_numpy_params

    params = to_numpy_params(model)
    path = tmp_path / "m.npz"
    cb.write_model(params, meta, path)
    back = cb.read_params(path)
    for name in PARAMETER_NAMES:
        np.testing.assert_array_equal(back[name], params[name])
    with pytest.raises(DeepPoseError, match="fc8/W"):
        cb.write_model(params, {**meta, "num_joints": 13}, tmp_path / "bad.npz")
    # A plain save_npz of the link (no metadata) is a valid model too: the names are the same.
    plain = tmp_path / "plain.npz"
    chainer.serializers.save_npz(str(plain), model)
    with zipfile.ZipFile(plain) as archive:
        assert {n[:-4] for n in archive.namelist()} == set(PARAMETER_NAMES)
    regress = cb.load_predictor(plain, meta)
    assert regress(np.zeros((2, 3, 67, 67), np.float32)).coords.shape == (2, 14, 2)


@pytest.mark.skipif(chainer.backends.cuda.available, reason="CuPy is installed")
def test_cuda_without_cupy_says_how_to_install_it(tmp_path):
    with pytest.raises(DeepPoseError, match=r"deeppose\[gpu\]"):
        cb.load_predictor(tmp_path / "m.npz", {}, device="cuda")
