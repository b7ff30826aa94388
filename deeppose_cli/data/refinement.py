"""Simulated training samples of refinement stages (DeepPose Sec. 3.2): boxes around each
joint, displaced as the previous stages' measured errors say."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.cascade import DisplacementStatistics, record_diameters
from ..core.config import DISPLACEMENT_SAMPLING, REFINE_JOINTS
from ..core.errors import DeepPoseError
from ..core.records import PoseRecord
from .pipeline import (Augmentation, ImageCache, RawSample, SampleKey, augmentation_at,
                       make_raw_sample, normalized_sample, read_image, sample_key)


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

    def raw(self, k: int, epoch: int = 0) -> RawSample:
        r, j = self.items[k]
        record = self.source_records[r]
        rng = np.random.default_rng([self.seed, epoch, k, 2])
        image = read_image(record.image, self.images)
        aug = augmentation_at(self.aug, epoch, self.jitter_off_epoch)
        if self.train_joints == "own":
            mask = np.zeros(len(record.joints), dtype=np.float32)
            mask[j] = 1.0
            return make_raw_sample(image, self.box(k, epoch), record.joints, mask,
                                   self.input_size, aug, rng, self.flip_permutation)
        # "all": the crop's joint is marked 2 so it can be told apart after a flip's label swap
        mask = np.asarray(record.visible, dtype=np.float32).copy()
        mask[j] = 2.0
        sample = make_raw_sample(image, self.box(k, epoch), record.joints, mask,
                                 self.input_size, aug, rng, self.flip_permutation)
        marks = sample.visible
        inside = (np.abs(sample.joints) <= 0.5).all(axis=-1)
        visible = np.where(marks == 2.0, 1.0, np.where(inside & (marks > 0), 1.0, 0.0))
        return sample._replace(visible=visible.astype(np.float32))

    def get(self, k: int, epoch: int = 0):
        return normalized_sample(self.raw(k, epoch))

    def __getitem__(self, key: int | SampleKey):
        return self.get(*sample_key(key))
