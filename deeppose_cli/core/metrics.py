"""PCP and PDJ, the two metrics of the DeepPose paper, on NumPy arrays.

Poses are arrays of shape (N, J, 2) in image pixels; ``visible`` is (N, J). Only joints whose
ground truth is visible count: invisible joints in LSPET carry junk coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .manifests import Limb

PDJ_ALPHAS = np.linspace(0.0, 0.5, 51)


def pcp(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, limbs: Sequence[Limb],
        threshold: float = 0.5) -> dict[str, float]:
    """Strict PCP: a limb is correct when BOTH predicted endpoints lie within
    ``threshold`` x (ground-truth limb length) of their true positions (inclusive).

    Returns the fraction per limb category plus ``"mean"`` over every counted limb; a limb
    counts only where both of its ground-truth endpoints are visible. Categories with no
    counted limb are NaN.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    correct: dict[str, list[np.ndarray]] = {}
    for limb in limbs:
        a, b = limb.joints
        length = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
        err_a = np.linalg.norm(pred[:, a] - gt[:, a], axis=-1)
        err_b = np.linalg.norm(pred[:, b] - gt[:, b], axis=-1)
        ok = (err_a <= threshold * length) & (err_b <= threshold * length)
        counted = visible[:, a] & visible[:, b]
        correct.setdefault(limb.category, []).append(ok[counted])
    result = {}
    for category, parts in correct.items():
        hits = np.concatenate(parts)
        result[category] = float(hits.mean()) if hits.size else float("nan")
    every = np.concatenate([np.concatenate(p) for p in correct.values()]) if correct else np.array([])
    result["mean"] = float(every.mean()) if every.size else float("nan")
    return result


@dataclass
class PDJResult:
    """PDJ per joint over alphas, normalized by the ground-truth torso diameter."""

    alphas: np.ndarray          # (A,)
    per_joint: np.ndarray       # (A, J): fraction of counted joints detected at each alpha
    mean: np.ndarray            # (A,): over all counted joints
    counts: np.ndarray          # (J,): joints counted

    def at(self, alpha: float) -> tuple[float, np.ndarray]:
        """(mean, per-joint) PDJ at the alpha on the grid closest to ``alpha``."""
        k = int(np.argmin(np.abs(self.alphas - alpha)))
        return float(self.mean[k]), self.per_joint[k]

    @property
    def auc(self) -> float:
        """Area under the mean PDJ curve divided by the alpha range: 1.0 is perfect."""
        span = float(self.alphas[-1] - self.alphas[0])
        return float(np.trapezoid(self.mean, self.alphas) / span)


def pdj(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray,
        torso_pair: Sequence[int], alphas: np.ndarray = PDJ_ALPHAS) -> PDJResult:
    """Percentage of Detected Joints: a joint is detected when its error is at most
    alpha x torso diameter (distance between ``torso_pair`` joints of the ground truth).

    Images whose torso joints are not both visible are left out: their diameter is unknown.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    a, b = torso_pair
    diameter = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
    counted = visible & (visible[:, [a]] & visible[:, [b]]) & (diameter[:, None] > 0)
    ratio = np.linalg.norm(pred - gt, axis=-1) / np.where(diameter > 0, diameter, 1.0)[:, None]
    detected = ratio[None, :, :] <= np.asarray(alphas)[:, None, None]  # (A, N, J)
    counts = counted.sum(axis=0)
    hits = (detected & counted[None]).sum(axis=1)  # (A, J)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = hits / counts[None, :]
        mean = hits.sum(axis=1) / max(int(counts.sum()), 1)
    return PDJResult(alphas=np.asarray(alphas, dtype=np.float64), per_joint=per_joint,
                     mean=mean, counts=counts)


def mean_normalized_pose(normalized: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Mean of normalized training poses over visible joints: the mean-pose baseline (J, 2).

    Predicting this for every image is the floor any trained model must beat.
    """
    normalized = np.asarray(normalized, dtype=np.float64)
    mask = np.asarray(visible, dtype=np.float64)[..., None]
    total = mask.sum(axis=0)
    return np.where(total > 0, (normalized * mask).sum(axis=0) / np.maximum(total, 1), 0.0)
