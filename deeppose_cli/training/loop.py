"""The one training loop, whatever framework runs it.

It owns the iteration plan, resume, the learning rate of every step, the pending losses and
their NaN guard, when checkpoints are written and validations run, progress and the run
summary. An engine (``engines/``) owns only what is its framework's: the network, one step,
its state and its files. So a resumed run is bit-identical to an uninterrupted one in both
frameworks for the same reasons: the sample of every step depends only on (seed, epoch,
index), the learning rate only on the iteration, and each engine saves its random state.

Under a launcher (docs/distributed.md) the same loop runs in every process: each process
trains on its share of every batch, the engine averages the gradients over the processes,
and process 0 alone writes the log, the checkpoints and the model, validates and publishes
the run; the others wait for it at the end, so no process leaves before the run is
published (a command chain's next stage finds it).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ..core.config import TrainConfig
from ..core.distributed import SINGLE, World, check_plan, step_seed
from ..core.errors import DeepPoseError
from ..core.schedules import schedule_from_config
from ..engines import get_engine
from .reporting import IterationPlan, TrainingReporter, validation_metrics
from .rundir import RunDirectory


def train(config: TrainConfig, train_set, val_set, run: RunDirectory, *,
          torso_pair: Sequence[int] | None, resume: bool = False, show_progress: bool = True,
          init_params: dict[str, np.ndarray] | None = None,
          world: World = SINGLE, finish: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one stage into ``run`` (checkpoints, log, final model), then call ``finish``
    (which completes and publishes the run); returns its summary: iterations, training
    images/s and the last validation's metrics. In a run of several processes (``world``)
    only process 0 writes ``run``, validates and finishes; the others wait for it."""
    if len(train_set) == 0:
        raise DeepPoseError("the training set is empty")
    plan = IterationPlan.make(len(train_set), config.batch_size, config.epochs,
                              config.max_iterations)
    check_plan(world, config.batch_size, len(train_set), plan.iterations_per_epoch)
    engine = get_engine(config.framework).Engine(config, train_set.num_joints, init_params,
                                                 world=world)
    failed = True
    try:
        summary = _train(engine, plan, config, train_set, val_set, run, torso_pair, resume,
                         show_progress, world, finish)
        failed = False
        return summary
    finally:
        if world.distributed:  # a failed process makes its launcher end the others
            engine.close(failed)


def _train(engine, plan: IterationPlan, config: TrainConfig, train_set, val_set,
           run: RunDirectory, torso_pair: Sequence[int] | None, resume: bool,
           show_progress: bool, world: World,
           finish: Callable[[], None] | None) -> dict[str, Any]:
    schedule = schedule_from_config(config, plan.total_iterations)
    writer = world.is_writer
    iteration = 0
    if resume:
        iteration = engine.load_checkpoint(run.checkpoint_path)
        if iteration > plan.total_iterations:
            raise DeepPoseError(f"{run.checkpoint_path} is at iteration {iteration}, beyond this"
                                f" run's {plan.total_iterations} iterations")
        if writer:
            run.truncate_log(iteration)

    def validate() -> dict[str, float]:
        metrics = validation_metrics(engine.predictor(), val_set, config.batch_size, torso_pair)
        reporter.validation(iteration, metrics)
        return metrics

    metrics: dict[str, float] = {}
    validates = val_set is not None and writer
    sampler = plan.sampler(len(train_set), config.batch_size, config.seed, iteration,
                           world.rank, world.size)
    with TrainingReporter(run, plan, config.batch_size, show_progress=show_progress and writer,
                          schedule=schedule, checkpoint_every=config.checkpoint_every,
                          title=f"stage {config.stage} ({config.framework})",
                          writes=writer) as reporter, \
            engine.batches(train_set, sampler) as batches:
        reporter.start(iteration)
        pending: list[Any] = []
        started = time.perf_counter()
        for batch in batches:
            iteration += 1
            engine.set_learning_rate(schedule(iteration))
            if world.distributed:
                engine.reseed(step_seed(config.seed, iteration, world.rank))
            pending.append(engine.step(batch))
            if reporter.must_read_loss(iteration):
                reporter.losses(iteration, engine.read_losses(pending))
                pending.clear()
            reporter.step_done(iteration, time.perf_counter() - started)
            if writer and iteration % config.checkpoint_every == 0:
                engine.save_checkpoint(run.checkpoint_path, iteration)
            if validates and plan.validates_at(iteration, config.val_every):
                metrics = validate()
            started = time.perf_counter()
        if iteration != plan.total_iterations:  # the sampler yields every planned batch
            raise DeepPoseError(f"the data loader ended at iteration {iteration} of "
                                f"{plan.total_iterations}")
        if validates and not metrics:  # resumed at the end: still report the model
            metrics = validate()
    if writer:
        engine.save_checkpoint(run.checkpoint_path, iteration)
        engine.write_model(run.model_path)
        if finish is not None:
            finish()
    if world.distributed:
        engine.barrier()  # the others leave once process 0 has published the run
    return {**reporter.summary(iteration), "val": metrics,
            **({"processes": world.size} if world.distributed else {})}
