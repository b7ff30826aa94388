"""Training a cascade stage end to end: from a resolved recipe to a finished run directory.

This module prepares the data (stage-1 person crops, or a refinement stage's simulated
boxes) and the run directory, hands both to the one training loop (``loop.py``), and
publishes the result; ``rundir.py`` holds the run directory and its lock, ``reporting.py``
the log, progress and validation.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..engines import check_framework, check_precision, get_engine
from ..core.config import TrainConfig
from ..core.distributed import SINGLE, World, check_launcher, discover, process_device
from ..core.errors import DeepPoseError
from ..core.files import make_directory, os_error_reason, sha256_of
from ..core.losses import predicts_uncertainty
from ..engines import MODEL_SUFFIX
from .loop import train
from .rundir import (RunDirectory, RunLock, is_run_directory, publish_run, resume_directory,
                     staging_path)


def stage1_datasets(config: TrainConfig, manifest):
    """Training (augmented) and validation (plain) datasets of a stage-1 run."""
    from ..data.annotations import read_index
    from ..data.pipeline import Augmentation, ImageCache, PoseDataset

    train_records = read_index(Path(config.train_index), manifest.num_joints)
    require_visible_joints(train_records, config)
    aug = Augmentation.from_recipe(config.to_json())
    images = ImageCache.of_gib(config.image_cache_gib)
    tail = jitter_off_epoch(config.to_json(), len(train_records))
    train_set = PoseDataset(train_records, config.input_size, manifest.flip_permutation, aug,
                            seed=config.seed, images=images, jitter_off_epoch=tail)
    val_set = None
    if config.val_index:
        val_set = PoseDataset(read_index(Path(config.val_index), manifest.num_joints),
                              config.input_size,
                              manifest.flip_permutation, Augmentation.none(), seed=config.seed,
                              images=images)
    return train_set, val_set


def require_visible_joints(records: Sequence[Any], config: TrainConfig) -> None:
    """Refuse a training index without one visible joint: the masked loss would be zero at
    every step, and the run would "converge" to whatever it started from."""
    if config.use_visibility and not any(bool(r.visible.any()) for r in records):
        raise DeepPoseError(f"{config.train_index}: no record has a visible joint, so there is "
                            "nothing to train on (check the visible flags: 1 = visible)")


def jitter_off_epoch(recipe: dict[str, Any], num_samples: int) -> int | None:
    """The epoch from which a run of ``recipe`` on ``num_samples`` samples trains without
    geometric jitter (``jitter_off_fraction``), from the plan every engine follows."""
    from .reporting import IterationPlan

    plan = IterationPlan.make(num_samples, int(recipe["batch_size"]), int(recipe["epochs"]),
                              recipe.get("max_iterations"))
    return plan.tail_start_epoch(float(recipe.get("jitter_off_fraction", 0.0)))


def resolve_train_config(stage: int, framework: str, *, out: str | None = None,
                         dataset: str | None = None, default_dataset: str = "lsp",
                         index_dir_of: Callable[[str], Path], train_index: str | None = None,
                         val_index: str | None = None, previous: str | None = None,
                         chained_run: Path | None = None, resume: bool = False,
                         overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a ``train-stage`` call: the stage recipe (with ``resume``,
    the run's saved recipe, so it continues exactly what was started), then the flags given,
    then what the call leaves unsaid taken from the dataset's index directory
    (``index_dir_of(dataset)``) and, for stage >= 2, from the run the command chain just
    trained (``chained_run``) or else the latest finished run of the stage before."""
    from ..core.manifests import load_stage_recipe
    from .runs import latest_run

    given = dict(overrides or {})
    out = out or str(Path("runs") / (dataset or default_dataset) / f"stage{stage}-{framework}")
    saved = resume_directory(Path(out)) / "recipe.json"
    if resume and saved.is_file():
        saved_recipe = json.loads(saved.read_text())
        dataset = dataset or saved_recipe["dataset"]
        train_index = train_index or saved_recipe["train_index"]
        val_index = val_index or saved_recipe.get("val_index")
        previous = previous or saved_recipe.get("previous")
        identity = {"stage", "framework", "dataset", "train_index", "out", "val_index",
                    "previous", *PROCESS_KEYS}
        recipe = {k: v for k, v in saved_recipe.items() if k not in identity}
    else:
        recipe = load_stage_recipe(stage)
        dataset = dataset or default_dataset
    if train_index is None:
        index_dir = index_dir_of(dataset)
        train_index = str(index_dir / "train.jsonl")
        if not Path(train_index).is_file():
            raise DeepPoseError(f"{train_index} not found: run `deeppose fetch {dataset} index "
                                f"{dataset}` first, or pass --train FILE")
        if val_index is None and (index_dir / "val.jsonl").is_file():
            val_index = str(index_dir / "val.jsonl")
    if stage >= 2 and previous is None:
        if chained_run is not None and RunDirectory(chained_run).meta()["stage"] == stage - 1:
            previous = str(chained_run)
        else:
            previous = str(latest_run(dataset=dataset, stage=stage - 1))
    recipe.update(given)
    if stage >= 2 and not resume:
        recipe = inherit_architecture(recipe, RunDirectory(previous).meta(), given)
    config = TrainConfig.from_recipe(recipe, stage=stage, framework=check_framework(framework),
                                     dataset=dataset, train_index=train_index,
                                     val_index=val_index, out=out, previous=previous)
    check_precision(config.framework, config.precision)
    return config


