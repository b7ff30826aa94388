"""Recipes that learn: the learning-rate schedule (same in both frameworks), augmentation that
keeps joints on their pixels, the L1 loss, --init across frameworks, and where displacement
statistics come from."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.data.annotations import read_index
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.geometry import normalized_to_crop_pixels, person_box
from deeppose_cli.core.manifests import load_dataset_manifest
from deeppose_cli.core.images import IMAGE_MEAN, IMAGE_STD
from deeppose_cli.data.pipeline import Augmentation, make_sample
from deeppose_cli.core.schedules import LearningRateSchedule

from conftest import FunctionPredictor, subset_index, tiny_config

PERM = load_dataset_manifest("lsp").flip_permutation


# ----------------------------------------------------------------------------- schedule


def test_schedule_warms_up_linearly_then_decays_to_the_final_ratio():
    s = LearningRateSchedule(1e-3, 100, "cosine", warmup_iterations=10, final_ratio=0.01)
    assert [s(i) for i in (1, 5, 10)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert s(11) == pytest.approx(1e-3)
    assert s(100) == pytest.approx(1e-5)
    values = [s(i) for i in range(11, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    assert s(55) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=0.05)  # cosine midpoint


def test_step_and_constant_schedules():
    step = LearningRateSchedule(1.0, 101, "step", warmup_iterations=0)
    assert step(1) == 1.0 and step(60) == 1.0
    assert step(62) == pytest.approx(0.1) and step(101) == pytest.approx(0.01)
    const = LearningRateSchedule(0.5, 50, "constant", warmup_iterations=5)
    assert const(1) == pytest.approx(0.1) and const(6) == const(50) == 0.5


@pytest.mark.parametrize("bad", [dict(kind="linear"), dict(warmup_iterations=-1),
                                 dict(final_ratio=2.0), dict(base_lr=0.0)])
def test_schedule_refuses_bad_settings(bad):
    with pytest.raises(DeepPoseError):
        LearningRateSchedule(**{"base_lr": 1e-3, "total_iterations": 10, **bad})


def _recorded_learning_rates(framework, monkeypatch, index_dir, out, **overrides):
    """The step size each optimizer step of a real run used, read from the optimizer."""
    from deeppose_cli.training.stages import train_stage1

    seen = []
    if framework == "pytorch":
        from deeppose_cli.engines import torch_engine as backend

        real = backend.train_step

        def spy(model, loss_fn, optimizer, *args, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])
            return real(model, loss_fn, optimizer, *args, **kwargs)
    else:
        from deeppose_cli.engines import chainer_engine as backend

        real = backend.train_step

        def spy(model, loss_fn, optimizer, *args, **kwargs):
            seen.append(optimizer.alpha if hasattr(optimizer, "alpha") else optimizer.lr)
            return real(model, loss_fn, optimizer, *args, **kwargs)

    monkeypatch.setattr(backend, "train_step", spy)
    config = tiny_config(framework, index_dir, out, input_size=67, width=0.0625, batch_size=16,
                         **overrides)
    train_stage1(config, show_progress=False)
    return seen


@pytest.mark.parametrize("optimizer", ["Adam", "MomentumSGD"])
def test_both_frameworks_step_with_the_schedules_learning_rate(optimizer, synthetic_dataset,
                                                               monkeypatch, tmp_path):
    _, index_dir = synthetic_dataset
    settings = dict(optimizer=optimizer, lr=2e-3, lr_schedule="cosine", lr_warmup=4,
                    lr_final_ratio=0.1, max_iterations=12, epochs=3)
    torch_lrs = _recorded_learning_rates("pytorch", monkeypatch, index_dir, tmp_path / "t",
                                         **settings)
    chainer_lrs = _recorded_learning_rates("chainer", monkeypatch, index_dir, tmp_path / "c",
                                           **settings)
    # max_iterations is what runs, so the schedule spans 12 iterations, not 3 epochs
    expected = [LearningRateSchedule(2e-3, 12, "cosine", 4, 0.1)(i) for i in range(1, 13)]
    assert torch_lrs == pytest.approx(expected, rel=1e-6)
    assert chainer_lrs == pytest.approx(expected, rel=1e-6)
    from deeppose_cli.training.rundir import RunDirectory

    for run in ("t", "c"):
        logged = {r["iteration"]: r["lr"] for r in RunDirectory(tmp_path / run).read_log()
                  if "lr" in r}
        assert logged[12] == pytest.approx(expected[-1])


@pytest.mark.parametrize("framework", ["pytorch", "chainer"])
def test_val_every_validates_every_nth_epoch_and_at_the_end(framework, synthetic_dataset,
                                                             tmp_path):
    from deeppose_cli.training.rundir import RunDirectory
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    small = subset_index(index_dir, tmp_path / "index", 32, 8)  # 2 iterations an epoch
    config = tiny_config(framework, small, tmp_path / "run", width=0.0625, epochs=5, val_every=2)
    assert config.to_json()["val_every"] == 2
    train_stage1(config, show_progress=False)
    validated = [r["iteration"] for r in RunDirectory(tmp_path / "run").read_log()
                 if "val_loss" in r]
    assert validated == [4, 8, 10]  # after epochs 2 and 4, and the last one


# ----------------------------------------------------------------------------- augmentation


def _dot_image(point, size=(160, 140)):
    image = np.zeros(size + (3,), dtype=np.uint8)
    x, y = int(round(point[0])), int(round(point[1]))
    image[y - 1:y + 2, x - 1:x + 2] = 255
    return image


def _bright_centroid(sample_image):
    """Centroid (x, y) of the bright blob in a network input, in crop pixels."""
    rgb = sample_image.transpose(1, 2, 0) * IMAGE_STD + IMAGE_MEAN
    weight = np.clip(rgb.mean(axis=2) - 0.2, 0, None)
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


@pytest.mark.parametrize("seed", range(8))
def test_augmented_joints_stay_on_their_pixels(seed):
    """Draw one dot per joint, augment with rotation, scale, shift and flip, and find each dot
    where the sample's joint coordinates say (after the left/right label swap of a flip)."""
    rng = np.random.default_rng(100 + seed)
    joints = rng.uniform(40, 100, (14, 2)).round()
    visible = np.ones(14)
    box = person_box(joints, visible, 0.2)
    aug = Augmentation(jitter_translation=0.05, jitter_scale=0.15, flip=True, colour_noise=0.0,
                       rotation=40.0, occlusion=0.0, outside_joints="keep")
    size = 131
    found, targets = [], None
    for k in range(14):
        image = _dot_image(joints[k])
        x, normalized, _ = make_sample(image, box, joints, visible, size, aug,
                                       np.random.default_rng([seed, 3]), PERM)
        targets = normalized_to_crop_pixels(normalized, size)
        found.append(_bright_centroid(x))
    found = np.array(found)
    identity = np.abs(found - targets).max()
    swapped = np.abs(found - targets[PERM]).max()  # dot of joint k labelled PERM[k] if flipped
    assert min(identity, swapped) < 0.75, (identity, swapped)
    # the augmentation really moved the joints: compare with the plain crop
    _, plain, _ = make_sample(_dot_image(joints[0]), box, joints, visible, size,
                              Augmentation.none(), np.random.default_rng(0), PERM)
    assert np.abs(normalized_to_crop_pixels(plain, size) - targets).max() > 2.0


