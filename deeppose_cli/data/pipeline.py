"""Index records -> training/evaluation samples, seeded, framework-free.

A sample is ``(image, joints, visible)``: image float32 CHW (RGB, ImageNet-normalized) of
``input_size`` x ``input_size``; joints float32 (J, 2) in the crop box's normalized coordinates
N(y; b); visible float32 (J,). Training loaders move the sample's *raw* form instead
(:class:`RawSample`: the uint8 crop and the per-channel scale and bias that normalize it), so
four times fewer bytes cross process boundaries and reach the device, where the engines
normalize with :func:`~deeppose_cli.core.images.input_scale_bias` exactly as the host path
does. Augmentation randomness comes from ``numpy.random.default_rng([seed, epoch, index])``,
so a sample depends only on those three numbers: the same seed gives identical samples
whichever framework, worker or order asks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np

from ..core.config import OUTSIDE_JOINTS
from ..core.distributed import shard
from ..core.errors import DeepPoseError
from ..core.geometry import (apply_affine, augmented_crop_matrix, crop_and_resize,
                             crop_pixels_to_normalized, flip_normalized, normalize_pose,
                             warp_crop)
from ..core.images import IMAGE_MEAN, input_scale_bias, normalize_crop, read_rgb
from ..core.records import PoseRecord



@dataclass(frozen=True)
class Augmentation:
    """Training-time randomness. ``Augmentation.none()`` is the evaluation setting.

    Everything geometric (translation, scale, rotation, flip) is one affine map from image to
    crop pixels: the crop is one warp and the joints go through the same map, so they stay on
    their pixels whatever is drawn.

    ``outside_joints`` says what happens to a visible joint that the augmentation moves out of
    the crop: ``drop`` (the default of stage 1) marks it not visible for that sample, so the
    network is never asked to place a joint it cannot see; ``keep`` trains on it anyway (the
    refinement stages, whose boxes are centred on wrong predictions and must learn to move
    towards a joint just outside).
    """

    jitter_translation: float = 0.05  # box centre moved by up to this fraction of its side
    jitter_scale: float = 0.1         # box side scaled by exp(uniform(-s, s))
    flip: bool = True
    colour_noise: float = 0.1         # per-channel gain 1 + uniform(-c, c), plus a shift
    rotation: float = 0.0             # degrees: uniform(-r, r) about the crop centre
    occlusion: float = 0.0            # probability of one random erased rectangle
    outside_joints: str = "keep"

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(0.0, 0.0, False, 0.0)

    def without_jitter(self) -> "Augmentation":
        """The same flips, colour noise and occlusion on the exact box, uncut by translation,
        scale or rotation: crops as evaluation cuts them (``jitter_off_fraction``)."""
        return replace(self, jitter_translation=0.0, jitter_scale=0.0, rotation=0.0)

    @classmethod
    def from_recipe(cls, recipe: dict) -> "Augmentation":
        aug = cls(**{k: type(v)(recipe[k]) for k, v in asdict(cls()).items() if k in recipe})
        if aug.outside_joints not in OUTSIDE_JOINTS:
            raise DeepPoseError(f"outside_joints must be one of {', '.join(OUTSIDE_JOINTS)}, "
                                f"got {aug.outside_joints!r}")
        return aug


# Random erasing: area fraction and aspect ratio of the rectangle (Zhong et al. 2020).
OCCLUSION_AREA = (0.02, 0.2)
OCCLUSION_ASPECT = (0.3, 3.3)


class ImageCache:
    """Decoded images kept in memory, up to ``budget_bytes`` per process, so an epoch after
    the first decodes nothing: reading and decoding are two thirds of preparing an LSPET
    sample, on the same cores the small network's training step uses. Cached images are
    read-only and identical to fresh decodes, so samples do not depend on the cache. Images
    past the budget are decoded every time. Each loader worker process fills its own copy."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.images: dict[str, np.ndarray] = {}

    @classmethod
    def of_gib(cls, gib: float) -> "ImageCache | None":
        """A cache of ``gib`` GiB, or None for 0 (no caching)."""
        return cls(int(gib * 2 ** 30)) if gib > 0 else None

    def load(self, path) -> np.ndarray:
        key = str(path)
        image = self.images.get(key)
        if image is None:
            image = read_rgb(path)
            if self.used_bytes + image.nbytes <= self.budget_bytes:
                image.flags.writeable = False
                self.images[key] = image
                self.used_bytes += image.nbytes
        return image


