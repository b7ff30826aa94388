"""The DeepPose cascade (Sec. 3.2), framework-free: refinement boxes, displacement
statistics, simulated training samples, and running stages 1..S on images.

A stage s >= 2 looks at a square box of side ``sigma * diam(y^(s-1))`` centred on each joint's
previous prediction (diam: distance between opposing torso joints) and regresses the joint in
that box's normalized coordinates. Its training samples are simulated: boxes are centred at
``truth + d * diam`` with ``d`` drawn from the per-joint normal distribution of the previous
stages' displacements measured on the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .annotations import PoseRecord
from .errors import DeepPoseError
from .geometry import denormalize_pose, joint_boxes, torso_diameter
from .pipeline import (Augmentation, ImageCache, SampleKey, augmentation_at, load_image,
                       make_sample, read_image, sample_key, to_network_input)

Regressor = Callable[[np.ndarray], np.ndarray]  # NCHW float32 -> (N, J, 2) normalized
# (images HxWx3 uint8, boxes (N, K, 4), flip) -> (N, K, J, 2) normalized: crops cut where the
# model runs (a GPU), so only the images travel there, not N x K crops.
CropRegressor = Callable[[Sequence[np.ndarray], np.ndarray, bool], np.ndarray]


@dataclass
class StageModel:
    """One trained stage, as inference needs it."""

    stage: int
    framework: str
    regress: Regressor
    input_size: int
    sigma: float | None = None
    regress_crops: CropRegressor | None = None  # the backend's device-side crops, if any
    trained_on_mirrors: bool = True  # its recipe's `flip`: it saw mirrored images in training
    flip_test: bool = False          # predictions average each crop with its mirror image
    # its regressors also return log scales with with_scales=True (the `laplace` scale layer)
    has_scales: bool = False


FLIP_WEIGHTS = ("scales", "equal")  # how the flip test weights its two opinions


def flip_averaged(stage: StageModel, flip_permutation: Sequence[int],
                  weights: str = "scales") -> StageModel:
    """The same stage predicting each crop twice, as it is and mirrored (its joints mirrored
    back and their left/right labels swapped), and averaging: test-time flipping, which the
    flip augmentation makes the network's second, nearly independent opinion.

    A stage with the ``laplace`` scale layer weights each coordinate's two opinions by their
    inverse variances (1 / b^2 for a predicted Laplace scale b), so the view the network is
    surer of counts more (README "Test-time flip"); other stages, and ``weights="equal"``,
    take the plain mean."""
    if weights not in FLIP_WEIGHTS:
        raise DeepPoseError(f"flip weights must be one of {', '.join(FLIP_WEIGHTS)}, "
                            f"got {weights!r}")
    weighted = weights == "scales" and stage.has_scales
    perm = list(flip_permutation)

    def mirror_back(pred: np.ndarray) -> np.ndarray:
        pred = np.asarray(pred)[..., perm, :].copy()
        pred[..., 0] = -pred[..., 0]
        return pred

    def average(plain: Any, mirrored: Any) -> np.ndarray:
        if not weighted:
            return (np.asarray(plain) + mirror_back(mirrored)) / 2.0
        (plain, plain_log_scale), (mirrored, mirrored_log_scale) = plain, mirrored
        mirrored = mirror_back(mirrored)
        if plain_log_scale is None or mirrored_log_scale is None:
            return (np.asarray(plain) + mirrored) / 2.0
        mirrored_log_scale = np.asarray(mirrored_log_scale)[..., perm, :]
        # weight of the plain view: b_m^2 / (b_p^2 + b_m^2), computed without overflow
        difference = np.clip(2.0 * (plain_log_scale - mirrored_log_scale), -60.0, 60.0)
        weight = 1.0 / (1.0 + np.exp(difference))
        return weight * plain + (1.0 - weight) * mirrored

    extra = {"with_scales": True} if weighted else {}

    def regress(images: np.ndarray) -> np.ndarray:
        return average(stage.regress(images, **extra),
                       stage.regress(np.ascontiguousarray(images[..., ::-1]), **extra))

    def regress_crops(images, boxes, flip=False):
        return average(stage.regress_crops(images, boxes, flip, **extra),
                       stage.regress_crops(images, boxes, not flip, **extra))

    return StageModel(stage.stage, stage.framework, regress, stage.input_size, stage.sigma,
                      regress_crops if stage.regress_crops is not None else None,
                      stage.trained_on_mirrors, flip_test=True)


def with_flip_test(cascade: Sequence[StageModel], flip_permutation: Sequence[int],
                   flip_test: bool | None = None, weights: str = "scales") -> list[StageModel]:
    """The cascade with test-time flipping on every stage (``True``), none (``False``), or by
    default (``None``) on each stage whose recipe trained it on mirrored images.

    On by default because it was measured to help on LSPET at every depth (README
    "Measured": +0.5 to +1.6 points of PDJ@0.2), as pose toolkits such as MMPose do; a stage
    that never saw a mirrored person is not asked to judge one unless the caller says so.
    ``weights``: as ``flip_averaged``.
    """
    return [flip_averaged(stage, flip_permutation, weights)
            if (stage.trained_on_mirrors if flip_test is None else flip_test) else stage
            for stage in cascade]


def regress_boxes(stage: StageModel, images: Sequence[np.ndarray], boxes: np.ndarray,
                  batch_size: int = 256) -> np.ndarray:
    """(N, K, J, 2) normalized predictions of the K boxes of each image (boxes (N, K, 4)).

    With the backend's device-side crops (a model on a GPU) the crops are cut there;
    otherwise here with OpenCV and sent ``batch_size`` at a time."""
    from .geometry import crop_and_resize

    boxes = np.asarray(boxes, dtype=np.float64)
    n_images, n_boxes = boxes.shape[:2]
    if stage.regress_crops is not None:
        return np.asarray(stage.regress_crops(images, boxes, False), dtype=np.float64)
    crops = [to_network_input(crop_and_resize(images[n], boxes[n, k], stage.input_size))
             for n in range(n_images) for k in range(n_boxes)]
    outputs = np.concatenate([np.asarray(stage.regress(np.stack(crops[s:s + batch_size])))
                              for s in range(0, len(crops), batch_size)])
    return outputs.reshape(n_images, n_boxes, -1, 2)


def safe_diameter(joints: np.ndarray, torso_pair: Sequence[int], box: np.ndarray) -> np.ndarray:
    """Torso diameter of each pose, kept within [0.05, 2] x the person box side.

    A degenerate prediction (shoulder on hip) would otherwise give a zero-size box.
    """
    side = np.maximum(np.asarray(box)[..., 2], np.asarray(box)[..., 3])
    return np.clip(torso_diameter(joints, torso_pair), 0.05 * side, 2.0 * side)


def refine(stage: StageModel, images: Sequence[np.ndarray], previous: np.ndarray,
           person_boxes: np.ndarray, torso_pair: Sequence[int],
           batch_size: int = 256) -> np.ndarray:
    """One refinement stage on a chunk of images: the crops of every joint of every image go
    through the network together (``batch_size`` crops per forward pass); joint i takes the
    output i of its own crop, mapped back through that crop's box."""
    n_images, num_joints = previous.shape[:2]
    boxes = np.stack([joint_boxes(previous[n], safe_diameter(previous[n], torso_pair,
                                                             person_boxes[n]), stage.sigma)
                      for n in range(n_images)])  # (N, J, 4)
    outputs = regress_boxes(stage, images, boxes, batch_size)  # image, crop, joint
    own = outputs[:, np.arange(num_joints), np.arange(num_joints)]  # (N, J, 2)
    return denormalize_pose(own[:, :, None, :], boxes)[:, :, 0, :]  # each through its box