def test_rotation_and_flip_both_happen_across_seeds():
    joints = np.random.default_rng(1).uniform(40, 100, (14, 2))
    box = person_box(joints, np.ones(14), 0.2)
    aug = Augmentation(0.0, 0.0, True, 0.0, rotation=30.0)
    image = np.zeros((150, 150, 3), np.uint8)
    xs = [make_sample(image, box, joints, np.ones(14), 67, aug, np.random.default_rng(s), PERM)[1]
          for s in range(20)]
    plain = make_sample(image, box, joints, np.ones(14), 67, Augmentation.none(),
                        np.random.default_rng(0), PERM)[1]
    mirrored_heads = sum(np.sign(x[13, 0] * plain[13, 0]) < 0 for x in xs)
    assert 0 < mirrored_heads < 20  # some flipped, some not
    assert len({round(float(x[12, 1]), 4) for x in xs}) == 20  # every draw rotates differently


def test_joints_pushed_out_of_the_crop_are_dropped_or_kept_as_the_recipe_says():
    joints = np.array([[50.0, 50.0]] * 13 + [[95.0, 50.0]])  # joint 13 far right
    box = np.array([50.0, 50.0, 100.0, 100.0])
    image = np.zeros((120, 120, 3), np.uint8)
    rng = np.random.default_rng
    # a 30 % zoom-in (box side x exp(-0.35)) pushes joint 13 (0.45 from the centre) out
    zoom = dict(jitter_translation=0.0, jitter_scale=0.0, flip=False, colour_noise=0.0)
    small_box = box * np.array([1, 1, 0.7, 0.7])
    for policy, expected in (("drop", 0.0), ("keep", 1.0)):
        aug = Augmentation(**zoom, outside_joints=policy)
        _, normalized, visible = make_sample(image, small_box, joints, np.ones(14), 67, aug,
                                             rng(0), PERM)
        assert abs(normalized[13, 0]) > 0.5
        assert visible[13] == expected and visible[:13].all()


