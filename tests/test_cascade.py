"""The framework-free cascade logic: refinement boxes, displacements, simulated samples."""

import numpy as np
import pytest

from deeppose_cli.core.records import PoseRecord
from deeppose_cli.core.cascade import (DisplacementStatistics, StageModel,
                                       displacement_statistics, record_diameters, refine,
                                       run_cascade)
from deeppose_cli.data.refinement import RefinementDataset
from deeppose_cli.core.geometry import denormalize_pose, person_box
from deeppose_cli.core.manifests import load_dataset_manifest
from conftest import FunctionPredictor, random_pose

MANIFEST = load_dataset_manifest("lsp")
TORSO = MANIFEST.torso_diameter


def constant_regressor(value):
    def regress(crops):
        return np.broadcast_to(np.asarray(value, dtype=float), (len(crops), 14, 2)).copy()
    return regress


def test_zero_displacement_at_the_box_centre_maps_back_to_itself():
    rng = np.random.default_rng(0)
    previous = random_pose(rng, 200)[None]
    image = np.zeros((200, 200, 3), dtype=np.uint8)
    stage = StageModel(2, "test", FunctionPredictor(constant_regressor(0.0)), sigma=2.0)
    box = person_box(previous[0], np.ones(14))[None]
    refined = refine(stage, [image], previous, box, TORSO).coords
    np.testing.assert_allclose(refined, previous, atol=1e-9)


def test_refinement_output_is_a_displacement_scaled_by_the_box():
    rng = np.random.default_rng(1)
    previous = random_pose(rng, 200)[None]
    diameter = np.linalg.norm(previous[0, 9] - previous[0, 2])
    stage = StageModel(2, "test", FunctionPredictor(constant_regressor([0.1, -0.05])), sigma=1.5)
    refined = refine(stage, [np.zeros((200, 200, 3), np.uint8)], previous,
                     person_box(previous[0], np.ones(14))[None], TORSO).coords
    np.testing.assert_allclose(refined - previous,
                               np.broadcast_to([0.1 * 1.5 * diameter, -0.05 * 1.5 * diameter],
                                               previous.shape), atol=1e-9)


def test_cascade_runs_stage_one_then_refinements():
    images = [np.zeros((120, 120, 3), np.uint8)] * 3
    boxes = np.array([[60.0, 60.0, 100.0, 100.0]] * 3)
    stages = [StageModel(1, "test", FunctionPredictor(constant_regressor(0.1))),
              StageModel(2, "test", FunctionPredictor(constant_regressor(0.0)), sigma=2.0)]
    per_stage = run_cascade(stages, images, boxes, TORSO, batch_size=2)
    assert len(per_stage) == 2
    np.testing.assert_allclose(per_stage[0], np.full((3, 14, 2), 70.0))
    # stage 1 put every joint on one spot: the torso diameter is 0, clamped to 5 % of the box
    np.testing.assert_allclose(per_stage[1], per_stage[0])


def make_record(tmp_path, rng, name="r"):
    import cv2

    joints = random_pose(rng, 160).round()
    image = np.zeros((160, 160, 3), dtype=np.uint8)
    for x, y in joints.astype(int):
        cv2.circle(image, (int(x), int(y)), 1, (255, 255, 255), -1)
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), image)
    visible = np.ones(14, dtype=bool)
    return PoseRecord(name, path, joints, visible, person_box(joints, visible))


def test_known_displacement_is_recovered_through_crop_normalize_inverse(tmp_path):
    rng = np.random.default_rng(3)
    record = make_record(tmp_path, rng)
    d = np.tile([[0.12, -0.07]], (14, 1))
    stats = DisplacementStatistics(d, np.zeros((14, 2, 2)), np.full(14, 100))
    ds = RefinementDataset([record], stats, sigma=2.0, input_size=101,
                           flip_permutation=MANIFEST.flip_permutation, torso_pair=TORSO)
    diameter = np.linalg.norm(record.joints[9] - record.joints[2])
    for k in range(len(ds)):
        r, j = ds.items[k]
        box = ds.box(k, epoch=0)
        np.testing.assert_allclose(box[:2], record.joints[j] + d[j] * diameter, atol=1e-6)
        np.testing.assert_allclose(box[2:], [2.0 * diameter] * 2)
        image, target, mask = ds[k]
        assert mask.sum() == 1 and mask[j] == 1
        # the target is the true joint in the box's coordinates: -d / sigma
        np.testing.assert_allclose(target[j], -d[j] / 2.0, atol=1e-6)
        np.testing.assert_allclose(denormalize_pose(target[None, j:j + 1], box)[0, 0],
                                   record.joints[j], atol=1e-4)
        # and the crop shows the joint's dot there
        bright = image[0] * 0.229 + 0.485
        u, v = np.round(target[j] * 101 + 50).astype(int)
        assert bright[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2].max() > 0.3