def inherit_architecture(recipe: dict[str, Any], previous_meta: dict[str, Any],
                         given: dict[str, Any]) -> dict[str, Any]:
    """A refinement recipe that starts from the previous stage's weights (``init =
    "previous"``) takes that stage's network (input size, width, batch norm) unless the
    command line set them: the weights only fit the network they were trained in."""
    if recipe.get("init") != "previous":
        return recipe
    # Runs from before batch norm had none; from before the key, every run was an AlexNet.
    previous = {"batch_norm": False, "architecture": "alexnet", **previous_meta}
    inherited = {key: previous[key] for key in ("architecture", "input_size", "width", "batch_norm")
                 if key in previous and key not in given}
    return {**recipe, **inherited}


def augmentation_preview_dataset(index_file: Path, recipe: dict[str, Any], manifest):
    """Stage-1 training samples of ``index_file`` augmented as ``recipe`` says."""
    from ..data.annotations import read_index
    from ..data.pipeline import Augmentation, PoseDataset

    records = read_index(Path(index_file), manifest.num_joints)
    return PoseDataset(records, int(recipe["input_size"]), manifest.flip_permutation,
                       Augmentation.from_recipe(recipe), seed=int(recipe.get("seed", 0)),
                       jitter_off_epoch=jitter_off_epoch(recipe, len(records)))


# What a run of several processes adds to recipe.json and run.json (docs/distributed.md);
# absent: one process.
PROCESS_KEYS = ("processes", "batch_size_per_process")


