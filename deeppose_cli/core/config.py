"""The resolved recipe of one training run, shared by the orchestration and the backends."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import DeepPoseError
from .weights import check_architecture

# Where a refinement stage's displacement statistics come from: the previous stages'
# predictions on the training split (which they have seen) or on the validation split.
DISPLACEMENT_SOURCES = ("train", "val")

# Arithmetic of the training step: fp32, or autocast to bfloat16 / float16 with fp32 master
# weights (which an engine supports: ``engines.ENGINES``).
PRECISIONS = ("fp32", "bf16", "fp16")
# Which outputs a refinement crop trains: only the joint it is centred on (DeepPose), or also
# every other labelled joint that lies inside the crop.
REFINE_JOINTS = ("own", "all")
# How a simulated displacement is drawn: from the per-joint normal (DeepPose) or by
# resampling the measured displacements.
DISPLACEMENT_SAMPLING = ("normal", "empirical")
# What happens to a visible joint that augmentation moves out of the crop.
OUTSIDE_JOINTS = ("drop", "keep")


@dataclass
class TrainConfig:
    """The resolved recipe of one training run: stage recipe + CLI overrides.

    Saved as ``recipe.json`` in the run directory, so a run records exactly what produced it.
    """

    stage: int
    framework: str
    dataset: str
    train_index: str
    out: str
    val_index: str | None = None
    architecture: str = "alexnet"
    input_size: int = 227
    width: float = 1.0
    batch_norm: bool = False
    dropout: float = 0.5
    optimizer: str = "MomentumSGD"
    lr: float = 0.0005
    momentum: float = 0.9
    weight_decay: float = 0.0005
    batch_size: int = 32
    epochs: int = 100
    max_iterations: int | None = None
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    image_cache_gib: float = 2.0
    precision: str = "fp32"
    explicit_backward: bool = False
    loss: str = "l2"
    use_visibility: bool = True
    checkpoint_every: int = 500
    val_every: int = 1
    jitter_translation: float = 0.05
    jitter_scale: float = 0.1
    flip: bool = True
    colour_noise: float = 0.1
    rotation: float = 0.0
    occlusion: float = 0.0
    outside_joints: str = "keep"
    jitter_off_fraction: float = 0.0
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_final_ratio: float = 0.01
    sigma: float | None = None
    samples_per_image: int = 1
    displacement_source: str = "train"
    refine_joints: str = "own"
    displacement_sampling: str = "normal"
    previous: str | None = None
    init: str | None = None

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **required: Any) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(recipe) - known - {"stage"}
        if unknown:
            raise DeepPoseError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
        values = {k: v for k, v in recipe.items() if k in known}
        values.update({k: v for k, v in required.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        check_architecture(self.architecture)
        if self.optimizer not in ("MomentumSGD", "Adam"):
            raise DeepPoseError(f"optimizer must be MomentumSGD or Adam, got {self.optimizer!r}")
        for name in ("lr", "batch_size", "epochs", "input_size", "width", "checkpoint_every"):
            if not getattr(self, name) > 0:
                raise DeepPoseError(f"{name.replace('_', '-')} must be positive")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise DeepPoseError("max-iterations must be at least 1")
        if not (isinstance(self.val_every, int) and self.val_every >= 1):
            raise DeepPoseError(f"val-every must be a whole number of epochs >= 1, got {self.val_every!r}")
        if not self.image_cache_gib >= 0:
            raise DeepPoseError(f"image-cache must be >= 0 GiB, got {self.image_cache_gib!r}")
        if self.stage >= 2 and not (self.sigma and self.sigma > 0):
            raise DeepPoseError("sigma must be positive for refinement stages")
        if self.precision not in PRECISIONS:
            raise DeepPoseError(f"precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {self.precision!r}")
        from .losses import check_norm

        check_norm(self.loss, explicit=self.explicit_backward)
        if self.displacement_source not in DISPLACEMENT_SOURCES:
            raise DeepPoseError(f"displacement-source must be one of "
                                f"{', '.join(DISPLACEMENT_SOURCES)}, got {self.displacement_source!r}")
        if self.displacement_sampling not in DISPLACEMENT_SAMPLING:
            raise DeepPoseError(f"displacement-sampling must be one of "
                                f"{', '.join(DISPLACEMENT_SAMPLING)}, got "
                                f"{self.displacement_sampling!r}")
        if self.refine_joints not in REFINE_JOINTS:
            raise DeepPoseError(f"refine-joints must be one of {', '.join(REFINE_JOINTS)}, "
                                f"got {self.refine_joints!r}")
        if not 0 <= self.dropout < 1:
            raise DeepPoseError("dropout must be at least 0 and below 1")
        if not 0 <= self.occlusion <= 1:
            raise DeepPoseError("occlusion is a probability: between 0 and 1")
        if not 0 <= self.jitter_off_fraction <= 1:
            raise DeepPoseError("jitter-off-fraction is a fraction of the run: between 0 and 1")
        if self.outside_joints not in OUTSIDE_JOINTS:
            raise DeepPoseError(f"outside-joints must be one of {', '.join(OUTSIDE_JOINTS)}, "
                                f"got {self.outside_joints!r}")
        from .schedules import LearningRateSchedule

        LearningRateSchedule(self.lr, 1, self.lr_schedule, self.lr_warmup, self.lr_final_ratio)
        parse_device(self.device)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Cores a GPU run leaves to the training process, its pin-memory thread and the system, and
# the most loader processes it starts unasked.
GPU_RESERVED_CORES = 4
GPU_MAX_WORKERS = 16


def default_workers(device: str, cpu_count: int | None = None) -> int:
    """Loader processes when neither the recipe nor ``--workers`` names a count.

    None on CPU: there the loader shares the cores with the step, and loading in the training
    process was fastest (README "Performance"). On a GPU the loader, not the GPU, bounds
    training (on an H100, 12 workers fed 2744 images/s at batch 32; one process prepares
    about 1500 a second at 227 px on a development CPU core), so all cores but
    ``GPU_RESERVED_CORES``, at least one.
    """
    if parse_device(device)[0] == "cpu":
        return 0
    cores = (os.cpu_count() or 1) if cpu_count is None else cpu_count
    return max(1, min(GPU_MAX_WORKERS, cores - GPU_RESERVED_CORES))


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", -1); ``cuda`` / ``cuda:N`` -> ("cuda", N)."""
    if device == "cpu":
        return "cpu", -1
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise DeepPoseError(f"device must be cpu, cuda or cuda:N, got {device!r}")