def test_occlusion_erases_one_rectangle_with_the_mean_colour():
    image = np.full((100, 100, 3), 255, np.uint8)
    joints = np.random.default_rng(0).uniform(20, 80, (14, 2))
    box = np.array([50.0, 50.0, 100.0, 100.0])
    aug = Augmentation(0.0, 0.0, False, 0.0, occlusion=1.0)
    x, _, visible = make_sample(image, box, joints, np.ones(14), 67, aug,
                                np.random.default_rng(0), PERM)
    erased = np.abs(x).max(axis=0) < 0.02  # the mean colour normalizes to ~0
    assert 0.015 < erased.mean() < 0.25 and visible.all()
    rows, cols = np.nonzero(erased)
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle


def test_recipes_without_new_augmentations_draw_exactly_as_before():
    """Rotation and occlusion draw after the old draws, and only when on."""
    rng = np.random.default_rng(5)
    joints = rng.uniform(20, 80, (14, 2))
    image = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    box = person_box(joints, np.ones(14), 0.2)
    old = Augmentation(0.05, 0.1, True, 0.1)
    a = make_sample(image, box, joints, np.ones(14), 67, old, np.random.default_rng(9), PERM)
    b = make_sample(image, box, joints, np.ones(14), 67,
                    Augmentation(0.05, 0.1, True, 0.1, rotation=0.0, occlusion=0.0),
                    np.random.default_rng(9), PERM)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_bad_augmentation_settings_are_refused():
    with pytest.raises(DeepPoseError, match="outside_joints"):
        Augmentation.from_recipe({"outside_joints": "clip"})


def test_show_augmentation_writes_a_grid(synthetic_dataset, tmp_path):
    import cv2

    root, index_dir = synthetic_dataset
    out = tmp_path / "grid.png"
    from deeppose_cli.cli import main

    result = CliRunner().invoke(main, [
        "show-augmentation", "--index", str(index_dir / "train.jsonl"), "--dataset",
        "synthetic", "--count", "6", "--input-size", "67", "--rotation", "45", "--out",
        str(out)])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape == (67, 6 * 67 + 5 * 2, 3)  # one row of six


def test_show_augmentation_draws_the_jitter_free_tail_of_the_run(synthetic_dataset, tmp_path):
    """``--jitter-off-fraction`` reaches the samples through the recipe: an epoch inside the
    run's jitter-free tail draws what a recipe without jitter draws, an earlier one does not."""
    import cv2

    from deeppose_cli.cli import main

    root, index_dir = synthetic_dataset
    common = ["show-augmentation", "--index", str(index_dir / "train.jsonl"), "--dataset",
              "synthetic", "--count", "4", "--input-size", "67", "--rotation", "30"]

    def grid(name: str, *args: str):
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(main, common + ["--out", str(out), *args])
        assert result.exit_code == 0, result.output
        return cv2.imread(str(out))

    # The stage-1 recipe's 100 epochs: the last 30 % starts at epoch 70.
    tail = ["--jitter-off-fraction", "0.3"]
    no_jitter = ["--rotation", "0", "--jitter-scale", "0", "--jitter-translation", "0"]
    np.testing.assert_array_equal(grid("tail", *tail, "--epoch", "70"),
                                  grid("plain", *no_jitter, "--epoch", "70"))
    assert not np.array_equal(grid("before", *tail, "--epoch", "69"),
                              grid("plain69", *no_jitter, "--epoch", "69"))
    bad = CliRunner().invoke(main, common + ["--jitter-off-fraction", "1.5"])
    assert bad.exit_code != 0 and "1.5" in bad.output


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_l1_and_l2_losses_agree_across_frameworks_and_backward_implementations(norm):
    import torch

    from deeppose_cli.engines import chainer_model as cm
    from deeppose_cli.engines import torch_model as tm
    from deeppose_cli.engines.chainer_compat import import_chainer

    chainer = import_chainer()

    rng = np.random.default_rng(0)
    pred = rng.normal(size=(4, 28)).astype(np.float32)
    target = rng.normal(size=(4, 14, 2)).astype(np.float32)
    visible = (rng.random((4, 14)) > 0.3).astype(np.float32)
    target[visible == 0] = np.nan  # unlabelled joints must not matter
    diff = np.where(visible[..., None] > 0, pred.reshape(4, 14, 2) - np.nan_to_num(target), 0)
    expected = (np.abs(diff) if norm == "l1" else diff ** 2).sum() / visible.sum()
    results = []
    for fn in (tm.pose_loss, tm.pose_loss_explicit):
        p = torch.tensor(pred, requires_grad=True)
        loss = fn(p, torch.tensor(target), torch.tensor(visible), True, norm)
        loss.backward()
        results.append((loss.item(), p.grad.numpy()))
    for fn in (cm.pose_loss, cm.pose_loss_explicit):
        p = chainer.Variable(pred.copy())
        loss = fn(p, target, visible, True, norm=norm)
        loss.backward()
        results.append((float(loss.array), p.grad))
    for value, grad in results:
        assert value == pytest.approx(float(expected), rel=1e-5)
        np.testing.assert_allclose(grad, results[0][1], atol=1e-6)
    if norm == "l1":
        nonzero = np.abs(results[0][1][results[0][1] != 0])
        np.testing.assert_allclose(nonzero, 1 / visible.sum(), rtol=1e-6)  # sign(d) / count