def read_image(path, cache: ImageCache | None) -> np.ndarray:
    """``path`` decoded as RGB uint8 HWC, through ``cache`` when there is one."""
    return cache.load(path) if cache is not None else read_rgb(path)


def jitter_box(box: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    box = np.array(box, dtype=np.float64)
    side = max(box[2], box[3])
    box[0:2] += rng.uniform(-aug.jitter_translation, aug.jitter_translation, 2) * side
    box[2:4] *= np.exp(rng.uniform(-aug.jitter_scale, aug.jitter_scale))
    return box


class RawSample(NamedTuple):
    """A training sample before normalization: ``crop`` uint8 HWC RGB, and the per-channel
    float32 ``scale`` and ``bias`` (ImageNet normalization and colour noise) with
    ``crop * scale + bias`` the network input; joints and visible as in a sample."""

    crop: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    joints: np.ndarray
    visible: np.ndarray


def normalized_sample(raw: RawSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host path: ``(float32 CHW input, joints, visible)`` of a raw sample."""
    return normalize_crop(raw.crop, raw.scale, raw.bias), raw.joints, raw.visible


def make_raw_sample(image: np.ndarray, box: np.ndarray, joints: np.ndarray,
                    visible: np.ndarray, input_size: int, aug: Augmentation,
                    rng: np.random.Generator, flip_permutation: Sequence[int]) -> RawSample:
    """Crop ``box`` (jittered, rotated, maybe mirrored) in one warp, map the joints through
    the same affine map into the crop's normalized coordinates, draw the colour noise and
    maybe erase a rectangle.

    Shared by every cascade stage: stage 1 passes the person box, later stages a box around
    one joint. The random draws come in a fixed order (jitter, flip, gain, shift, rotation,
    occlusion), each only when its augmentation is on, so a sample depends only on the
    generator's seed and recipes without rotation or occlusion draw what they always drew.
    """
    box = jitter_box(box, aug, rng) if (aug.jitter_translation or aug.jitter_scale) else box
    visible = np.asarray(visible, dtype=np.float32)
    flip = bool(aug.flip and rng.random() < 0.5)
    gain = shift = None
    if aug.colour_noise:
        gain = 1.0 + rng.uniform(-aug.colour_noise, aug.colour_noise, 3)
        shift = rng.uniform(-aug.colour_noise, aug.colour_noise, 3)
    angle = float(rng.uniform(-aug.rotation, aug.rotation)) if aug.rotation else 0.0
    if angle:
        matrix = augmented_crop_matrix(box, input_size, flip, angle)
        crop = warp_crop(image, matrix, input_size)
        normalized = crop_pixels_to_normalized(apply_affine(matrix, joints), input_size)
        if flip:  # the map already mirrored the coordinates; the labels swap sides too
            normalized = normalized[list(flip_permutation)]
            visible = visible[list(flip_permutation)]
    else:  # the same map without rotation, in the closed form evaluation uses
        normalized = normalize_pose(joints, box)
        if flip:
            normalized, visible = flip_normalized(normalized, visible, flip_permutation)
        crop = crop_and_resize(image, box, input_size, flip=flip)
    if aug.occlusion and rng.random() < aug.occlusion:
        crop = erase_rectangle(crop, rng)
    if aug.outside_joints == "drop":
        inside = (np.abs(normalized) <= 0.5).all(axis=-1)
        visible = np.where(inside, visible, 0.0)
    scale, bias = input_scale_bias(gain, shift)
    return RawSample(crop, scale, bias, normalized.astype(np.float32),
                     visible.astype(np.float32))


def make_sample(image: np.ndarray, box: np.ndarray, joints: np.ndarray, visible: np.ndarray,
                input_size: int, aug: Augmentation, rng: np.random.Generator,
                flip_permutation: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_raw_sample`, normalized on the host: ``(float32 CHW, joints, visible)``."""
    return normalized_sample(make_raw_sample(image, box, joints, visible, input_size, aug,
                                             rng, flip_permutation))


def erase_rectangle(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``crop`` with one random rectangle filled with the mean colour (0 after
    normalization): joints under it keep their labels, so the network learns to place
    occluded joints from context."""
    size_y, size_x = crop.shape[:2]
    area = rng.uniform(*OCCLUSION_AREA) * size_x * size_y
    aspect = np.exp(rng.uniform(*np.log(OCCLUSION_ASPECT)))
    w = int(min(size_x, round(np.sqrt(area * aspect))))
    h = int(min(size_y, round(np.sqrt(area / aspect))))
    x0 = int(rng.integers(0, size_x - w + 1))
    y0 = int(rng.integers(0, size_y - h + 1))
    out = crop.copy()
    out[y0:y0 + h, x0:x0 + w] = np.round(IMAGE_MEAN * 255).astype(np.uint8)
    return out


def augmentation_at(aug: Augmentation, epoch: int, jitter_off_epoch: int | None
                    ) -> Augmentation:
    """The augmentation of ``epoch``: ``aug``, or from ``jitter_off_epoch`` on (the run's last
    ``jitter_off_fraction``, see ``IterationPlan.tail_start_epoch``) the same without the
    geometric jitter, so a run ends on crops placed the way evaluation places them."""
    if jitter_off_epoch is not None and epoch >= jitter_off_epoch:
        return aug.without_jitter()
    return aug


SampleKey = tuple[int, int]  # (epoch, index): all a training sample depends on, with the seed


def sample_key(key: int | SampleKey) -> tuple[int, int]:
    """``(index, epoch)`` for ``dataset.get`` from a dataset key: ``(epoch, index)`` from
    :class:`RunSampler`, or a plain index (epoch 0, as validation uses)."""
    if isinstance(key, tuple):
        epoch, index = key
        return int(index), int(epoch)
    return int(key), 0


class PoseDataset:
    """Stage-1 samples: the person box of each record, augmented when ``aug`` says so.

    Indexable by ``(epoch, index)`` keys (a plain ``index`` means epoch 0), so it serves as a
    torch ``Dataset`` and a chainer dataset alike, and the key alone fixes the sample.
    From epoch ``jitter_off_epoch`` on (None: never) samples skip the geometric jitter.
    """

    def __init__(self, records: Sequence[PoseRecord], input_size: int,
                 flip_permutation: Sequence[int], aug: Augmentation | None = None, seed: int = 0,
                 images: ImageCache | None = None, jitter_off_epoch: int | None = None):
        self.records = list(records)
        self.images = images
        # Every target of this dataset has this many joints (the index reader checks it).
        self.num_joints = len(self.records[0].joints) if self.records else 0
        self.input_size = int(input_size)
        self.flip_permutation = list(flip_permutation)
        self.aug = aug or Augmentation.none()
        self.seed = int(seed)
        self.jitter_off_epoch = jitter_off_epoch

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def raw(self, index: int, epoch: int = 0) -> RawSample:
        record = self.records[index]
        image = read_image(record.image, self.images)
        return make_raw_sample(image, record.box, record.joints, record.visible,
                               self.input_size,
                               augmentation_at(self.aug, epoch, self.jitter_off_epoch),
                               self.rng(index, epoch), self.flip_permutation)

    def get(self, index: int, epoch: int = 0):
        return normalized_sample(self.raw(index, epoch))

    def __getitem__(self, key: int | SampleKey):
        return self.get(*sample_key(key))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, so an
    interrupted run resumed mid-epoch sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)



class RunSampler:
    """The keys of every batch a training run draws, from iteration ``first_iteration + 1`` to
    ``total_iterations``: iteration ``i`` is batch ``(i - 1) % iterations_per_epoch`` of epoch
    ``(i - 1) // iterations_per_epoch`` in :func:`epoch_order`.

    One sampler spans the whole run, so a loader built on it starts its worker processes once
    instead of once per epoch, and because each key carries its epoch, a worker that prefetches
    across an epoch boundary still draws that epoch's augmentation. Both backends iterate it
    (a torch ``batch_sampler``; the Chainer iterator), so both see the same batches, and a run
    resumed at iteration ``k`` sees exactly the batches an uninterrupted one saw after ``k``.

    In a run of ``world_size`` processes, process ``rank`` draws its contiguous share of every
    batch (``core.distributed.shard``): together they see what one process would.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, iterations_per_epoch: int,
                 total_iterations: int, first_iteration: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.total_iterations = int(total_iterations)
        self.first_iteration = int(first_iteration)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return max(0, self.total_iterations - self.first_iteration)

    def batch(self, iteration: int, order: np.ndarray | None = None) -> list[SampleKey]:
        """Keys of the batch of (1-based) ``iteration``; ``order`` is its epoch's order if known."""
        epoch, position = divmod(iteration - 1, self.iterations_per_epoch)
        if order is None:
            order = epoch_order(self.num_samples, self.seed, epoch)
        start = position * self.batch_size
        keys = [(epoch, int(i)) for i in order[start:start + self.batch_size]]
        if self.world_size > 1:
            keys = shard(keys, self.rank, self.world_size)
        return keys

    def __iter__(self):
        order_epoch, order = -1, None
        for iteration in range(self.first_iteration + 1, self.total_iterations + 1):
            epoch = (iteration - 1) // self.iterations_per_epoch
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(self.num_samples, self.seed, epoch)
            yield self.batch(iteration, order)


class RawBatch(NamedTuple):
    """Stacked raw samples: ``crops`` uint8 (N, S, S, 3), ``scale``/``bias`` float32 (N, 3),
    ``joints`` float32 (N, J, 2), ``visible`` float32 (N, J). An engine sends it to its
    device and normalizes there (``crops * scale + bias`` per channel)."""

    crops: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    joints: np.ndarray
    visible: np.ndarray


def collate_raw(samples: Sequence[RawSample]) -> RawBatch:
    """Stack raw samples into one :class:`RawBatch` (module level: worker processes pickle it)."""
    crops, scale, bias, joints, visible = zip(*samples)
    return RawBatch(np.stack(crops), np.stack(scale).astype(np.float32, copy=False),
                    np.stack(bias).astype(np.float32, copy=False),
                    np.stack(joints).astype(np.float32, copy=False),
                    np.stack(visible).astype(np.float32, copy=False))


def normalized_batch(batch: RawBatch) -> np.ndarray:
    """The host path of a whole batch: float32 (N, 3, S, S) network inputs."""
    return np.stack([normalize_crop(c, s, b) for c, s, b in
                     zip(batch.crops, batch.scale, batch.bias)])


class RawSamples:
    """A dataset's raw samples, indexable by the same keys (what training loaders read)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | SampleKey) -> RawSample:
        return self.dataset.raw(*sample_key(key))


class RunBatches:
    """The run's batches as a dataset of whole batches: item ``i`` is the :class:`RawBatch`
    of the sampler's ``i``-th batch. A loader that fetches items of this dataset in worker
    processes (Chainer's ``MultiprocessIterator``) gets samples drawn and collated there and
    moves one batch through shared memory per iteration."""

    def __init__(self, dataset, sampler: RunSampler):
        self.dataset = dataset
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> RawBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        keys = self.sampler.batch(self.sampler.first_iteration + 1 + int(i))
        return collate_raw([self.dataset.raw(*sample_key(key)) for key in keys])