def run_cascade(stages: Sequence[StageModel], images: Sequence[np.ndarray],
                person_boxes: np.ndarray, torso_pair: Sequence[int],
                batch_size: int = 32) -> list[np.ndarray]:
    """Predictions (N, J, 2) in image pixels after each stage: [stage 1, 1-2, 1-2-3, ...]."""
    first = stages[0]
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        boxes = np.asarray(person_boxes[start:start + batch_size], dtype=np.float64)
        own = regress_boxes(first, chunk, boxes[:, None, :], batch_size)[:, 0]
        outputs.append(denormalize_pose(own, boxes))
    per_stage = [np.concatenate(outputs)]
    for stage in stages[1:]:
        per_stage.append(refine(stage, images, per_stage[-1], person_boxes, torso_pair))
    return per_stage


def run_cascade_on_records(stages: Sequence[StageModel], records: Sequence[PoseRecord],
                           torso_pair: Sequence[int], chunk: int = 256) -> list[np.ndarray]:
    """:func:`run_cascade` over index records, loading images a chunk at a time."""
    results: list[list[np.ndarray]] = [[] for _ in stages]
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        images = [load_image(r.image) for r in part]
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


def record_diameters(records: Sequence[PoseRecord], torso_pair: Sequence[int]) -> np.ndarray:
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