def test_displacement_statistics_of_a_constructed_example():
    rng = np.random.default_rng(4)
    n = 4000
    gt = rng.uniform(0, 100, (n, 3, 2))
    diameter = rng.uniform(10, 30, n)
    true_mean = np.array([[0.1, 0.0], [0.0, -0.2], [0.05, 0.05]])
    true_cov = np.array([[[0.01, 0.004], [0.004, 0.02]], [[0.03, 0.0], [0.0, 0.01]],
                         [[0.02, -0.01], [-0.01, 0.02]]])
    d = np.stack([rng.multivariate_normal(true_mean[j], true_cov[j], n) for j in range(3)], 1)
    pred = gt + d * diameter[:, None, None]
    visible = np.ones((n, 3), dtype=bool)
    visible[::2, 2] = False
    pred[::2, 2] = 1e6  # invisible joints must not enter the statistics
    stats = displacement_statistics(pred, gt, visible, diameter)
    assert stats.count.tolist() == [n, n, n // 2]
    np.testing.assert_allclose(stats.mean, true_mean, atol=0.012)
    np.testing.assert_allclose(stats.cov, true_cov, atol=0.003)
    round_trip = DisplacementStatistics.from_json(stats.to_json())
    np.testing.assert_allclose(round_trip.cov, stats.cov)


def test_simulated_boxes_follow_the_statistics(tmp_path):
    rng = np.random.default_rng(5)
    record = make_record(tmp_path, rng)
    mean = np.tile([[0.05, -0.1]], (14, 1))
    cov = np.tile([[[0.01, 0.003], [0.003, 0.02]]], (14, 1, 1))
    ds = RefinementDataset([record], DisplacementStatistics(mean, cov, np.ones(14)), 2.0, 67,
                           MANIFEST.flip_permutation, TORSO, samples_per_image=1)
    diameter = record_diameters([record], TORSO)[0]
    draws = []
    for epoch in range(300):
        for k in range(len(ds)):
            _, j = ds.items[k]
            draws.append((ds.box(k, epoch)[:2] - record.joints[j]) / diameter)
    draws = np.array(draws)
    assert len(draws) == 300 * 14
    np.testing.assert_allclose(draws.mean(0), mean[0], atol=0.01)
    np.testing.assert_allclose(np.cov(draws, rowvar=False), cov[0], atol=0.002)
    # fresh draws every epoch, identical for the same (seed, epoch)
    assert not np.allclose(ds.box(0, 0), ds.box(0, 1))
    np.testing.assert_array_equal(ds.box(3, 7), ds.box(3, 7))


def test_refinement_jitter_off_epochs_keep_the_simulated_displacement(tmp_path):
    """``jitter_off_epoch`` drops only the augmentation's jitter: the box still comes from the
    displacement draw, and the centred copy used for reporting has no schedule."""
    from deeppose_cli.data.pipeline import Augmentation

    rng = np.random.default_rng(8)
    record = make_record(tmp_path, rng)
    stats = DisplacementStatistics(np.zeros((14, 2)), np.tile(np.eye(2) * 0.01, (14, 1, 1)),
                                   np.ones(14))
    aug = Augmentation(0.1, 0.2, True, 0.2, rotation=20.0)
    common = dict(stats=stats, sigma=1.0, input_size=67,
                  flip_permutation=MANIFEST.flip_permutation, torso_pair=TORSO, seed=2)
    scheduled = RefinementDataset([record], aug=aug, **common)
    scheduled.jitter_off_epoch = 3
    jittered = RefinementDataset([record], aug=aug, **common)
    plain = RefinementDataset([record], aug=aug.without_jitter(), **common)
    for k in range(len(scheduled)):
        for epoch, expected in ((2, jittered), (3, plain)):
            for x, y in zip(scheduled.get(k, epoch), expected.get(k, epoch)):
                np.testing.assert_array_equal(x, y)
    assert not np.allclose(scheduled.get(0, 3)[1], jittered.get(0, 3)[1])
    assert scheduled.centred().jitter_off_epoch is None


def test_invisible_joints_are_not_simulated(tmp_path):
    rng = np.random.default_rng(6)
    record = make_record(tmp_path, rng)
    record.visible[[0, 5]] = False
    stats = DisplacementStatistics(np.zeros((14, 2)), np.tile(np.eye(2) * 1e-3, (14, 1, 1)),
                                   np.ones(14))
    ds = RefinementDataset([record], stats, 2.0, 67, MANIFEST.flip_permutation, TORSO,
                           samples_per_image=3)
    assert len(ds) == 36 and {j for _, j in ds.items} == set(range(1, 5)) | set(range(6, 14))


def test_diameter_falls_back_to_box_ratio_when_torso_is_hidden(tmp_path):
    rng = np.random.default_rng(7)
    a, b = make_record(tmp_path, rng, "a"), make_record(tmp_path, rng, "b")
    b.visible[9] = False
    diam = record_diameters([a, b], TORSO)
    ratio = np.linalg.norm(a.joints[9] - a.joints[2]) / a.box[2]
    assert diam[1] == pytest.approx(ratio * b.box[2])


def test_refinement_batched_over_images_matches_one_image_at_a_time():
    """All crops of all images of a chunk in one forward pass give what one image at a time
    gave; a regressor that reads its crop makes every crop's output differ."""
    from deeppose_cli.core.cascade import refine

    def reading_regressor(crops: np.ndarray) -> np.ndarray:
        means = crops.reshape(len(crops), 3, -1).mean(axis=2)  # (B, 3), differs per crop
        offsets = np.stack([means[:, 0] - means[:, 1], means[:, 2] - means[:, 0]], axis=1)
        return np.repeat(0.3 * np.tanh(offsets)[:, None, :], 14, axis=1)  # (B, 14, 2)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90 + 7 * n, 80, 3), dtype=np.uint8) for n in range(5)]
    boxes = np.array([[40.0, 45.0 + n, 70.0, 70.0] for n in range(5)])
    previous = np.stack([rng.uniform(10, 70, (14, 2)) for _ in range(5)])
    stage = StageModel(2, "test", FunctionPredictor(reading_regressor), sigma=1.5)
    batched = refine(stage, images, previous, boxes, TORSO, batch_size=9).coords
    one_by_one = np.concatenate([refine(stage, images[n:n + 1], previous[n:n + 1],
                                        boxes[n:n + 1], TORSO).coords for n in range(5)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)
    assert np.abs(batched - previous).max() > 0.5  # the regressor did move the joints
