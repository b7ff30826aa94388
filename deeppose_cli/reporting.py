"""What both backends' loops report through: the iteration plan, the JSONL log with its NaN
guard and progress bar, and the validation metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import DeepPoseError
from .pipeline import RunSampler
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
        epoch and at its last iteration. Both backends ask this, so their logs line up."""
        return (iteration % (self.iterations_per_epoch * max(1, int(val_every))) == 0
                or iteration == self.total_iterations)

    def sampler(self, num_samples: int, batch_size: int, seed: int,
                first_iteration: int = 0) -> RunSampler:
        """The batch keys of this plan's iterations after ``first_iteration``: what both
        backends' loaders follow."""
        return RunSampler(num_samples, batch_size, seed, self.iterations_per_epoch,
                          self.total_iterations, first_iteration)


class TrainingReporter:
    """Progress bars, the JSONL log and the NaN guard, shared by both backends."""

    def __init__(self, run: RunDirectory, plan: IterationPlan, batch_size: int,
                 log_every: int = 10, show_progress: bool = True,
                 schedule: Callable[[int], float] | None = None,
                 checkpoint_every: int | None = None):
        self.run = run
        self.schedule = schedule
        self.plan = plan
        self.batch_size = batch_size
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.show_progress = show_progress
        self._progress = None
        self._window: list[float] = []
        self._start = time.perf_counter()
        self._last_time = self._start
        self._last_iteration = 0
        self.images_per_second = float("nan")

    def __enter__(self) -> "TrainingReporter":
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  disable=not self.show_progress, transient=False)
        self._progress.__enter__()
        epochs = math.ceil(self.plan.total_iterations / self.plan.iterations_per_epoch)
        self._epoch_task = self._progress.add_task("epoch", total=epochs, status="")
        self._iter_task = self._progress.add_task("iteration", total=self.plan.total_iterations,
                                                  status="")
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, iteration: int) -> None:
        """Called once, with the iteration a (resumed) run starts after."""
        self._last_iteration = iteration
        self._last_time = time.perf_counter()
        self._progress.update(self._iter_task, completed=iteration)
        self._progress.update(self._epoch_task,
                              completed=iteration // self.plan.iterations_per_epoch)

    def must_read_loss(self, iteration: int) -> bool:
        """Whether the loop reads its pending losses after ``iteration``: at every log line,
        epoch end (validation), checkpoint and at the last iteration. In between the losses
        stay where they were computed, so an accelerator never waits for the host, and no
        checkpoint is written before its losses passed the NaN guard."""
        return (iteration % self.log_every == 0 or iteration == self.plan.total_iterations
                or iteration % self.plan.iterations_per_epoch == 0
                or (self.checkpoint_every is not None and iteration % self.checkpoint_every == 0))

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
        epoch = self.plan.epoch_of(iteration)
        if values:
            self._progress.update(self._iter_task, completed=iteration,
                                  status=f"loss {float(values[-1]):.4g}  "
                                         f"{self.images_per_second:.1f} img/s")
        self._progress.update(self._epoch_task, completed=iteration // self.plan.iterations_per_epoch)
        if iteration % self.log_every == 0 or iteration == self.plan.total_iterations:
            now = time.perf_counter()
            images = (iteration - self._last_iteration) * self.batch_size
            self.images_per_second = images / max(now - self._last_time, 1e-9)
            self.run.append_log({
                "iteration": iteration, "epoch": epoch + 1,
                "loss": float(np.mean(self._window)),
                **({"lr": self.schedule(iteration)} if self.schedule else {}),
                "elapsed": round(now - self._start, 3),
                "images_per_second": round(self.images_per_second, 2),
            })
            self._window.clear()
            self._last_time, self._last_iteration = now, iteration

    def validation(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, "epoch": self.plan.epoch_of(iteration) + 1,
                  "elapsed": round(time.perf_counter() - self._start, 3)}
        record.update({f"val_{k}": v for k, v in metrics.items()})
        self.run.append_log(record)
        text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self._progress.console.print(f"[bold]validation[/] iteration {iteration}: {text}")


def masked_squared_error(pred: np.ndarray, target: np.ndarray,
                         visible: np.ndarray) -> tuple[float, float]:
    """(sum of squared 2-D errors over visible joints, number of visible joints) in NumPy:
    the pose loss of both backends, summed so batches can be pooled exactly."""
    mask = np.asarray(visible, dtype=np.float64)
    sq = ((np.asarray(pred, np.float64).reshape(target.shape) - target) ** 2).sum(-1)
    return float((np.where(mask > 0, sq, 0.0)).sum()), float(mask.sum())


def validation_metrics(predict_normalized: Callable[[np.ndarray], np.ndarray], dataset,
             batch_size: int, torso_pair: Sequence[int] | None = None) -> dict[str, float]:
    """Validation metrics of a regressor (normalized-coordinates in, (N, J, 2) out).

    Always the loss. A stage-1 dataset (person boxes, no flips) adds PDJ@0.2 in image pixels.
    A refinement dataset adds the stage's error in torso diameters at the simulated
    displacements (``err``) beside keeping the box centre (``err_none``), the fraction of
    crops it moved closer (``closer``), and its error on crops centred on the true joints
    (``err_centred``): the precision it can give when the previous stage was right.
    """
    from .geometry import denormalize_pose
    from .metrics import pdj

    loss, pred, target = _predict_dataset(predict_normalized, dataset, batch_size)
    metrics = {"loss": loss}
    records = getattr(dataset, "records", None)
    if records is not None and torso_pair is not None and not dataset.aug.flip:
        boxes = np.stack([r.box for r in records])
        pred_px = denormalize_pose(pred, boxes)
        gt = np.stack([r.joints for r in records])
        vis = np.stack([r.visible for r in records])
        metrics["pdj@0.2"] = pdj(pred_px, gt, vis, torso_pair).at(0.2)[0]
    if hasattr(dataset, "joint_of") and len(dataset):
        from .cascade import refinement_errors

        joints = np.array([dataset.joint_of(k) for k in range(len(dataset))])
        metrics.update(refinement_errors(pred, target, joints, dataset.sigma))
        centred = dataset.centred()
        _, pred_c, target_c = _predict_dataset(predict_normalized, centred, batch_size)
        metrics["err_centred"] = refinement_errors(pred_c, target_c, joints,
                                                   dataset.sigma)["err"]
    return metrics


def _predict_dataset(predict_normalized, dataset, batch_size: int):
    """(masked mean squared error, predictions, targets) over a whole dataset."""
    total, count = 0.0, 0.0
    preds, targets = [], []
    for images, target, visible in batches(dataset, range(len(dataset)), batch_size):
        pred = np.asarray(predict_normalized(images)).reshape(target.shape)
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