# Which outputs a refinement crop trains: only the joint it is centred on (DeepPose), or also
# every other labelled joint that lies inside the crop.
REFINE_JOINTS = ("own", "all")
# How a simulated displacement is drawn: from the per-joint normal (DeepPose) or by
# resampling the measured displacements.
DISPLACEMENT_SAMPLING = ("normal", "empirical")


class RefinementDataset:
    """Simulated stage-s samples: item k is (record, joint i, draw) with a box of side
    ``sigma * diam`` centred at ``truth_i + d * diam``, d ~ N(mean_i, cov_i); the target is
    every joint in that box's normalized coordinates. With ``train_joints="own"`` only joint i
    is marked visible, so only joint i's output is trained (the paper's setting); with
    ``"all"`` the other labelled joints inside the crop train their outputs too, which gives
    every output many more examples of its joint seen off-centre, at the price of training it
    on crops centred elsewhere. Draws depend on (seed, epoch, k) only."""

    def __init__(self, records: Sequence[PoseRecord], stats: DisplacementStatistics,
                 sigma: float, input_size: int, flip_permutation: Sequence[int],
                 torso_pair: Sequence[int], aug: Augmentation | None = None, seed: int = 0,
                 samples_per_image: int = 1, train_joints: str = "own",
                 sampling: str = "normal", images: ImageCache | None = None):
        self.source_records = list(records)
        self.images = images
        self.num_joints = len(self.source_records[0].joints) if self.source_records else 0
        self.stats = stats
        self.sigma = float(sigma)
        self.input_size = int(input_size)
        self.flip_permutation = list(flip_permutation)
        self.aug = aug or Augmentation.none()
        self.jitter_off_epoch: int | None = None  # from this epoch on: no geometric jitter
        self.seed = int(seed)
        if train_joints not in REFINE_JOINTS:
            raise DeepPoseError(f"refine_joints must be one of {', '.join(REFINE_JOINTS)}, "
                                f"got {train_joints!r}")
        self.train_joints = train_joints
        if sampling not in DISPLACEMENT_SAMPLING:
            raise DeepPoseError(f"displacement_sampling must be one of "
                                f"{', '.join(DISPLACEMENT_SAMPLING)}, got {sampling!r}")
        self.sampling = sampling
        self.diameters = record_diameters(self.source_records, torso_pair)
        self.items = [(r, j) for r, rec in enumerate(self.source_records)
                      for j in np.flatnonzero(rec.visible)] * int(samples_per_image)

    def __len__(self) -> int:
        return len(self.items)

    def joint_of(self, k: int) -> int:
        """The joint whose refinement item ``k`` trains."""
        return int(self.items[k][1])

    def centred(self) -> "RefinementDataset":
        """The same items with boxes centred on the true joints (no displacement, no
        augmentation): how precise the stage is when the previous one was exactly right."""
        import copy

        other = copy.copy(self)
        other.stats = DisplacementStatistics.zero(len(self.stats.mean))
        other.aug = Augmentation.none()
        other.jitter_off_epoch = None
        return other

    def box(self, k: int, epoch: int) -> np.ndarray:
        r, j = self.items[k]
        rng = np.random.default_rng([self.seed, epoch, k, 1])
        d = self.stats.draw(j, rng, self.sampling)
        centre = self.source_records[r].joints[j] + d * self.diameters[r]
        side = self.sigma * self.diameters[r]
        return np.array([centre[0], centre[1], side, side])

    def get(self, k: int, epoch: int = 0):
        r, j = self.items[k]
        record = self.source_records[r]
        rng = np.random.default_rng([self.seed, epoch, k, 2])
        image = read_image(record.image, self.images)
        aug = augmentation_at(self.aug, epoch, self.jitter_off_epoch)
        if self.train_joints == "own":
            mask = np.zeros(len(record.joints), dtype=np.float32)
            mask[j] = 1.0
            return make_sample(image, self.box(k, epoch), record.joints, mask, self.input_size,
                               aug, rng, self.flip_permutation)
        # "all": the crop's joint is marked 2 so it can be told apart after a flip's label swap
        mask = np.asarray(record.visible, dtype=np.float32).copy()
        mask[j] = 2.0
        x, target, marks = make_sample(image, self.box(k, epoch), record.joints, mask,
                                       self.input_size, aug, rng, self.flip_permutation)
        inside = (np.abs(target) <= 0.5).all(axis=-1)
        visible = np.where(marks == 2.0, 1.0, np.where(inside & (marks > 0), 1.0, 0.0))
        return x, target, visible.astype(np.float32)

    def __getitem__(self, key: int | SampleKey):
        return self.get(*sample_key(key))


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
