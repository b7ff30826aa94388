"""What the training loop reports through: the iteration plan, the JSONL log with its NaN
guard, the progress display, and the validation metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..core.errors import DeepPoseError
from ..data.pipeline import RunSampler
from .rundir import RunDirectory


@dataclass
class IterationPlan:
    iterations_per_epoch: int
    total_iterations: int

    @classmethod
    def make(cls, num_samples: int, batch_size: int, epochs: int,
             max_iterations: int | None) -> "IterationPlan":
        per_epoch = max(1, math.ceil(num_samples / batch_size))
        total = per_epoch * epochs
        if max_iterations is not None:
            total = min(total, max_iterations)
        return cls(per_epoch, total)

    @property
    def epochs(self) -> int:
        """Epochs the run touches (the last one may be partial)."""
        return math.ceil(self.total_iterations / self.iterations_per_epoch)

    def epoch_of(self, iteration: int) -> int:
        """Epoch (0-based) that iteration ``iteration`` (1-based) belongs to."""
        return (iteration - 1) // self.iterations_per_epoch

    def tail_start_epoch(self, fraction: float) -> int | None:
        """The first epoch of the run's last ``fraction`` of iterations, rounded to whole
        epochs (None for 0): where ``jitter_off_fraction`` turns the geometric jitter off."""
        if fraction <= 0:
            return None
        epochs = self.total_iterations / self.iterations_per_epoch
        return int(round(epochs * (1.0 - fraction)))

    def validates_at(self, iteration: int, val_every: int = 1) -> bool:
        """Whether a run validates after ``iteration``: at the end of every ``val_every``-th
        epoch and at its last iteration."""
        return (iteration % (self.iterations_per_epoch * max(1, int(val_every))) == 0
                or iteration == self.total_iterations)

    def sampler(self, num_samples: int, batch_size: int, seed: int,
                first_iteration: int = 0, rank: int = 0, world_size: int = 1) -> RunSampler:
        """The batch keys of this plan's iterations after ``first_iteration``: what every
        engine's loader follows (process ``rank`` of ``world_size``: its share of each)."""
        return RunSampler(num_samples, batch_size, seed, self.iterations_per_epoch,
                          self.total_iterations, first_iteration, rank, world_size)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


# Piped output (a log file, CI) gets a plain progress line at most this often.
PIPED_LINE_SECONDS = 60.0


