"""The DeepPose cascade (Sec. 3.2), framework-free: refinement boxes, displacement
statistics, the test-time flip, and running stages 1..S on images.

A stage s >= 2 looks at a square box of side ``sigma * diam(y^(s-1))`` centred on each joint's
previous prediction (diam: distance between opposing torso joints) and regresses the joint in
that box's normalized coordinates. Its training samples are simulated: boxes are centred at
``truth + d * diam`` with ``d`` drawn from the per-joint distribution of the previous stages'
displacements measured on the training set (``data.refinement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import DeepPoseError
from .geometry import denormalize_pose, joint_boxes, torso_diameter
from .images import read_rgb, to_network_input
from .predictor import Prediction, Predictor


@dataclass
class StageModel:
    """One trained stage, as inference needs it."""

    stage: int
    framework: str
    predictor: Predictor
    sigma: float | None = None
    trained_on_mirrors: bool = True  # its recipe's `flip`: it saw mirrored images in training
    flip_test: bool = False          # predictions average each crop with its mirror image
    flip_weights: str = "scales"     # how that average weighs the two views (FLIP_WEIGHTS)

    @property
    def input_size(self) -> int:
        return self.predictor.input_size


FLIP_WEIGHTS = ("scales", "equal")  # how the flip test weights its two opinions


def average_mirrored(coords: Any, log_scales: Any, mirrored_coords: Any, mirrored_log_scales: Any,
                     flip_permutation: Sequence[int], weighted: bool, xp: Any = np
                     ) -> tuple[Any, Any]:
    """The flip test's combination of a crop's prediction (``coords``, ``log_scales``:
    (..., J, 2), log scales or None) with its mirror image's, as (coords, log scales).

    The mirrored prediction is mapped back (joint ``i`` from ``flip_permutation[i]``, x
    negated). With ``weighted`` and scales, each coordinate's two opinions count by their
    inverse variances (1 / b^2 for a Laplace scale b), and the combined scale is theirs;
    otherwise the plain mean, whose scale is the spread of a mean of two.

    ``xp`` is the array module: NumPy here, ``torch`` where an exported graph carries the
    flip test (``engines.export_graph``), so both compute the one formula."""
    perm = list(flip_permutation)

    def mirror_back(values: Any, negate_x: bool) -> Any:
        values = values[..., perm, :]
        return xp.stack((-values[..., 0], values[..., 1]), -1) if negate_x else values

    back = mirror_back(mirrored_coords, True)
    if log_scales is None or mirrored_log_scales is None:
        return (coords + back) / 2.0, None
    log_b1, log_b2 = log_scales, mirror_back(mirrored_log_scales, False)
    if weighted:
        # weight of the plain view: b2^2 / (b1^2 + b2^2) = 1 / (1 + exp(d)), d clipped so
        # that neither exp overflows, and log(weight) = -log(1 + exp(d)) stays finite
        difference = xp.clip(2.0 * (log_b1 - log_b2), -60.0, 60.0)
        growth = xp.exp(difference)
        weight = 1.0 / (1.0 + growth)
        # combined variance 1 / (1/v1 + 1/v2): log b = log b1 + 0.5 log(weight)
        return (weight * coords + (1.0 - weight) * back,
                log_b1 - 0.5 * xp.log1p(growth))
    # a plain mean of two: variance (v1 + v2) / 4
    return ((coords + back) / 2.0,
            0.5 * xp.logaddexp(2.0 * log_b1, 2.0 * log_b2) - float(np.log(2.0)))


class FlipAveraged:
    """A predictor that predicts each crop twice, as it is and mirrored (its joints mirrored
    back and their left/right labels swapped), and averages: test-time flipping, which the
    flip augmentation makes the network's second, nearly independent opinion.

    With ``weighted`` and a network with the ``laplace`` scale layer, each coordinate's two
    opinions are weighted by their inverse variances (1 / b^2 for a predicted Laplace scale
    b), so the view the network is surer of counts more (docs/recipes.md#test-time-flip);
    otherwise the plain mean. The combined scale follows the same rule: the inverse-variance
    combination, or the spread of a plain mean of two."""

    def __init__(self, inner: Predictor, flip_permutation: Sequence[int], weighted: bool):
        self.inner = inner
        self.perm = list(flip_permutation)
        self.weighted = weighted and inner.has_scales
        self.num_joints, self.input_size = inner.num_joints, inner.input_size
        self.has_scales, self.cuts_crops = inner.has_scales, inner.cuts_crops

    def average(self, plain: Prediction, mirrored: Prediction) -> Prediction:
        return Prediction(*average_mirrored(plain.coords, plain.log_scales, mirrored.coords,
                                            mirrored.log_scales, self.perm, self.weighted))

    def __call__(self, images: np.ndarray) -> Prediction:
        return self.average(self.inner(images),
                            self.inner(np.ascontiguousarray(images[..., ::-1])))

    def crops(self, images: Sequence[np.ndarray], boxes: np.ndarray,
              flip: bool = False) -> Prediction:
        return self.average(self.inner.crops(images, boxes, flip),
                            self.inner.crops(images, boxes, not flip))


def flip_averaged(stage: StageModel, flip_permutation: Sequence[int],
                  weights: str = "scales") -> StageModel:
    """The same stage with the test-time flip (:class:`FlipAveraged`); ``weights`` is
    ``scales`` (inverse-variance weights where the network predicts scales) or ``equal``."""
    if weights not in FLIP_WEIGHTS:
        raise DeepPoseError(f"flip weights must be one of {', '.join(FLIP_WEIGHTS)}, "
                            f"got {weights!r}")
    return StageModel(stage.stage, stage.framework,
                      FlipAveraged(stage.predictor, flip_permutation, weights == "scales"),
                      stage.sigma, stage.trained_on_mirrors, flip_test=True, flip_weights=weights)


def with_flip_test(cascade: Sequence[StageModel], flip_permutation: Sequence[int],
                   flip_test: bool | None = None, weights: str = "scales") -> list[StageModel]:
    """The cascade with test-time flipping on every stage (``True``), none (``False``), or by
    default (``None``) on each stage whose recipe trained it on mirrored images.

    On by default because it was measured to help on LSPET at every depth
    (docs/results.md#lspet-on-cpu: +0.5 to +1.6 points of PDJ@0.2), as pose toolkits such as
    MMPose do; a stage that never saw a mirrored person is not asked to judge one unless the
    caller says so. ``weights``: as :func:`flip_averaged`.

    A stage that already averages (an exported graph that carries the flip test) stays as it
    is; asking it not to flip, or to weigh the views otherwise, is a one-line error, since
    its graph cannot be undone.
    """
    if weights not in FLIP_WEIGHTS:
        raise DeepPoseError(f"flip weights must be one of {', '.join(FLIP_WEIGHTS)}, "
                            f"got {weights!r}")
    chosen = []
    for stage in cascade:
        if stage.flip_test:
            _check_built_in_flip(stage, flip_test, weights)
            chosen.append(stage)
        elif stage.trained_on_mirrors if flip_test is None else flip_test:
            chosen.append(flip_averaged(stage, flip_permutation, weights))
        else:
            chosen.append(stage)
    return chosen


def _check_built_in_flip(stage: StageModel, flip_test: bool | None, weights: str) -> None:
    if flip_test is False:
        raise DeepPoseError(f"stage {stage.stage} averages each crop with its mirror image "
                            "inside its exported graph: export the run again with "
                            "--no-flip-test to predict without the flip test")
    if stage.predictor.has_scales and weights != stage.flip_weights:
        raise DeepPoseError(f"stage {stage.stage}'s exported graph weighs the flip test's two "
                            f"views with --flip-weights {stage.flip_weights}: use that, or "
                            "export the run with --no-flip-test and choose here")


def host_network_inputs(images: Sequence[np.ndarray], boxes: np.ndarray, size: int,
                        flip: bool = False) -> list[np.ndarray]:
    """The (3, size, size) network inputs of the K boxes (N, K, 4) of each of the RGB
    images, image by image, cut with OpenCV on the host (:func:`geometry.crop_and_resize`)."""
    from .geometry import crop_and_resize

    return [to_network_input(crop_and_resize(image, box, size, flip))
            for image, image_boxes in zip(images, np.asarray(boxes, dtype=np.float64))
            for box in image_boxes]


def regress_boxes(stage: StageModel, images: Sequence[np.ndarray], boxes: np.ndarray,
                  batch_size: int = 256) -> Prediction:
    """The (N, K, J, 2) prediction of the K boxes of each image (boxes (N, K, 4)).

    A predictor that cuts crops on its device (a network on a GPU) gets the images; otherwise
    the crops are cut here with OpenCV and sent ``batch_size`` at a time."""
    boxes = np.asarray(boxes, dtype=np.float64)
    n_images, n_boxes = boxes.shape[:2]
    predictor = stage.predictor
    if predictor.cuts_crops:
        return predictor.crops(images, boxes, False)
    crops = host_network_inputs(images, boxes, stage.input_size)
    parts = [predictor(np.stack(crops[s:s + batch_size]))
             for s in range(0, len(crops), batch_size)]
    return Prediction.concatenate(parts, predictor.num_joints).reshape(n_images, n_boxes)


def safe_diameter(joints: np.ndarray, torso_pair: Sequence[int], box: np.ndarray) -> np.ndarray:
    """Torso diameter of each pose, kept within [0.05, 2] x the person box side.

    A degenerate prediction (shoulder on hip) would otherwise give a zero-size box.
    """
    side = np.maximum(np.asarray(box)[..., 2], np.asarray(box)[..., 3])
    return np.clip(torso_diameter(joints, torso_pair), 0.05 * side, 2.0 * side)


def _to_pixels(prediction: Prediction, boxes: np.ndarray) -> Prediction:
    """A (..., J, 2) prediction in the normalized coordinates of ``boxes`` (..., 4) mapped to
    image pixels; log scales gain the log of the box size."""
    coords = denormalize_pose(prediction.coords, boxes)
    if prediction.log_scales is None:
        return Prediction(coords)
    return Prediction(coords, prediction.log_scales + np.log(np.asarray(boxes)[..., None, 2:4]))


def refine(stage: StageModel, images: Sequence[np.ndarray], previous: np.ndarray,
           person_boxes: np.ndarray, torso_pair: Sequence[int],
           batch_size: int = 256) -> Prediction:
    """One refinement stage on a chunk of images: the crops of every joint of every image go
    through the network together (``batch_size`` crops per forward pass); joint i takes the
    output i of its own crop, mapped back through that crop's box."""
    n_images, num_joints = previous.shape[:2]
    boxes = np.stack([joint_boxes(previous[n], safe_diameter(previous[n], torso_pair,
                                                             person_boxes[n]), stage.sigma)
                      for n in range(n_images)])  # (N, J, 4)
    outputs = regress_boxes(stage, images, boxes, batch_size)  # image, crop, joint
    joints = np.arange(num_joints)
    own = Prediction(outputs.coords[:, joints, joints][:, :, None, :],
                     None if outputs.log_scales is None
                     else outputs.log_scales[:, joints, joints][:, :, None, :])
    return _first_of_axis2(_to_pixels(own, boxes))  # each joint through its own box


def _first_of_axis2(prediction: Prediction) -> Prediction:
    """(N, K, 1, 2) -> (N, K, 2)"""
    return Prediction(prediction.coords[:, :, 0],
                      None if prediction.log_scales is None else prediction.log_scales[:, :, 0])


def cascade_predictions(stages: Sequence[StageModel], images: Sequence[np.ndarray],
                        person_boxes: np.ndarray, torso_pair: Sequence[int],
                        batch_size: int = 32) -> list[Prediction]:
    """Predictions (N, J, 2) in image pixels after each stage, [stage 1, 1-2, 1-2-3, ...],
    with log scales in pixels for the stages that predict them."""
    first = stages[0]
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        boxes = np.asarray(person_boxes[start:start + batch_size], dtype=np.float64)
        own = regress_boxes(first, chunk, boxes[:, None, :], batch_size)  # (N, 1, J, 2)
        pixels = _to_pixels(own, boxes[:, None, :])
        outputs.append(Prediction(pixels.coords[:, 0], None if pixels.log_scales is None
                                  else pixels.log_scales[:, 0]))
    per_stage = [Prediction.concatenate(outputs, first.predictor.num_joints)]
    for stage in stages[1:]:
        per_stage.append(refine(stage, images, per_stage[-1].coords, person_boxes, torso_pair))
    return per_stage


def run_cascade(stages: Sequence[StageModel], images: Sequence[np.ndarray],
                person_boxes: np.ndarray, torso_pair: Sequence[int],
                batch_size: int = 32) -> list[np.ndarray]:
    """Predictions (N, J, 2) in image pixels after each stage: [stage 1, 1-2, 1-2-3, ...]."""
    return [p.coords for p in cascade_predictions(stages, images, person_boxes, torso_pair,
                                                  batch_size)]


def run_cascade_on_records(stages: Sequence[StageModel], records: Sequence[Any],
                           torso_pair: Sequence[int], chunk: int = 256) -> list[np.ndarray]:
    """:func:`run_cascade` over index records (``core.records.PoseRecord``), loading images a
    chunk at a time."""
    results: list[list[np.ndarray]] = [[] for _ in stages]
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        images = [read_rgb(r.image) for r in part]
        boxes = np.stack([r.box for r in part])
        for k, pred in enumerate(run_cascade(stages, images, boxes, torso_pair)):
            results[k].append(pred)
    return [np.concatenate(r) for r in results]


@dataclass
class DisplacementStatistics:
    """Per-joint displacements (prediction - truth) / torso diameter of the previous stages:
    their mean and covariance (the paper's normal distribution) and the measured vectors
    themselves (``samples``), so training can also draw from the real, heavy-tailed
    distribution instead of a normal whose covariance its outliers inflate."""

    mean: np.ndarray  # (J, 2)
    cov: np.ndarray   # (J, 2, 2)
    count: np.ndarray  # (J,) joints measured
    samples: list[np.ndarray] | None = None  # per joint (count_j, 2)

    def to_json(self) -> dict:
        out = {"mean": self.mean.tolist(), "cov": self.cov.tolist(), "count": self.count.tolist()}
        if self.samples is not None:
            out["samples"] = [np.round(s, 4).tolist() for s in self.samples]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "DisplacementStatistics":
        samples = obj.get("samples")
        if samples is not None:
            samples = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in samples]
        return cls(np.asarray(obj["mean"]), np.asarray(obj["cov"]), np.asarray(obj["count"]),
                   samples)

    def draw(self, joint: int, rng: np.random.Generator, sampling: str) -> np.ndarray:
        """One displacement of ``joint``: from the normal (``"normal"``) or one of the
        measured vectors (``"empirical"``; the normal where none were measured)."""
        if sampling == "empirical" and self.samples is not None and len(self.samples[joint]):
            return self.samples[joint][rng.integers(len(self.samples[joint]))]
        return rng.multivariate_normal(self.mean[joint], self.cov[joint])

    @classmethod
    def zero(cls, num_joints: int) -> "DisplacementStatistics":
        """No displacement: boxes centred exactly on the true joints."""
        return cls(np.zeros((num_joints, 2)), np.zeros((num_joints, 2, 2)),
                   np.zeros(num_joints, dtype=int), [np.zeros((1, 2))] * num_joints)

    def rms(self) -> np.ndarray:
        """Per joint root-mean-square displacement, in torso diameters."""
        return np.sqrt((self.mean ** 2).sum(-1) + np.trace(self.cov, axis1=-2, axis2=-1))


def record_diameters(records: Sequence[Any], torso_pair: Sequence[int]) -> np.ndarray:
    """Ground-truth torso diameter per record; where a torso joint is not visible, the
    median diameter-to-box ratio of the others times the record's box side."""
    joints = np.stack([r.joints for r in records])
    visible = np.stack([r.visible for r in records])
    sides = np.array([max(r.box[2], r.box[3]) for r in records])
    diameter = torso_diameter(joints, torso_pair)
    known = visible[:, torso_pair[0]] & visible[:, torso_pair[1]] & (diameter > 0)
    ratio = float(np.median(diameter[known] / sides[known])) if known.any() else 0.5
    return np.where(known, diameter, ratio * sides)


def displacement_statistics(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray,
                            diameter: np.ndarray) -> DisplacementStatistics:
    """Mean and covariance per joint of the displacement (pred - gt) / diameter over the
    joints whose ground truth is visible."""
    d = (np.asarray(pred) - np.asarray(gt)) / np.asarray(diameter)[:, None, None]
    visible = np.asarray(visible, dtype=bool)
    num_joints = d.shape[1]
    mean = np.zeros((num_joints, 2))
    cov = np.tile(np.eye(2) * 1e-4, (num_joints, 1, 1))
    count = visible.sum(axis=0)
    samples = [d[visible[:, j], j] for j in range(num_joints)]
    for j, dj in enumerate(samples):
        if len(dj) >= 1:
            mean[j] = dj.mean(axis=0)
        if len(dj) >= 2:
            cov[j] = np.cov(dj, rowvar=False) + np.eye(2) * 1e-6
    return DisplacementStatistics(mean, cov, count, samples)


def refinement_errors(pred: np.ndarray, target: np.ndarray, joints: np.ndarray,
                      sigma: float) -> dict[str, float]:
    """How a refinement stage did on its own crops, in torso diameters.

    ``pred`` and ``target`` (N, J, 2) in the crops' normalized coordinates, ``joints`` (N,)
    the joint each crop refines. The box side is ``sigma`` torso diameters, so a normalized
    distance times ``sigma`` is a distance in diameters. The no-refinement baseline keeps the
    box centre, i.e. predicts 0: a stage is useful only where ``err`` is below ``err_none``.
    """
    n = np.arange(len(joints))
    own_pred = np.asarray(pred)[n, joints]
    own_target = np.asarray(target)[n, joints]
    err = np.linalg.norm(own_pred - own_target, axis=-1) * sigma
    err_none = np.linalg.norm(own_target, axis=-1) * sigma
    return {"err": float(err.mean()), "err_none": float(err_none.mean()),
            "closer": float((err < err_none).mean())}


def moved_closer(previous: np.ndarray, refined: np.ndarray, gt: np.ndarray,
                 visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per joint, the fraction of visible joints a refinement stage moved closer to the truth
    and the fraction it moved farther away (the rest did not move)."""
    before = np.linalg.norm(np.asarray(previous) - gt, axis=-1)
    after = np.linalg.norm(np.asarray(refined) - gt, axis=-1)
    visible = np.asarray(visible, dtype=bool)
    count = np.maximum(visible.sum(axis=0), 1)
    closer = ((after < before) & visible).sum(axis=0) / count
    farther = ((after > before) & visible).sum(axis=0) / count
    return closer, farther
