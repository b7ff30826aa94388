"""Learning-rate schedules, framework-free.

One function gives the learning rate of every optimizer step, and both backends only apply it
(PyTorch sets its parameter groups before each step, Chainer's ``LearningRateSchedule``
extension sets ``lr``/``alpha`` between updates), so the two frameworks use the same learning
rate at the same iteration. The schedule holds no state: a resumed run recomputes it from the
iteration number, and it always spans the iterations the run will actually do (``epochs`` or
``--max-iterations``, whichever is fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import DeepPoseError
from .settings import SCHEDULES


@dataclass(frozen=True)
class LearningRateSchedule:
    """``base_lr`` shaped by a linear warm-up, then ``kind``:

    * ``constant``: ``base_lr`` after the warm-up;
    * ``cosine``: from ``base_lr`` down to ``base_lr * final_ratio`` at the last iteration;
    * ``step``: ``base_lr`` multiplied by ``step_gamma`` at each fraction of the run in
      ``step_at`` (default: x0.1 at 60 % and again at 85 %).

    Why a warm-up: networks trained from scratch without normalization layers blow up or sit
    on the mean-pose plateau when Adam starts at full step size.
    """

    base_lr: float
    total_iterations: int
    kind: str = "cosine"
    warmup_iterations: int = 0
    final_ratio: float = 0.01
    step_at: tuple[float, ...] = (0.6, 0.85)
    step_gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise DeepPoseError(f"lr-schedule must be one of {', '.join(SCHEDULES)}, "
                                f"got {self.kind!r}")
        if not self.base_lr > 0:
            raise DeepPoseError("lr must be positive")
        if self.warmup_iterations < 0:
            raise DeepPoseError("lr-warmup must be 0 or more iterations")
        if not 0 <= self.final_ratio <= 1:
            raise DeepPoseError("lr-final-ratio must be between 0 and 1")

    def __call__(self, iteration: int) -> float:
        """Learning rate of optimizer step ``iteration`` (1-based)."""
        total = max(1, int(self.total_iterations))
        warmup = min(int(self.warmup_iterations), total - 1) if total > 1 else 0
        if warmup and iteration <= warmup:
            return self.base_lr * iteration / warmup
        if self.kind == "constant":
            return self.base_lr
        # Progress through the decay part: 0 at the first step after warm-up, 1 at the last.
        span = max(1, total - warmup - 1)
        progress = min(max((iteration - warmup - 1) / span, 0.0), 1.0)
        if self.kind == "cosine":
            low = self.base_lr * self.final_ratio
            return low + 0.5 * (self.base_lr - low) * (1.0 + math.cos(math.pi * progress))
        steps = sum(progress >= at for at in self.step_at)
        return self.base_lr * self.step_gamma ** steps


def schedule_from_config(config, total_iterations: int) -> LearningRateSchedule:
    """The schedule of a :class:`~deeppose_cli.training.TrainConfig` over ``total_iterations``."""
    return LearningRateSchedule(
        base_lr=float(config.lr), total_iterations=int(total_iterations),
        kind=config.lr_schedule, warmup_iterations=int(config.lr_warmup),
        final_ratio=float(config.lr_final_ratio))