class TrainingReporter:
    """Progress, the JSONL log and the NaN guard of one run.

    In a terminal: a progress bar with the loss, images/s and the time left. Piped into a
    file: a plain line at the first logged window, then at most every
    :data:`PIPED_LINE_SECONDS`, and at every validation, so a log shows how a run goes
    without a line per iteration. Speeds and times left are shown once measured (from the
    first logged window), never as NaN. With ``writes`` False (a process of a
    distributed run other than process 0) it keeps the NaN guard and writes nothing.
    """

    def __init__(self, run: RunDirectory, plan: IterationPlan, batch_size: int,
                 log_every: int = 10, show_progress: bool = True,
                 schedule: Callable[[int], float] | None = None,
                 checkpoint_every: int | None = None, title: str = "training",
                 console: Any = None, writes: bool = True):
        self.run = run
        self.writes = writes
        self.schedule = schedule
        self.plan = plan
        self.batch_size = batch_size
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.show_progress = show_progress
        self.title = title
        self._console = console
        self._progress = None
        self._window: list[float] = []
        self._start = time.perf_counter()
        self._last_time = self._start
        self._last_iteration = 0
        self._first_iteration = 0
        self._last_line = -math.inf
        self._last_loss: float | None = None
        self.images_per_second: float | None = None
        self._train_seconds = 0.0

    def __enter__(self) -> "TrainingReporter":
        from rich.console import Console

        console = self._console or Console(stderr=True, highlight=False)
        self._console = console
        if self.show_progress and console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                      TimeElapsedColumn(), console=console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.plan.total_iterations,
                                                 status="starting")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, iteration: int) -> None:
        """Called once, with the iteration a (resumed) run starts after."""
        self._first_iteration = self._last_iteration = iteration
        self._last_time = time.perf_counter()
        self._advance(iteration)

    def must_read_loss(self, iteration: int) -> bool:
        """Whether the loop reads its pending losses after ``iteration``: at every log line,
        epoch end (validation), checkpoint and at the last iteration. In between the losses
        stay where they were computed, so an accelerator never waits for the host, and no
        checkpoint is written before its losses passed the NaN guard."""
        return (iteration % self.log_every == 0 or iteration == self.plan.total_iterations
                or iteration % self.plan.iterations_per_epoch == 0
                or (self.checkpoint_every is not None and iteration % self.checkpoint_every == 0))

    def status(self, iteration: int) -> str:
        """``loss L, S images/s, T left`` with what is measured so far."""
        parts = []
        if self._last_loss is not None:
            parts.append(f"loss {self._last_loss:.4g}")
        if self.images_per_second:
            left = (self.plan.total_iterations - iteration) * self.batch_size
            parts += [f"{self.images_per_second:.1f} images/s",
                      f"{format_duration(left / self.images_per_second)} left"]
        return ", ".join(parts) or "starting"

    def _advance(self, iteration: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=iteration, status=self.status(iteration))

    def step_done(self, iteration: int, seconds: float) -> None:
        """A step finished (``seconds`` of training time since the last call)."""
        self._train_seconds += seconds
        if self._progress is not None:
            self._progress.update(self._task, completed=iteration)

    def losses(self, last_iteration: int, values: Sequence[float]) -> None:
        """Record the losses of the steps up to ``last_iteration`` (one value per step, the
        last one that of ``last_iteration``); stops training at the first non-finite one.

        The weights in memory may have taken up to ``log_every`` steps past a bad loss, but
        the loop reads its losses before every checkpoint, validation and the final model, so
        nothing written to disk has seen it.
        """
        first = last_iteration - len(values) + 1
        for offset, loss in enumerate(values):
            loss = float(loss)
            if not math.isfinite(loss):
                last = self.run.checkpoint_path if self.run.checkpoint_path.exists() else None
                kept = (f"; last good checkpoint kept: {last}" if last
                        else "; no checkpoint was written")
                raise DeepPoseError(f"loss became {loss} at iteration {first + offset}: training"
                                    f" stopped (try a lower --lr){kept}")
            self._window.append(loss)
        iteration = last_iteration
        if values:
            self._last_loss = float(values[-1])
        if iteration % self.log_every == 0 or iteration == self.plan.total_iterations:
            now = time.perf_counter()
            images = (iteration - self._last_iteration) * self.batch_size
            self.images_per_second = images / max(now - self._last_time, 1e-9)
            if self.writes:
                self.run.append_log({
                    "iteration": iteration, "epoch": self.plan.epoch_of(iteration) + 1,
                    "loss": float(np.mean(self._window)),
                    **({"lr": self.schedule(iteration)} if self.schedule else {}),
                    "elapsed": round(now - self._start, 3),
                    "images_per_second": round(self.images_per_second, 2),
                })
            self._window.clear()
            self._last_time, self._last_iteration = now, iteration
            self._piped_line(iteration)
        self._advance(iteration)

    def _piped_line(self, iteration: int, force: bool = False) -> None:
        if not self.show_progress or self._progress is not None:
            return
        now = time.perf_counter()
        if force or now - self._last_line >= PIPED_LINE_SECONDS \
                or iteration == self.plan.total_iterations:
            self._last_line = now
            epoch = self.plan.epoch_of(max(iteration, 1)) + 1
            self._console.print(f"iteration {iteration}/{self.plan.total_iterations} (epoch "
                                f"{epoch}/{self.plan.epochs}): {self.status(iteration)}")

    def validation(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, "epoch": self.plan.epoch_of(iteration) + 1,
                  "elapsed": round(time.perf_counter() - self._start, 3)}
        record.update({f"val_{k}": v for k, v in metrics.items()})
        self.run.append_log(record)
        if self.show_progress:
            text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            console = self._progress.console if self._progress is not None else self._console
            console.print(f"validation at iteration {iteration}: {text}")

    def summary(self, iteration: int) -> dict[str, Any]:
        """Iterations and training images/s (loading and stepping, no validations or
        checkpoints) of this process's part of the run."""
        images = (iteration - self._first_iteration) * self.batch_size
        seconds = self._train_seconds
        return {"iterations": iteration,
                "images_per_second": images / seconds if seconds > 0 else None}


