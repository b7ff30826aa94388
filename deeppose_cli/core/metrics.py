"""PCP and PDJ, the two metrics of the DeepPose paper, and PCKh and PCK, on NumPy arrays.

Poses are arrays of shape (N, J, 2) in image pixels; ``visible`` is (N, J). Only joints whose
ground truth is visible (labelled) count: invisible joints in LSPET carry junk coordinates.

PDJ, PCKh and PCK are one measure with different yardsticks: a joint is detected when its
error is at most alpha x a length of its person: the torso diameter (PDJ, DeepPose), the head
size (PCKh, MPII: 0.6 x the head box diagonal, else the head segment's length) or the longer
side of the person box (PCK). Each is a :class:`RateCurve` over alpha.
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
class RateCurve:
    """Detection rate per joint over alphas (PDJ, PCKh, PCK)."""

    alphas: np.ndarray          # (A,)
    hits: np.ndarray            # (A, J): counted joints detected at each alpha
    counts: np.ndarray          # (J,): joints counted
    #: Joints the mean pools (None: every joint); MPII's PCKh mean leaves out two.
    mean_joints: tuple[int, ...] | None = None

    @property
    def per_joint(self) -> np.ndarray:
        """(A, J) fraction of each joint's counted instances detected; NaN where none counted."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / self.counts[None, :]

    @property
    def mean(self) -> np.ndarray:
        """(A,) over every counted joint (of ``mean_joints``); NaN when none is counted."""
        joints = list(range(len(self.counts))) if self.mean_joints is None \
            else list(self.mean_joints)
        total = int(self.counts[joints].sum())
        if total == 0:
            return np.full(len(self.alphas), np.nan)
        return self.hits[:, joints].sum(axis=1) / total

    def at(self, alpha: float) -> tuple[float, np.ndarray]:
        """(mean, per-joint) rate at the alpha on the grid closest to ``alpha``."""
        k = int(np.argmin(np.abs(self.alphas - alpha)))
        return float(self.mean[k]), self.per_joint[k]

    @property
    def auc(self) -> float:
        """Area under the mean curve divided by the alpha range: 1.0 is perfect."""
        span = float(self.alphas[-1] - self.alphas[0])
        return float(np.trapezoid(self.mean, self.alphas) / span)

    def group(self, joints: Sequence[int]) -> "RateCurve":
        """The curve of a joint group (FLIC's elbows or wrists): its joints pooled."""
        joints = list(joints)
        return RateCurve(self.alphas, self.hits[:, joints], self.counts[joints])


#: The PDJ curve (an alias kept for callers that name it so).
PDJResult = RateCurve


def detection_rates(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray,
                    normalizer: np.ndarray, alphas: np.ndarray = PDJ_ALPHAS,
                    mean_joints: Sequence[int] | None = None) -> RateCurve:
    """A joint is detected at alpha when its error is at most alpha x ``normalizer`` of its
    person (N,); people whose normalizer is NaN or not positive are left out."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    normalizer = np.asarray(normalizer, dtype=np.float64)
    known = np.isfinite(normalizer) & (normalizer > 0)
    counted = visible & known[:, None]
    ratio = np.linalg.norm(pred - gt, axis=-1) / np.where(known, normalizer, 1.0)[:, None]
    detected = ratio[None, :, :] <= np.asarray(alphas)[:, None, None]  # (A, N, J)
    return RateCurve(alphas=np.asarray(alphas, dtype=np.float64),
                     hits=(detected & counted[None]).sum(axis=1), counts=counted.sum(axis=0),
                     mean_joints=None if mean_joints is None else tuple(mean_joints))


def segment_lengths(gt: np.ndarray, visible: np.ndarray, pair: Sequence[int]) -> np.ndarray:
    """(N,) ground-truth distance between joints ``pair``; NaN where either is not visible."""
    gt, visible = np.asarray(gt, dtype=np.float64), np.asarray(visible, dtype=bool)
    a, b = pair
    length = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
    return np.where(visible[:, a] & visible[:, b], length, np.nan)


def pdj(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray,
        torso_pair: Sequence[int], alphas: np.ndarray = PDJ_ALPHAS) -> RateCurve:
    """Percentage of Detected Joints: a joint is detected when its error is at most
    alpha x torso diameter (distance between ``torso_pair`` joints of the ground truth).

    Images whose torso joints are not both visible are left out: their diameter is unknown.
    """
    return detection_rates(pred, gt, visible, segment_lengths(gt, visible, torso_pair), alphas)


def pckh(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_sizes: np.ndarray,
         alphas: np.ndarray = PDJ_ALPHAS, excluded: Sequence[int] = ()) -> RateCurve:
    """PCKh: a joint is correct when its error is at most alpha x its person's head size
    (N,; NaN: unknown, left out). ``excluded`` joints are reported but not pooled in the
    mean (MPII's evaluation leaves out pelvis and thorax)."""
    joints = [j for j in range(np.asarray(gt).shape[1]) if j not in set(excluded)]
    return detection_rates(pred, gt, visible, head_sizes, alphas,
                           mean_joints=joints if excluded else None)


def head_sizes(gt: np.ndarray, visible: np.ndarray, given: Sequence[float | None],
               head_segment: Sequence[int] | None) -> np.ndarray:
    """(N,) PCKh head size: the person's own (``given``, e.g. MPII's head box), else the
    length of the skeleton's ``head_segment`` in the ground truth; NaN where neither is known."""
    from_segment = (segment_lengths(gt, visible, head_segment) if head_segment is not None
                    else np.full(len(given), np.nan))
    return np.array([float(g) if g is not None else s for g, s in zip(given, from_segment)],
                    dtype=np.float64)


def pck_box(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, boxes: np.ndarray,
            alphas: np.ndarray = PDJ_ALPHAS) -> RateCurve:
    """PCK of the box: a joint is correct when its error is at most alpha x the longer side
    of its person box (``boxes`` (N, 4) as cx, cy, w, h)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return detection_rates(pred, gt, visible, boxes[:, 2:4].max(axis=1), alphas)


def mean_normalized_pose(normalized: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Mean of normalized training poses over visible joints: the mean-pose baseline (J, 2).

    Predicting this for every image is the floor any trained model must beat.
    """
    normalized = np.asarray(normalized, dtype=np.float64)
    mask = np.asarray(visible, dtype=np.float64)[..., None]
    total = mask.sum(axis=0)
    return np.where(total > 0, (normalized * mask).sum(axis=0) / np.maximum(total, 1), 0.0)
