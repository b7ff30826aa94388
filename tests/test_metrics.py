import math

import numpy as np
import pytest

from deeppose_cli.core.manifests import Limb, load_dataset_manifest
from deeppose_cli.core.metrics import mean_normalized_pose, pcp, pdj

LIMB = Limb("upper_arm", (0, 1), "upper_arms", "left")


def one_limb(pred_a, pred_b, visible=(1, 1)):
    gt = np.array([[[0.0, 0.0], [10.0, 0.0]]])
    pred = np.array([[pred_a, pred_b]], dtype=float)
    return pcp(pred, gt, np.array([visible]), [LIMB])


def test_pcp_limb_exactly_at_threshold_counts_as_correct():
    # limb length 10, threshold 0.5 -> endpoint errors of exactly 5 are still correct
    assert one_limb([0.0, 5.0], [15.0, 0.0])["upper_arms"] == 1.0
    assert one_limb([0.0, 5.0001], [15.0, 0.0])["upper_arms"] == 0.0


def test_pcp_is_strict_both_endpoints_must_be_close():
    assert one_limb([0.0, 0.0], [10.0, 6.0])["upper_arms"] == 0.0


def test_pcp_ignores_limbs_with_invisible_ground_truth():
    result = one_limb([0.0, 0.0], [10.0, 0.0], visible=(1, 0))
    assert math.isnan(result["upper_arms"]) and math.isnan(result["mean"])


def test_pcp_perfect_and_useless_on_lsp_limbs():
    limbs = load_dataset_manifest("lsp").limbs
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (6, 14, 2))
    vis = np.ones((6, 14))
    perfect = pcp(gt, gt, vis, limbs)
    assert set(perfect) == {"upper_arms", "lower_arms", "upper_legs", "lower_legs", "head",
                            "torso", "mean"}
    assert all(v == 1.0 for v in perfect.values())
    useless = pcp(gt + 1000.0, gt, vis, limbs)
    assert all(v == 0.0 for v in useless.values())


def test_pcp_mean_counts_every_limb():
    limbs = [Limb("a", (0, 1), "arms", "left"), Limb("b", (1, 2), "legs", "right")]
    gt = np.array([[[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]]] * 2)
    pred = gt.copy()
    pred[1, 2] = [100.0, 0.0]  # breaks limb b in image 1
    result = pcp(pred, gt, np.ones((2, 3)), limbs)
    assert result == {"arms": 1.0, "legs": 0.5, "mean": 0.75}


def make_pdj_case():
    # torso pair (0, 1): diameter 10
    gt = np.zeros((1, 4, 2))
    gt[0, 1] = [10.0, 0.0]
    gt[0, 2] = [50.0, 50.0]
    gt[0, 3] = [80.0, 80.0]
    pred = gt.copy()
    pred[0, 2] += [2.0, 0.0]   # error 0.2 diameters
    pred[0, 3] += [0.0, 4.0]   # error 0.4 diameters
    return pred, gt


def test_pdj_hand_computed():
    pred, gt = make_pdj_case()
    result = pdj(pred, gt, np.ones((1, 4)), (0, 1))
    mean, per_joint = result.at(0.2)
    np.testing.assert_allclose(per_joint, [1, 1, 1, 0])  # 0.2 exactly counts
    assert mean == 0.75
    assert result.at(0.5)[0] == 1.0
    assert result.at(0.0)[0] == 0.5
    # curve: 0.5 for alpha<0.2, 0.75 for 0.2<=alpha<0.4, 1.0 from 0.4: area/0.5 ~ 0.7
    assert result.auc == pytest.approx((0.2 * 0.5 + 0.2 * 0.75 + 0.1 * 1.0) / 0.5, abs=0.02)


def test_pdj_invisible_joint_does_not_count():
    pred, gt = make_pdj_case()
    vis = np.array([[1, 1, 1, 0]])
    result = pdj(pred, gt, vis, (0, 1))
    assert result.at(0.2)[0] == 1.0
    assert result.counts.tolist() == [1, 1, 1, 0]
    assert math.isnan(result.at(0.2)[1][3])


def test_pdj_skips_images_without_visible_torso():
    pred, gt = make_pdj_case()
    result = pdj(pred, gt, np.array([[0, 1, 1, 1]]), (0, 1))
    assert result.counts.sum() == 0


def test_pdj_perfect_and_useless():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0, 100, (10, 14, 2))
    vis = np.ones((10, 14))
    assert pdj(gt, gt, vis, (9, 2)).auc == 1.0
    assert pdj(gt + 1e4, gt, vis, (9, 2)).auc == 0.0


def test_mean_pose_uses_visible_joints_only():
    poses = np.array([[[0.0, 0.0]], [[1.0, 1.0]], [[100.0, 100.0]]])
    vis = np.array([[1], [1], [0]])
    np.testing.assert_allclose(mean_normalized_pose(poses, vis), [[0.5, 0.5]])