def masked_squared_error(pred: np.ndarray, target: np.ndarray,
                         visible: np.ndarray) -> tuple[float, float]:
    """(sum of squared 2-D errors over visible joints, number of visible joints) in NumPy:
    the validation loss of every engine, summed so batches can be pooled exactly."""
    mask = np.asarray(visible, dtype=np.float64)
    sq = ((np.asarray(pred, np.float64).reshape(target.shape) - target) ** 2).sum(-1)
    return float((np.where(mask > 0, sq, 0.0)).sum()), float(mask.sum())


def validation_metrics(predict: Callable[[np.ndarray], Any], dataset, batch_size: int,
                       torso_pair: Sequence[int] | None = None,
                       centred: bool = True) -> dict[str, float]:
    """Validation metrics of a predictor (network inputs in, a ``Prediction`` out).

    Always the loss. A stage-1 dataset (person boxes, no flips) adds PDJ@0.2 in image pixels.
    A refinement dataset adds the stage's error in torso diameters at the simulated
    displacements (``err``) beside keeping the box centre (``err_none``), the fraction of
    crops it moved closer (``closer``), and, with ``centred``, its error on crops centred on
    the true joints (``err_centred``): the precision it can give when the previous stage was
    right.
    """
    from ..core.geometry import denormalize_pose
    from ..core.metrics import pdj

    loss, pred, target = _predict_dataset(predict, dataset, batch_size)
    metrics = {"loss": loss}
    records = getattr(dataset, "records", None)
    if records is not None and torso_pair is not None and not dataset.aug.flip:
        boxes = np.stack([r.box for r in records])
        pred_px = denormalize_pose(pred, boxes)
        gt = np.stack([r.joints for r in records])
        vis = np.stack([r.visible for r in records])
        metrics["pdj@0.2"] = pdj(pred_px, gt, vis, torso_pair).at(0.2)[0]
    if hasattr(dataset, "joint_of") and len(dataset):
        from ..core.cascade import refinement_errors

        joints = np.array([dataset.joint_of(k) for k in range(len(dataset))])
        metrics.update(refinement_errors(pred, target, joints, dataset.sigma))
        if centred:
            _, pred_c, target_c = _predict_dataset(predict, dataset.centred(), batch_size)
            metrics["err_centred"] = refinement_errors(pred_c, target_c, joints,
                                                       dataset.sigma)["err"]
    return metrics


def _predict_dataset(predict, dataset, batch_size: int):
    """(masked mean squared error, predictions, targets) over a whole dataset."""
    total, count = 0.0, 0.0
    preds, targets = [], []
    for images, target, visible in batches(dataset, range(len(dataset)), batch_size):
        pred = np.asarray(predict(images).coords).reshape(target.shape)
        s, c = masked_squared_error(pred, target, visible)
        total, count = total + s, count + c
        preds.append(pred)
        targets.append(target)
    if not preds:
        return float("nan"), np.zeros((0, 0, 2)), np.zeros((0, 0, 2))
    return total / max(count, 1.0), np.concatenate(preds), np.concatenate(targets)


def batches(dataset, order: Iterable[int], batch_size: int):
    """Stack samples of ``dataset`` in ``order`` into (images, joints, visible) batches."""
    order = list(order)
    for start in range(0, len(order), batch_size):
        samples = [dataset[i] for i in order[start:start + batch_size]]
        yield tuple(np.stack(a) for a in zip(*samples))