# ----------------------------------------------------------------------------- --init


def test_init_from_a_chainer_model_predicts_identically_in_pytorch(synthetic_dataset, tmp_path):
    """A PyTorch run started with --init from a Chainer run holds exactly its weights before
    the first step: predictions match the Chainer model."""
    from deeppose_cli.engines import chainer_engine, torch_engine
    from deeppose_cli.data.pipeline import PoseDataset
    from deeppose_cli.training.runs import initial_parameters
    from deeppose_cli.training.rundir import RunDirectory
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    chainer_run, _ = train_stage1(tiny_config("chainer", index_dir, tmp_path / "c",
                                              input_size=67, width=0.125, max_iterations=3),
                                  show_progress=False)
    config = tiny_config("pytorch", index_dir, tmp_path / "t", input_size=67, width=0.125,
                         init=str(chainer_run.path))
    model = torch_engine.build_model(config, 14, initial_parameters(config.init))
    records = read_index(index_dir / "val.jsonl")[:8]
    images = np.stack([PoseDataset(records, 67, PERM)[i][0] for i in range(8)])
    ours = torch_engine.TorchPredictor(model, __import__("torch").device("cpu"))(images).coords
    meta = RunDirectory(chainer_run.path).meta()
    theirs = chainer_engine.load_predictor(chainer_run.model_path, meta)(images).coords
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and the model file alone works the same as its run directory
    by_file = initial_parameters(chainer_run.model_path)
    assert all(np.array_equal(by_file[k], v) for k, v in initial_parameters(config.init).items())


def test_init_with_a_different_network_fails_before_touching_the_run(synthetic_dataset,
                                                                      tmp_path):
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    first, _ = train_stage1(tiny_config("pytorch", index_dir, tmp_path / "a", input_size=67,
                                        width=0.125, max_iterations=2), show_progress=False)
    config = tiny_config("chainer", index_dir, tmp_path / "b", input_size=67, width=0.25,
                         max_iterations=2, init=str(first.path))
    with pytest.raises(DeepPoseError, match="--init .* does not fit this network"):
        train_stage1(config, show_progress=False)
    with pytest.raises(DeepPoseError, match="no such run directory or model file"):
        train_stage1(tiny_config("pytorch", index_dir, tmp_path / "c",
                                 init=str(tmp_path / "missing.pt")), show_progress=False)
    assert not (tmp_path / "c").exists()


