"""The one training loop, whatever framework runs it.

It owns the iteration plan, resume, the learning rate of every step, the pending losses and
their NaN guard, when checkpoints are written and validations run, progress and the run
summary. An engine (``engines/``) owns only what is its framework's: the network, one step,
its state and its files. So a resumed run is bit-identical to an uninterrupted one in both
frameworks for the same reasons: the sample of every step depends only on (seed, epoch,
index), the learning rate only on the iteration, and each engine saves its random state.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import DeepPoseError
from ..core.schedules import schedule_from_config
from ..engines import get_engine
from .reporting import IterationPlan, TrainingReporter, validation_metrics
from .rundir import RunDirectory


def train(config: TrainConfig, train_set, val_set, run: RunDirectory, *,
          torso_pair: Sequence[int] | None, resume: bool = False, show_progress: bool = True,
          init_params: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train one stage into ``run`` (checkpoints, log, final model); returns its summary:
    iterations, training images/s and the last validation's metrics."""
    if len(train_set) == 0:
        raise DeepPoseError("the training set is empty")
    engine = get_engine(config.framework).Engine(config, train_set.num_joints, init_params)
    plan = IterationPlan.make(len(train_set), config.batch_size, config.epochs,
                              config.max_iterations)
    schedule = schedule_from_config(config, plan.total_iterations)
    iteration = 0
    if resume:
        iteration = engine.load_checkpoint(run.checkpoint_path)
        if iteration > plan.total_iterations:
            raise DeepPoseError(f"{run.checkpoint_path} is at iteration {iteration}, beyond this"
                                f" run's {plan.total_iterations} iterations")
        run.truncate_log(iteration)

    def validate() -> dict[str, float]:
        metrics = validation_metrics(engine.predictor(), val_set, config.batch_size, torso_pair)
        reporter.validation(iteration, metrics)
        return metrics

    metrics: dict[str, float] = {}
    sampler = plan.sampler(len(train_set), config.batch_size, config.seed, iteration)
    with TrainingReporter(run, plan, config.batch_size, show_progress=show_progress,
                          schedule=schedule, checkpoint_every=config.checkpoint_every,
                          title=f"stage {config.stage} ({config.framework})") as reporter, \
            engine.batches(train_set, sampler) as batches:
        reporter.start(iteration)
        pending: list[Any] = []
        started = time.perf_counter()
        for batch in batches:
            iteration += 1
            engine.set_learning_rate(schedule(iteration))
            pending.append(engine.step(batch))
            if reporter.must_read_loss(iteration):
                reporter.losses(iteration, engine.read_losses(pending))
                pending.clear()
            reporter.step_done(iteration, time.perf_counter() - started)
            if iteration % config.checkpoint_every == 0:
                engine.save_checkpoint(run.checkpoint_path, iteration)
            if val_set is not None and plan.validates_at(iteration, config.val_every):
                metrics = validate()
            started = time.perf_counter()
        if iteration != plan.total_iterations:  # the sampler yields every planned batch
            raise DeepPoseError(f"the data loader ended at iteration {iteration} of "
                                f"{plan.total_iterations}")
        if val_set is not None and not metrics:  # resumed at the end: still report the model
            metrics = validate()
    engine.save_checkpoint(run.checkpoint_path, iteration)
    engine.write_model(run.model_path)
    return {**reporter.summary(iteration), "val": metrics}
