"""What every framework's engine provides to the one training loop (``training.loop``).

An engine is a small class per framework: it builds the stage's network and optimizer, moves
the loader's raw batches to its device (where they are normalized), takes one optimizer step,
reads the pending losses, saves and restores its training state, and writes and reads model
files. Everything else (the plan, the learning rate of each step, resume, the NaN guard,
checkpoint and validation timing, progress and the run summary) lives once in the loop.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import DeepPoseError
from ..core.predictor import Predictor
from ..core.losses import predicts_uncertainty
from ..core.weights import SCALE_NAMES, check_parameters, parameter_shapes
from ..data.pipeline import RunSampler

CHECKPOINT_FORMAT = "deeppose-checkpoint"
MODEL_FORMAT = "deeppose-model"


class Engine(Protocol):
    """One stage's network and optimizer in one framework, on one device."""

    framework: str

    def batches(self, dataset: Any, sampler: RunSampler) -> AbstractContextManager[Iterator[Any]]:
        """The sampler's batches of ``dataset``'s raw samples, on the device; loader
        processes (``config.workers``) start once and stop when the context closes."""

    def to_device(self, batch: Any) -> Any:
        """A loader's raw batch (``data.pipeline.RawBatch``) on the device, normalized there."""

    def forward(self, batch: Any) -> None:
        """One inference forward pass on a device batch (what the benchmark times)."""

    def sync(self) -> None:
        """Wait for the device's queued work."""

    def set_learning_rate(self, lr: float) -> None:
        """The step size of the coming step (the loop computes it from the schedule)."""

    def step(self, batch: Any) -> Any:
        """One optimizer step; returns the loss still on the device."""

    def read_losses(self, pending: list[Any]) -> list[float]:
        """The pending losses as floats (one host synchronization for all of them)."""

    def predictor(self) -> Predictor:
        """The network as it is now, for validation (eval mode, no gradients)."""

    def save_checkpoint(self, path: Path, iteration: int) -> None:
        """Model, optimizer and random state at ``iteration``, written atomically."""

    def load_checkpoint(self, path: Path) -> int:
        """Restore what :meth:`save_checkpoint` wrote; returns its iteration."""

    def write_model(self, path: Path) -> None:
        """The final model file (canonical parameters and the architecture)."""

    # Built with ``world=`` (a ``core.distributed.World`` of several processes), an engine
    # joins the launcher's process group, averages the gradients of every step over the
    # processes (weighting each process's loss by ``core.distributed.loss_weight``), and
    # ``read_losses`` returns the mean over the processes; then these are called too:

    def reseed(self, seed: int) -> None:
        """The random state of the coming step (dropout)."""

    def barrier(self) -> None:
        """Wait until every process has come here."""

    def close(self, failed: bool = False) -> None:
        """Leave the process group; ``failed``: so that the launcher ends the others."""


def _init_misfit(config: TrainConfig, error: DeepPoseError) -> DeepPoseError:
    return DeepPoseError(f"--init {config.init} does not fit this network (input size "
                         f"{config.input_size}, width {config.width}, batch norm "
                         f"{config.batch_norm}): {error}")


def check_init_parameters(params: dict[str, np.ndarray], config: TrainConfig,
                          num_joints: int) -> None:
    """Refuse ``--init`` weights that do not fit the run's network, before the run directory
    is touched (the engine's model, built later, would refuse them too, but only after)."""
    shapes = parameter_shapes(num_joints, config.input_size, config.width, config.batch_norm,
                              predicts_uncertainty(config.loss))
    try:  # a network that predicts its uncertainty may start from one that did not
        check_parameters(params, {name: shape for name, shape in shapes.items()
                                  if name in params or name not in SCALE_NAMES})
    except DeepPoseError as e:
        raise _init_misfit(config, e) from None


def apply_init_parameters(load: Callable[..., None], model: Any, config: TrainConfig,
                          init_params: dict[str, np.ndarray] | None) -> None:
    """Load ``--init`` weights into an engine's fresh model with ``load`` (its
    ``load_numpy_params``), or say in one line why they do not fit."""
    if init_params is None:
        return
    try:  # a network that predicts its uncertainty may start from one that did not
        load(model, init_params, optional=SCALE_NAMES)
    except DeepPoseError as e:
        raise _init_misfit(config, e) from None


def checkpoint_iteration(saved: Any, path: Path, framework: str) -> int:
    """Check a checkpoint's header fields; returns its iteration."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise DeepPoseError(f"{path} is not a deeppose training checkpoint")
    if saved.get("framework") != framework:
        raise DeepPoseError(f"{path} is a {saved.get('framework')} checkpoint; "
                            f"resume it with --framework {saved.get('framework')}")
    iteration = saved.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise DeepPoseError(f"{path} is damaged: its iteration is {iteration!r}")
    return iteration


def check_checkpoint_recipe(saved_config: dict | None, config: TrainConfig, path: Path) -> None:
    """A checkpoint resumes only into the network it was trained in."""
    saved = {"batch_norm": False, **(saved_config or {})}  # from before batch norm: none
    for key in ("input_size", "width", "batch_norm"):
        if key in saved and saved[key] != getattr(config, key):
            raise DeepPoseError(f"{path} was trained with {key} {saved[key]}, but this run "
                                f"has {key} {getattr(config, key)}: resume with the same recipe")