def test_laplace_runs_carry_their_scale_layer_through_files_init_and_conversion(
        synthetic_dataset, tmp_path):
    """A Chainer run trained with the laplace loss writes its scale layer; a PyTorch run
    started from it (--init) and its conversion predict exactly what it does."""
    import torch

    from deeppose_cli.engines import chainer_engine, torch_engine
    from deeppose_cli.data.pipeline import PoseDataset
    from deeppose_cli.apps.convert import convert_run
    from deeppose_cli.training.runs import initial_parameters
    from deeppose_cli.training.rundir import RunDirectory
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    chainer_run, _ = train_stage1(tiny_config("chainer", index_dir, tmp_path / "c", input_size=67,
                                              width=0.125, max_iterations=3, loss="laplace"),
                                  show_progress=False)
    meta = RunDirectory(chainer_run.path).meta()
    assert meta["uncertainty"] is True
    params = chainer_engine.read_params(chainer_run.model_path)
    assert {"fc8_scale/W", "fc8_scale/b"} <= set(params)
    records = read_index(index_dir / "val.jsonl")[:8]
    images = np.stack([PoseDataset(records, 67, PERM)[i][0] for i in range(8)])
    theirs = chainer_engine.load_predictor(chainer_run.model_path, meta)(images).coords
    assert theirs.shape == (8, 14, 2)

    config = tiny_config("pytorch", index_dir, tmp_path / "t", input_size=67, width=0.125,
                         loss="laplace", init=str(chainer_run.path))
    model = torch_engine.build_model(config, 14, initial_parameters(config.init))
    np.testing.assert_array_equal(torch_engine.to_numpy_params(model)["fc8_scale/W"],
                                  params["fc8_scale/W"])
    ours = torch_engine.TorchPredictor(model, torch.device("cpu"))(images).coords
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # the flip test's weights: both frameworks give the scale layer's log scales beside the
    # same coordinates, and a network without the layer gives None
    chainer_predictor = chainer_engine.load_predictor(chainer_run.model_path, meta)
    torch_predictor = torch_engine.TorchPredictor(model, torch.device("cpu"))
    assert chainer_predictor.has_scales and torch_predictor.has_scales
    their_prediction, our_prediction = chainer_predictor(images), torch_predictor(images)
    np.testing.assert_array_equal(their_prediction.coords, theirs)
    assert their_prediction.log_scales.shape == (8, 14, 2)
    np.testing.assert_allclose(our_prediction.log_scales, their_prediction.log_scales,
                               atol=1e-5)
    model.train()
    training_output = model(torch.from_numpy(images)).detach().numpy()
    model.eval()
    assert training_output.shape == (8, 4 * 14)  # train mode always adds the scales
    plain_config = tiny_config("pytorch", index_dir, tmp_path / "p", input_size=67, width=0.125)
    plain = torch_engine.TorchPredictor(torch_engine.build_model(plain_config, 14),
                                        torch.device("cpu"))
    assert not plain.has_scales and plain(images).log_scales is None
    from deeppose_cli.training.runs import load_stage
    # so evaluate and predict weight the flip
    assert load_stage(chainer_run.path).predictor.has_scales

    converted = convert_run(chainer_run.path, "pytorch", tmp_path / "converted")
    converted_meta = RunDirectory(converted).meta()
    assert converted_meta["uncertainty"] is True
    model_file = converted / converted_meta["model_file"]
    assert torch.load(model_file, weights_only=True)["uncertainty"] is True
    np.testing.assert_allclose(torch_engine.load_predictor(model_file, converted_meta)(images).coords,
                               theirs, atol=1e-5)
    with pytest.raises(DeepPoseError, match="explicit-backward must be one of l2, l1"):
        tiny_config("pytorch", index_dir, tmp_path / "e", loss="laplace",
                    explicit_backward=True).validate()


# ----------------------------------------------------------------------------- displacements


@pytest.mark.parametrize("source", ["train", "val"])
def test_displacement_statistics_come_from_the_split_they_claim(source, synthetic_dataset,
                                                                tmp_path):
    from deeppose_cli.core.manifests import load_stage_recipe
    from deeppose_cli.core.config import TrainConfig
    from deeppose_cli.training.stages import train_stage

    _, index_dir = synthetic_dataset
    small = dict(input_size=67, width=0.125, batch_size=8, max_iterations=2)
    stage1, _ = train_stage(tiny_config("pytorch", index_dir, tmp_path / "s1", **small),
                            show_progress=False)
    recipe = {**load_stage_recipe(2), **small, "batch_norm": False,
              "displacement_source": source}
    config = TrainConfig.from_recipe(recipe, stage=2, framework="pytorch", dataset="synthetic",
                                     train_index=str(index_dir / "train.jsonl"),
                                     val_index=str(index_dir / "val.jsonl"),
                                     out=str(tmp_path / "s2"), previous=str(stage1.path))
    run, summary = train_stage(config, show_progress=False)
    stats = json.loads((run.path / "displacement.json").read_text())
    records = read_index(index_dir / f"{source}.jsonl")
    assert stats["source"] == source and stats["images"] == len(records)
    assert stats["index"] == str(index_dir / f"{source}.jsonl")
    assert stats["count"] == np.stack([r.visible for r in records]).sum(axis=0).tolist()
    # the refinement report is in the validation log
    val = [r for r in run.read_log() if "val_err" in r][-1]
    for key in ("val_err", "val_err_none", "val_closer", "val_err_centred"):
        assert math.isfinite(val[key])


