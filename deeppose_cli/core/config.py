"""The resolved recipe of one training run: the stage recipe, then the flags given.

:class:`TrainConfig` has one field per declared setting (``core/settings.py``) plus the
run's identity (stage, framework, dataset, index files, output directory, previous stage),
so a setting is declared once and every reader sees the same names. It is saved as
``recipe.json`` in the run directory, so a run records exactly what produced it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, field, make_dataclass
from typing import Any

from .errors import DeepPoseError
from .settings import (DISPLACEMENT_SAMPLING, DISPLACEMENT_SOURCES, OUTSIDE_JOINTS, PRECISIONS,
                       REFINE_JOINTS, SETTINGS, check_recipe)

__all__ = ["DISPLACEMENT_SAMPLING", "DISPLACEMENT_SOURCES", "OUTSIDE_JOINTS", "PRECISIONS",
           "REFINE_JOINTS", "TrainConfig", "default_workers", "parse_device"]


class _RecipeMethods:
    """What every :class:`TrainConfig` does besides holding values."""

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **identity: Any) -> "TrainConfig":
        """A config from a recipe (stage TOML plus flags) and the run's identity fields;
        unknown keys and out-of-range values are refused in one line."""
        values = check_recipe(recipe)
        values["stage"] = recipe.get("stage")  # a stage recipe names its stage
        values.update({k: v for k, v in identity.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Every setting against its declaration (coerced to its type), then the rules that
        join several settings."""
        for setting in SETTINGS:
            setattr(self, setting.name, setting.check(getattr(self, setting.name)))
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage < 1:
            raise DeepPoseError(f"stage must be a whole number >= 1, got {self.stage!r}")
        if self.stage >= 2 and self.sigma is None:
            raise DeepPoseError("--sigma must be given for refinement stages (stage 2 and later)")
        from .losses import check_norm

        check_norm(self.loss, explicit=self.explicit_backward)
        if self.workers is None:  # resolved once, then saved in recipe.json
            self.workers = default_workers(self.device)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TrainConfig = make_dataclass(
    "TrainConfig",
    [("stage", int), ("framework", str), ("dataset", str), ("train_index", str), ("out", str),
     ("val_index", "str | None", field(default=None)),
     ("previous", "str | None", field(default=None))]
    + [(s.name, s.kind if not s.nullable else f"{s.kind.__name__} | None",
        field(default=s.default)) for s in SETTINGS],
    bases=(_RecipeMethods,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = __doc__.split("\n\n")[1]


# Cores a GPU run leaves to the training process, its pin-memory thread and the system, and
# the most loader processes it starts unasked.
GPU_RESERVED_CORES = 4
GPU_MAX_WORKERS = 16


def default_workers(device: str, cpu_count: int | None = None) -> int:
    """Loader processes when neither the recipe nor ``--workers`` names a count.

    None on CPU: there the loader shares the cores with the step, and loading in the training
    process was fastest (docs/performance.md#keeping-an-accelerator-busy). On a GPU the loader, not the GPU, bounds
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