def process_record(config: TrainConfig, world: World) -> dict[str, Any]:
    """The processes a run trained on and the share of ``--batch-size`` (the global batch)
    each one took (the largest, when it does not divide evenly)."""
    if not world.distributed:
        return {}
    return {"processes": world.size,
            "batch_size_per_process": -(-config.batch_size // world.size)}


def base_meta(config: TrainConfig, manifest) -> dict[str, Any]:
    return {
        "format": "deeppose-run",
        "framework": config.framework,
        "stage": config.stage,
        "dataset": manifest.name,
        # where a generated dataset's manifest lives, for evaluate and predict to find it
        "manifest": str(Path(manifest.path).resolve()) if manifest.path else None,
        "num_joints": manifest.num_joints,
        "joint_names": list(manifest.joint_names),
        "architecture": config.architecture,
        "input_size": config.input_size,
        "width": config.width,
        "batch_norm": config.batch_norm,
        "uncertainty": predicts_uncertainty(config.loss),
        "model_file": f"model{MODEL_SUFFIX[config.framework]}",
        "complete": False,
    }


def prepare_run(config: TrainConfig, resume: bool, world: World = SINGLE) -> RunDirectory:
    """Create (or, with ``resume``, reopen) the directory this run trains in and save the
    resolved recipe there.

    A fresh run into a directory that already holds a run trains beside it, in ``OUT.next``,
    and :func:`publish_run` swaps it in only once it has succeeded: a run that fails or is
    interrupted never costs the earlier model. The device is checked first. A process of a
    distributed run other than process 0 touches nothing (it only reads the checkpoint it
    resumes from).
    """
    get_engine(config.framework).check_device(process_device(world, config.device))
    out = Path(config.out)
    if resume:
        run = RunDirectory(resume_directory(out), config.framework)
        if not run.checkpoint_path.is_file():
            raise DeepPoseError(f"--resume: no checkpoint in {run.path}")
    elif not world.is_writer:
        return RunDirectory(out, config.framework)
    else:
        work = out
        if out.exists() and not out.is_dir():
            raise DeepPoseError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not is_run_directory(out):
                raise DeepPoseError(f"{out} exists and is not a deeppose run directory")
            work = staging_path(out)
            if work.exists():  # an unfinished earlier replacement that this run supersedes
                try:
                    shutil.rmtree(work)
                except OSError as e:
                    raise DeepPoseError(f"cannot remove {work}: {os_error_reason(e)}") from None
        run = RunDirectory(work, config.framework)
    if world.is_writer:
        make_directory(run.path)
        run.write_json("recipe.json", {**config.to_json(), **process_record(config, world)})
    return run


def resume_hint(config: TrainConfig) -> str:
    """What to run after an interruption, for the message the CLI prints."""
    staged = staging_path(Path(config.out))
    work = staged if staged.is_dir() else Path(config.out)  # where this run was training
    if RunDirectory(work, config.framework).checkpoint_path.is_file():
        return (f"continue from its last checkpoint with: deeppose train-stage {config.stage} "
                f"--framework {config.framework} --resume --out {config.out}")
    return (f"no checkpoint was written yet (one every {config.checkpoint_every} iterations), "
            "so there is nothing to resume; any earlier run in --out is unchanged")


def train_stage1(config: TrainConfig, resume: bool = False, show_progress: bool = True,
                 world: World = SINGLE) -> tuple[RunDirectory, dict[str, Any]]:
    """Train a stage-1 regressor; returns the run directory and the loop's summary."""
    from ..core.geometry import normalize_pose
    from ..core.manifests import dataset_manifest_roots, load_dataset_manifest
    from ..core.metrics import mean_normalized_pose

    manifest = load_dataset_manifest(config.dataset, dataset_manifest_roots(config.train_index))
    train_set, val_set = stage1_datasets(config, manifest)
    init_params = init_parameters(config, resume, manifest.num_joints)
    run = prepare_run(config, resume, world)
    records = train_set.records
    normalized = normalize_pose(np.stack([r.joints for r in records]),
                                np.stack([r.box for r in records]))
    meta = base_meta(config, manifest)
    meta["mean_pose"] = mean_normalized_pose(
        normalized, np.stack([r.visible for r in records])).round(6).tolist()
    meta["torso_pair"] = list(manifest.torso_diameter)
    return run_training(config, train_set, val_set, run, meta, manifest, resume, show_progress,
                        init_params, world)


def init_parameters(config: TrainConfig, resume: bool,
                    num_joints: int) -> dict[str, np.ndarray] | None:
    """The weights of ``--init`` (read, and checked to fit the network, before the run
    directory is touched), or None; a resumed run's checkpoint already holds its weights."""
    if not config.init or resume:
        return None
    from ..engines.base import check_init_parameters
    from .runs import initial_parameters

    if config.init == "previous":  # a refinement stage starting from the stage it refines
        if not config.previous:
            raise DeepPoseError("--init previous needs a previous stage (stage 2 or later)")
        params = initial_parameters(config.previous)
    else:
        params = initial_parameters(config.init)
    check_init_parameters(params, config, num_joints)
    return params


def run_training(config: TrainConfig, train_set, val_set, run: RunDirectory, meta: dict[str, Any],
                manifest, resume: bool, show_progress: bool,
                init_params: dict[str, np.ndarray] | None = None, world: World = SINGLE
                ) -> tuple[RunDirectory, dict[str, Any]]:
    """Hand the datasets to the training loop, then mark the run complete.

    run.json is written before training (so a crashed run is recognisable) and again with
    ``complete`` and the model checksum only once the model file exists; in a run of
    several processes, by process 0 alone, which also publishes the run.
    """
    meta = {**meta, **process_record(config, world)}
    if world.is_writer:
        run.write_json("run.json", meta)
    finished: dict[str, Any] = {}

    def finish() -> None:  # process 0, once the model is written; the others wait for it
        # The same figure for both frameworks: the loss of the last logged window.
        losses = [r["loss"] for r in run.read_log() if "loss" in r]
        finished["final_loss"] = float(losses[-1]) if losses else float("nan")
        meta["complete"] = True
        meta["model_sha256"] = sha256_of(run.model_path)
        run.write_json("run.json", meta)
        run.plot_loss()
        finished["run"] = publish_run(run, Path(config.out))

    summary = train(config, train_set, val_set, run, torso_pair=manifest.torso_diameter,
                    resume=resume, show_progress=show_progress, init_params=init_params,
                    world=world, finish=finish)
    if not world.is_writer:
        return RunDirectory(Path(config.out), config.framework), summary
    summary["final_loss"] = finished["final_loss"]
    return finished["run"], summary


def refinement_datasets(config: TrainConfig, manifest, stats, train_records, val_records):
    """Simulated training (augmented, fresh draws per epoch) and validation (fixed draws)
    samples of a refinement stage."""
    from ..data.refinement import RefinementDataset
    from ..data.pipeline import Augmentation, ImageCache

    aug = Augmentation.from_recipe(config.to_json())
    common = dict(stats=stats, sigma=config.sigma, input_size=config.input_size,
                  flip_permutation=manifest.flip_permutation,
                  torso_pair=manifest.torso_diameter, seed=config.seed,
                  images=ImageCache.of_gib(config.image_cache_gib))
    train_set = RefinementDataset(train_records, aug=aug,
                                  samples_per_image=config.samples_per_image,
                                  train_joints=config.refine_joints,
                                  sampling=config.displacement_sampling, **common)
    train_set.jitter_off_epoch = jitter_off_epoch(config.to_json(), len(train_set))
    val_set = (RefinementDataset(val_records, sampling=config.displacement_sampling, **common)
               if val_records else None)
    return train_set, val_set


def train_refinement_stage(config: TrainConfig, resume: bool = False, show_progress: bool = True,
                           world: World = SINGLE) -> tuple[RunDirectory, dict[str, Any]]:
    """Train stage ``config.stage`` >= 2 on top of the run ``config.previous`` (stages
    1..N-1, of either framework)."""
    from ..data.annotations import read_index
    from ..core.cascade import DisplacementStatistics
    from ..core.manifests import dataset_manifest_roots, load_dataset_manifest
    from .runs import copy_chain

    if not config.previous:
        raise DeepPoseError(f"stage {config.stage} needs --previous RUN_DIR of stage {config.stage - 1}")
    previous = Path(config.previous)
    previous_meta = RunDirectory(previous).meta()
    if previous_meta["stage"] != config.stage - 1:
        raise DeepPoseError(f"--previous {previous} is a stage-{previous_meta['stage']} run; "
                            f"stage {config.stage} refines a stage-{config.stage - 1} run")
    manifest = load_dataset_manifest(config.dataset, dataset_manifest_roots(config.train_index))
    train_records = read_index(Path(config.train_index), manifest.num_joints)
    require_visible_joints(train_records, config)
    val_records = (read_index(Path(config.val_index), manifest.num_joints)
                   if config.val_index else [])
    if config.displacement_source == "val" and not val_records:
        raise DeepPoseError("--displacement-source val needs a validation index (--val FILE)")
    init_params = init_parameters(config, resume, manifest.num_joints)
    run = prepare_run(config, resume, world)

    stats_path = run.path / "displacement.json"
    if resume and stats_path.is_file():
        stats = DisplacementStatistics.from_json(json.loads(stats_path.read_text()))
    else:
        source_records, source_index = ((val_records, config.val_index)
                                        if config.displacement_source == "val"
                                        else (train_records, config.train_index))
        # every process measures them (the same numbers); process 0 records them
        stats = measure_displacements(previous, source_records, manifest,
                                      process_device(world, config.device))
        if world.is_writer:
            run.write_json("displacement.json", {
                **stats.to_json(), "source": config.displacement_source,
                "index": str(source_index), "images": len(source_records),
                "rms": stats.rms().round(4).tolist()})

    meta = base_meta(config, manifest)
    if world.is_writer:  # the others write no run.json
        meta.update({"sigma": config.sigma, "torso_pair": list(manifest.torso_diameter),
                     "chain": copy_chain(previous, run)})
        first = RunDirectory(run.path / meta["chain"][0]["dir"]).meta()
        meta["mean_pose"] = first["mean_pose"]
    train_set, val_set = refinement_datasets(config, manifest, stats, train_records, val_records)
    return run_training(config, train_set, val_set, run, meta, manifest, resume, show_progress,
                        init_params, world)


def measure_displacements(previous: Path, records, manifest, device: str):
    """Displacement statistics of the cascade ``previous`` (stages 1..N-1) on ``records``."""
    from ..core.cascade import displacement_statistics, record_diameters, run_cascade_on_records
    from .runs import load_cascade

    stages, _ = load_cascade(previous, device)
    predictions = run_cascade_on_records(stages, records, manifest.torso_diameter)[-1]
    return displacement_statistics(
        predictions, np.stack([r.joints for r in records]),
        np.stack([r.visible for r in records]),
        record_diameters(records, manifest.torso_diameter))


def train_stage(config: TrainConfig, resume: bool = False, show_progress: bool = True
                ) -> tuple[RunDirectory, dict[str, Any]]:
    """Train cascade stage ``config.stage`` (1: from person crops, >= 2: refinement), holding
    the lock on ``config.out`` for the whole run.

    Started by a launcher on several processes (docs/distributed.md), every process trains
    and process 0 alone holds the lock and writes the run."""
    world = discover()
    check_launcher(world, config.framework)
    with RunLock(Path(config.out)) if world.is_writer else contextlib.nullcontext():
        if config.stage == 1:
            return train_stage1(config, resume, show_progress, world)
        return train_refinement_stage(config, resume, show_progress, world)