def test_val_displacements_need_a_val_split(synthetic_dataset, tmp_path):
    from deeppose_cli.core.manifests import load_stage_recipe
    from deeppose_cli.core.config import TrainConfig
    from deeppose_cli.training.stages import train_stage

    _, index_dir = synthetic_dataset
    stage1, _ = train_stage(tiny_config("pytorch", index_dir, tmp_path / "s1", input_size=67,
                                        width=0.125, max_iterations=1), show_progress=False)
    config = TrainConfig.from_recipe({**load_stage_recipe(2), "displacement_source": "val"},
                                     stage=2, framework="pytorch", dataset="synthetic",
                                     train_index=str(index_dir / "train.jsonl"),
                                     out=str(tmp_path / "s2"), previous=str(stage1.path))
    with pytest.raises(DeepPoseError, match="needs a validation index"):
        train_stage(config, show_progress=False)


def test_refinement_errors_measure_distance_in_torso_diameters():
    from deeppose_cli.core.cascade import moved_closer, refinement_errors

    target = np.zeros((2, 3, 2))
    target[0, 1] = [0.2, 0.0]   # crop 0 refines joint 1, truth 0.2 box sides right
    target[1, 2] = [0.0, -0.1]  # crop 1 refines joint 2
    pred = np.zeros((2, 3, 2))
    pred[0, 1] = [0.15, 0.0]    # moved towards the truth
    pred[1, 2] = [0.0, 0.1]     # moved the wrong way
    errors = refinement_errors(pred, target, np.array([1, 2]), sigma=2.0)
    assert errors["err"] == pytest.approx((0.05 * 2 + 0.2 * 2) / 2)
    assert errors["err_none"] == pytest.approx((0.2 * 2 + 0.1 * 2) / 2)
    assert errors["closer"] == 0.5
    gt = np.zeros((3, 1, 2))
    previous = np.array([[[1.0, 0]], [[1.0, 0]], [[1.0, 0]]])
    refined = np.array([[[0.5, 0]], [[2.0, 0]], [[1.0, 0]]])
    closer, farther = moved_closer(previous, refined, gt, np.ones((3, 1)))
    assert closer[0] == pytest.approx(1 / 3) and farther[0] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- flip test


def test_flip_test_leaves_a_mirror_symmetric_regressor_alone_and_cancels_a_bias():
    from deeppose_cli.core.cascade import StageModel, flip_averaged
    from deeppose_cli.core.geometry import crop_pixels_to_normalized

    size = 21

    def dot_regressor(images):
        """Joint 0 (a 'left' joint) right of the brightest pixel, joint 1 left of it."""
        out = []
        for image in images:
            v, u = np.unravel_index(np.argmax(image[0]), image[0].shape)
            p = crop_pixels_to_normalized(np.array([u, v], dtype=float), size)
            out.append([p + [0.1, 0.0], p - [0.1, 0.0]])
        return np.array(out)

    images = np.zeros((3, 3, size, size), np.float32)
    for n, (u, v) in enumerate([(3, 4), (15, 10), (10, 17)]):
        images[n, 0, v, u] = 1.0
    stage = StageModel(1, "test", FunctionPredictor(dot_regressor, size, 2))
    np.testing.assert_allclose(flip_averaged(stage, [1, 0]).predictor(images).coords,
                               dot_regressor(images), atol=1e-12)
    biased = StageModel(1, "test", FunctionPredictor(
        lambda x: np.tile([[0.2, 0.1]], (len(x), 2, 1)), size, 2))
    np.testing.assert_allclose(flip_averaged(biased, [1, 0]).predictor(images).coords[..., 0], 0.0)
    np.testing.assert_allclose(flip_averaged(biased, [1, 0]).predictor(images).coords[..., 1], 0.1)


def test_flip_test_weights_each_view_by_its_inverse_laplace_variance():
    """With the scale layer, the mirrored and the plain opinion of a coordinate count in
    proportion to 1 / b^2, and the combined scale is the inverse-variance combination;
    without scales, or with --flip-weights equal, the flip test is the plain mean."""
    from deeppose_cli.core.cascade import StageModel, flip_averaged

    images = np.zeros((2, 3, 9, 9), np.float32)
    log_b = {"plain": np.log(1.0), "mirrored": np.log(2.0)}

    def mirrored_input(x):
        return bool(x[0, 0, 0, 0] == 0.0 and x[0, 0, 0, -1] == 1.0)

    def coords(x):
        return np.tile([[0.3, 0.1], [-0.1, 0.5]], (len(x), 1, 1)) * (1 + mirrored_input(x))

    def scales(x):
        return np.full((len(x), 2, 2), log_b["mirrored" if mirrored_input(x) else "plain"])

    images[:, :, :, 0] = 1.0  # mirroring moves the bright column to the right edge
    stage = StageModel(1, "test", FunctionPredictor(coords, 9, 2, scales=scales))
    got = flip_averaged(stage, [1, 0]).predictor(images)
    plain = coords(images)
    mirrored = coords(np.ascontiguousarray(images[..., ::-1]))[:, [1, 0], :] * [-1, 1]
    w_plain, w_mirrored = 1 / 1.0 ** 2, 1 / 2.0 ** 2
    np.testing.assert_allclose(got.coords, (w_plain * plain + w_mirrored * mirrored)
                               / (w_plain + w_mirrored), atol=1e-12)
    np.testing.assert_allclose(got.log_scales, 0.5 * np.log(1 / (w_plain + w_mirrored)))
    unweighted = flip_averaged(StageModel(1, "test", FunctionPredictor(coords, 9, 2)),
                               [1, 0]).predictor(images)
    np.testing.assert_allclose(unweighted.coords, (plain + mirrored) / 2, atol=1e-12)
    assert unweighted.log_scales is None
    equal = flip_averaged(stage, [1, 0], "equal").predictor(images)
    np.testing.assert_allclose(equal.coords, unweighted.coords, atol=1e-12)
    np.testing.assert_allclose(equal.log_scales, np.log(np.sqrt(1.0 + 4.0) / 2))  # mean of 2
    log_b["mirrored"] = log_b["plain"]
    np.testing.assert_allclose(flip_averaged(stage, [1, 0]).predictor(images).coords,
                               unweighted.coords, atol=1e-12)
    log_b.update(plain=-200.0, mirrored=200.0)  # extreme scales neither overflow nor give NaN
    extreme = flip_averaged(stage, [1, 0]).predictor(images)
    np.testing.assert_allclose(extreme.coords, plain, atol=1e-12)
    assert np.isfinite(extreme.log_scales).all()


def test_flip_test_defaults_to_the_stages_trained_on_mirrored_images():
    from deeppose_cli.core.cascade import StageModel, flip_averaged, with_flip_test

    biased = FunctionPredictor(lambda x: np.tile([[0.2, 0.1]], (len(x), 2, 1)), 9, 2)
    images = np.zeros((2, 3, 9, 9), np.float32)
    cascade = [StageModel(1, "test", biased), StageModel(2, "test", biased,
                                                         trained_on_mirrors=False)]
    chosen = {None: [1], True: [1, 2], False: []}
    for flip_test, flipped in chosen.items():
        stages = with_flip_test(cascade, [1, 0], flip_test)
        assert [s.stage for s in stages if s.flip_test] == flipped
        for stage, original in zip(stages, cascade):
            expected = (flip_averaged(original, [1, 0]) if stage.flip_test
                        else original).predictor(images).coords
            np.testing.assert_allclose(stage.predictor(images).coords, expected)
    assert with_flip_test(cascade, [1, 0])[0].predictor(images).coords[..., 0] \
        == pytest.approx(0.0)
    assert not any(s.flip_test for s in cascade)  # the stages given are left as they were


# ----------------------------------------------------------------------------- batch norm


def test_batch_norm_models_agree_across_frameworks_statistics_included():
    """Same weights and running statistics give the same predictions in both frameworks, and
    one training-mode forward pass updates the statistics identically."""
    import torch

    from deeppose_cli.engines import chainer_model as cm
    from deeppose_cli.engines import torch_model as tm
    from deeppose_cli.engines.chainer_compat import import_chainer
    from deeppose_cli.core.weights import parameter_names

    chainer = import_chainer()
    x = np.random.default_rng(0).normal(size=(6, 3, 67, 67)).astype(np.float32)
    torch_net = tm.AlexNetRegressor(14, 67, 0.25, batch_norm=True)
    chainer_net = cm.AlexNetRegressor(14, 67, 0.25, batch_norm=True)
    cm.load_numpy_params(chainer_net, tm.to_numpy_params(torch_net))
    torch_net.train()
    torch_net(torch.from_numpy(x))
    with chainer.using_config("train", True):
        chainer_net(x)
    after_torch, after_chainer = tm.to_numpy_params(torch_net), cm.to_numpy_params(chainer_net)
    assert list(after_torch) == list(parameter_names(True))
    for name in after_torch:
        np.testing.assert_allclose(after_torch[name], after_chainer[name], atol=1e-5)
    assert np.abs(after_torch["bn1/avg_mean"]).max() > 0  # the statistics really moved
    torch_net.eval()
    with chainer.using_config("train", False):
        np.testing.assert_allclose(chainer_net(x).array,
                                   torch_net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_batch_norm_run_converts_and_predicts_the_same(synthetic_dataset, tmp_path):
    from deeppose_cli.core.cascade import run_cascade_on_records
    from deeppose_cli.apps.convert import convert_run
    from deeppose_cli.training.runs import load_cascade
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    run, _ = train_stage1(tiny_config("chainer", index_dir, tmp_path / "c", input_size=67,
                                      width=0.125, batch_norm=True, max_iterations=4),
                          show_progress=False)
    assert run.meta()["batch_norm"] is True
    converted = convert_run(run.path, "pytorch", tmp_path / "t")
    records = read_index(index_dir / "val.jsonl")[:6]
    a = run_cascade_on_records(load_cascade(run.path)[0], records, (9, 2))[0]
    b = run_cascade_on_records(load_cascade(converted)[0], records, (9, 2))[0]
    np.testing.assert_allclose(a, b, atol=1e-3)  # pixels


def test_refinement_from_previous_inherits_its_network():
    from deeppose_cli.training.stages import inherit_architecture

    recipe = {"init": "previous", "input_size": 227, "width": 1.0, "batch_norm": True}
    previous = {"input_size": 131, "width": 0.25}  # a run from before batch norm existed
    assert inherit_architecture(recipe, previous, {}) == {
        "init": "previous", "input_size": 131, "width": 0.25, "batch_norm": False,
        "architecture": "alexnet"}
    assert inherit_architecture(recipe, previous, {"width": 0.5})["width"] == 1.0
    assert inherit_architecture({**recipe, "init": None}, previous, {}) == {
        **recipe, "init": None}


def test_empirical_displacements_draw_only_measured_vectors():
    from deeppose_cli.core.cascade import DisplacementStatistics, displacement_statistics

    gt = np.zeros((4, 2, 2))
    pred = gt + np.array([[[0.5, 0.0], [0.0, 0.1]], [[0.1, 0.0], [0.0, 0.2]],
                          [[3.0, 0.0], [0.0, 0.3]], [[0.2, 0.0], [9.0, 9.0]]])
    visible = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=bool)
    stats = displacement_statistics(pred, gt, visible, np.ones(4))
    again = DisplacementStatistics.from_json(json.loads(json.dumps(stats.to_json())))
    rng = np.random.default_rng(0)
    drawn = {tuple(again.draw(0, rng, "empirical")) for _ in range(200)}
    assert drawn == {(0.5, 0.0), (0.1, 0.0), (3.0, 0.0), (0.2, 0.0)}
    drawn = {tuple(again.draw(1, rng, "empirical")) for _ in range(200)}
    assert (9.0, 9.0) not in drawn and len(drawn) == 3  # invisible joints are not measured
    normal = np.array([again.draw(0, rng, "normal") for _ in range(500)])
    assert len({tuple(v) for v in normal}) == 500


def test_loader_workers_default_to_none_on_cpu_and_most_cores_on_a_gpu(synthetic_dataset,
                                                                       tmp_path, monkeypatch):
    from deeppose_cli.core import config as config_module
    from deeppose_cli.core.config import default_workers
    from deeppose_cli.training.stages import resolve_train_config

    assert default_workers("cpu", cpu_count=64) == 0
    assert [default_workers("cuda", cpu_count=n) for n in (1, 4, 5, 16, 64)] == [1, 1, 1, 12, 16]
    assert default_workers("cuda:1", cpu_count=8) == 4

    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 16)
    _, index_dir = synthetic_dataset

    for framework in ("chainer", "pytorch"):
        def resolved(**flags):
            return resolve_train_config(1, framework, out=str(tmp_path / framework),
                                        dataset="synthetic", index_dir_of=lambda name: index_dir,
                                        overrides=flags)

        assert resolved().workers == 0
        assert resolved(device="cuda").workers == 12  # no GPU needed: the recipe only
        assert resolved(device="cuda", workers=3).workers == 3
        assert resolved(workers=2).workers == 2
