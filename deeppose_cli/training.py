"""Framework-free side of training: recipes, run directories, data, logging, validation.

A backend (``backends/torch_backend.py``, ``backends/chainer_backend.py``) receives a
:class:`TrainConfig`, the datasets, a :class:`RunDirectory` and a :class:`TrainingReporter`,
and adds only the model, loss, optimizer loop and save/load. Everything both frameworks need
(what a run directory holds, the log format, NaN handling, validation metrics) lives here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .files import atomic_write, atomic_write_text, sha256_of
from .errors import DeepPoseError

FRAMEWORKS = ("chainer", "pytorch")
# Where a refinement stage's displacement statistics come from: the previous stages'
# predictions on the training split (which they have seen) or on the validation split.
DISPLACEMENT_SOURCES = ("train", "val")
MODEL_SUFFIX = {"pytorch": ".pt", "chainer": ".npz"}


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
    explicit_backward: bool = False
    loss: str = "l2"
    use_visibility: bool = True
    checkpoint_every: int = 500
    jitter_translation: float = 0.05
    jitter_scale: float = 0.1
    flip: bool = True
    colour_noise: float = 0.1
    rotation: float = 0.0
    occlusion: float = 0.0
    outside_joints: str = "keep"
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
        if self.framework not in FRAMEWORKS:
            raise DeepPoseError(f"framework must be one of {', '.join(FRAMEWORKS)}")
        if self.optimizer not in ("MomentumSGD", "Adam"):
            raise DeepPoseError(f"optimizer must be MomentumSGD or Adam, got {self.optimizer!r}")
        for name in ("lr", "batch_size", "epochs", "input_size", "width", "checkpoint_every"):
            if not getattr(self, name) > 0:
                raise DeepPoseError(f"{name.replace('_', '-')} must be positive")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise DeepPoseError("max-iterations must be at least 1")
        if self.stage >= 2 and not (self.sigma and self.sigma > 0):
            raise DeepPoseError("sigma must be positive for refinement stages")
        from .losses import check_norm

        check_norm(self.loss)
        if self.displacement_source not in DISPLACEMENT_SOURCES:
            raise DeepPoseError(f"displacement-source must be one of "
                                f"{', '.join(DISPLACEMENT_SOURCES)}, got {self.displacement_source!r}")
        from .cascade import DISPLACEMENT_SAMPLING, REFINE_JOINTS

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
        from .pipeline import Augmentation
        from .schedules import LearningRateSchedule

        Augmentation.from_recipe(self.to_json())
        LearningRateSchedule(self.lr, 1, self.lr_schedule, self.lr_warmup, self.lr_final_ratio)
        parse_device(self.device)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", -1); ``cuda`` / ``cuda:N`` -> ("cuda", N)."""
    if device == "cpu":
        return "cpu", -1
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise DeepPoseError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def run_meta_problem(meta: Any) -> str | None:
    """What makes a parsed run.json unusable (None when the keys every reader needs are
    there), so a damaged or foreign file gets one clear line rather than a KeyError later."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, found {type(meta).__name__}"
    if meta.get("framework") not in FRAMEWORKS:
        return f"framework must be one of {', '.join(FRAMEWORKS)}, found {meta.get('framework')!r}"
    stage = meta.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 1:
        return f"stage must be a positive integer, found {stage!r}"
    if not isinstance(meta.get("model_file"), str) or "/" in meta["model_file"] \
            or "\\" in meta["model_file"] or meta["model_file"] in ("", ".", ".."):
        return f"model_file must be a file name, found {meta.get('model_file')!r}"
    for key in ("num_joints", "input_size"):
        if key in meta and (not isinstance(meta[key], int) or meta[key] < 1):
            return f"{key} must be a positive integer, found {meta[key]!r}"
    chain = meta.get("chain", [])
    if not isinstance(chain, list) or not all(
            isinstance(e, dict) and isinstance(e.get("dir"), str) for e in chain):
        return "chain must be a list of {\"dir\": ...} entries"
    return None


class RunDirectory:
    """The files of one training run::

        recipe.json     resolved TrainConfig
        run.json        what inference needs: framework, stage, model file, joints, mean pose,
                        and for stage >= 2 sigma, displacement statistics and the earlier stages
        log.jsonl       one record per logged iteration / validation
        loss.png        loss curve
        checkpoint.*    latest checkpoint (model + optimizer + iteration), written atomically
        model.*         final model in the framework's native format (.pt / .npz)
    """

    def __init__(self, path: Path | str, framework: str | None = None):
        self.path = Path(path)
        self.framework = framework

    @property
    def suffix(self) -> str:
        return MODEL_SUFFIX[self.framework or self.meta()["framework"]]

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.json"

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / f"checkpoint{self.suffix}"

    @property
    def model_path(self) -> Path:
        return self.path / f"model{self.suffix}"

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2) + "\n")

    def meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            raise DeepPoseError(f"{self.path} is not a deeppose run directory (no run.json)")
        try:
            meta = json.loads(self.meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeepPoseError(f"{self.meta_path} is corrupt: {e}") from None
        problem = run_meta_problem(meta)
        if problem:
            raise DeepPoseError(f"{self.meta_path} is not a valid run description: {problem}")
        return meta

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def truncate_log(self, iteration: int) -> None:
        """Drop log records after ``iteration`` (a resumed run redoes them)."""
        kept = [r for r in self.read_log() if r.get("iteration", 0) <= iteration]
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot_loss(self) -> Path | None:
        records = self.read_log()
        train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
        val = [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]
        if not train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("masked MSE (normalized coordinates)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(self.path.name)
        fig.tight_layout()
        target = self.path / "loss.png"
        atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        return target


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


class TrainingReporter:
    """Progress bars, the JSONL log and the NaN guard, shared by both backends."""

    def __init__(self, run: RunDirectory, plan: IterationPlan, batch_size: int,
                 log_every: int = 10, show_progress: bool = True,
                 schedule: Callable[[int], float] | None = None):
        self.run = run
        self.schedule = schedule
        self.plan = plan
        self.batch_size = batch_size
        self.log_every = log_every
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

    def iteration(self, iteration: int, loss: float) -> None:
        """Record one optimizer step; stops training on a non-finite loss."""
        if not math.isfinite(loss):
            last = self.run.checkpoint_path if self.run.checkpoint_path.exists() else None
            kept = f"; last good checkpoint kept: {last}" if last else "; no checkpoint was written"
            raise DeepPoseError(f"loss became {loss} at iteration {iteration}: training stopped"
                                f" (try a lower --lr){kept}")
        self._window.append(loss)
        epoch = self.plan.epoch_of(iteration)
        self._progress.update(self._iter_task, completed=iteration,
                              status=f"loss {loss:.4g}  {self.images_per_second:.1f} img/s")
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


def validate(predict_normalized: Callable[[np.ndarray], np.ndarray], dataset,
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


def backend_for(framework: str):
    """The backend module of ``framework`` (imported only when needed: each pulls in its
    framework)."""
    if framework == "pytorch":
        from .backends import torch_backend

        return torch_backend
    if framework == "chainer":
        from .backends import chainer_backend

        return chainer_backend
    raise DeepPoseError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")


def stage1_datasets(config: TrainConfig, manifest):
    """Training (augmented) and validation (plain) datasets of a stage-1 run."""
    from .annotations import read_index
    from .pipeline import Augmentation, PoseDataset

    train_records = read_index(Path(config.train_index), manifest.num_joints)
    aug = Augmentation.from_recipe(config.to_json())
    train_set = PoseDataset(train_records, config.input_size, manifest.flip_permutation, aug,
                            seed=config.seed)
    val_set = None
    if config.val_index:
        val_set = PoseDataset(read_index(Path(config.val_index), manifest.num_joints),
                              config.input_size,
                              manifest.flip_permutation, Augmentation.none(), seed=config.seed)
    return train_set, val_set


def inherit_architecture(recipe: dict[str, Any], previous_meta: dict[str, Any],
                         given: dict[str, Any]) -> dict[str, Any]:
    """A refinement recipe that starts from the previous stage's weights (``init =
    "previous"``) takes that stage's network (input size, width, batch norm) unless the
    command line set them: the weights only fit the network they were trained in."""
    if recipe.get("init") != "previous":
        return recipe
    previous = {"batch_norm": False, **previous_meta}  # runs from before batch norm had none
    inherited = {key: previous[key] for key in ("input_size", "width", "batch_norm")
                 if key in previous and key not in given}
    return {**recipe, **inherited}


def augmentation_preview_dataset(index_file: Path, recipe: dict[str, Any], manifest):
    """Stage-1 training samples of ``index_file`` augmented as ``recipe`` says."""
    from .annotations import read_index
    from .pipeline import Augmentation, PoseDataset

    return PoseDataset(read_index(Path(index_file), manifest.num_joints),
                       int(recipe["input_size"]),
                       manifest.flip_permutation, Augmentation.from_recipe(recipe),
                       seed=int(recipe.get("seed", 0)))


def base_meta(config: TrainConfig, manifest) -> dict[str, Any]:
    return {
        "format": "deeppose-run",
        "framework": config.framework,
        "stage": config.stage,
        "dataset": manifest.name,
        "num_joints": manifest.num_joints,
        "joint_names": list(manifest.joint_names),
        "input_size": config.input_size,
        "width": config.width,
        "batch_norm": config.batch_norm,
        "model_file": f"model{MODEL_SUFFIX[config.framework]}",
        "complete": False,
    }


def staging_path(out: Path) -> Path:
    """Where a run that replaces the run at ``out`` trains until it has succeeded."""
    out = Path(out)
    return out.with_name(out.name + ".next")


def resume_directory(out: Path) -> Path:
    """The directory ``--resume --out OUT`` continues: an unfinished replacement of OUT
    (``OUT.next``) when there is one with a checkpoint, else OUT itself."""
    out = Path(out)
    staged = staging_path(out)
    if any((staged / f"checkpoint{suffix}").is_file() for suffix in MODEL_SUFFIX.values()):
        return staged
    return out


def _is_run_directory(path: Path) -> bool:
    return any((path / name).is_file() for name in
               ("run.json", "recipe.json", *(f"checkpoint{s}" for s in MODEL_SUFFIX.values())))


def prepare_run(config: TrainConfig, resume: bool) -> RunDirectory:
    """Create (or, with ``resume``, reopen) the directory this run trains in and save the
    resolved recipe there.

    A fresh run into a directory that already holds a run trains beside it, in ``OUT.next``,
    and :func:`publish_run` swaps it in only once it has succeeded: a run that fails or is
    interrupted never costs the earlier model. The device is checked first.
    """
    backend_for(config.framework).check_device(config.device)
    out = Path(config.out)
    if resume:
        run = RunDirectory(resume_directory(out), config.framework)
        if not run.checkpoint_path.is_file():
            raise DeepPoseError(f"--resume: no checkpoint in {run.path}")
    else:
        work = out
        if out.exists() and not out.is_dir():
            raise DeepPoseError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not _is_run_directory(out):
                raise DeepPoseError(f"{out} exists and is not a deeppose run directory")
            work = staging_path(out)
            if work.exists():  # an unfinished earlier replacement that this run supersedes
                shutil.rmtree(work)
        run = RunDirectory(work, config.framework)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("recipe.json", config.to_json())
    return run


def publish_run(run: RunDirectory, out: Path) -> RunDirectory:
    """Put a finished run at ``out``: a run trained beside an earlier one (``OUT.next``)
    replaces it now, and only now."""
    out = Path(out)
    if run.path.resolve() == out.resolve():
        return run
    retired = out.with_name(f".{out.name}.replaced")
    if retired.exists():
        shutil.rmtree(retired)
    if out.exists():
        os.rename(out, retired)
    os.rename(run.path, out)
    shutil.rmtree(retired, ignore_errors=True)
    return RunDirectory(out, run.framework)


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


class RunLock:
    """Exclusive use of one ``--out`` by one training process.

    An advisory ``flock`` on ``.OUT.lock`` beside the run directory (beside, so swapping the
    directory in :func:`publish_run` never moves it). The kernel drops the lock when its
    process ends however it ends, so there are no stale locks to clean up. The file names
    the holder, which the refusal of a second run quotes.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise DeepPoseError(f"{self.out} is in use by another training run ({holder}); "
                                "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(["deeppose", *sys.argv[1:]])[:300]
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: "
                     f"{command}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def resume_hint(config: TrainConfig) -> str:
    """What to run after an interruption, for the message the CLI prints."""
    staged = staging_path(Path(config.out))
    work = staged if staged.is_dir() else Path(config.out)  # where this run was training
    if RunDirectory(work, config.framework).checkpoint_path.is_file():
        return (f"continue from its last checkpoint with: deeppose train-stage {config.stage} "
                f"--framework {config.framework} --resume --out {config.out}")
    return (f"no checkpoint was written yet (one every {config.checkpoint_every} iterations), "
            "so there is nothing to resume; any earlier run in --out is unchanged")


def train_stage1(config: TrainConfig, resume: bool = False,
                 show_progress: bool = True) -> tuple[RunDirectory, dict[str, Any]]:
    """Train a stage-1 regressor; returns the run directory and the backend's summary."""
    from .geometry import normalize_pose
    from .manifests import load_dataset_manifest
    from .metrics import mean_normalized_pose

    manifest = load_dataset_manifest(config.dataset)
    train_set, val_set = stage1_datasets(config, manifest)
    init_params = init_parameters(config, resume)
    run = prepare_run(config, resume)
    records = train_set.records
    normalized = normalize_pose(np.stack([r.joints for r in records]),
                                np.stack([r.box for r in records]))
    meta = base_meta(config, manifest)
    meta["mean_pose"] = mean_normalized_pose(
        normalized, np.stack([r.visible for r in records])).round(6).tolist()
    meta["torso_pair"] = list(manifest.torso_diameter)
    return run_backend(config, train_set, val_set, run, meta, manifest, resume, show_progress,
                       init_params)


def init_parameters(config: TrainConfig, resume: bool) -> dict[str, np.ndarray] | None:
    """The weights of ``--init`` (read before the run directory is touched), or None; a
    resumed run's checkpoint already holds its weights."""
    if not config.init or resume:
        return None
    from .runs import initial_parameters

    if config.init == "previous":  # a refinement stage starting from the stage it refines
        if not config.previous:
            raise DeepPoseError("--init previous needs a previous stage (stage 2 or later)")
        return initial_parameters(config.previous)
    return initial_parameters(config.init)


def apply_init_parameters(load: Callable[[Any, dict], None], model: Any, config: TrainConfig,
                          init_params: dict[str, np.ndarray] | None) -> None:
    """Load ``--init`` weights into a backend's fresh model with ``load`` (its
    ``load_numpy_params``), or say in one line why they do not fit."""
    if init_params is None:
        return
    try:
        load(model, init_params)
    except DeepPoseError as e:
        raise DeepPoseError(f"--init {config.init} does not fit this network (input size "
                            f"{config.input_size}, width {config.width}, batch norm "
                            f"{config.batch_norm}): {e}") from None


def run_backend(config: TrainConfig, train_set, val_set, run: RunDirectory, meta: dict[str, Any],
                manifest, resume: bool, show_progress: bool,
                init_params: dict[str, np.ndarray] | None = None
                ) -> tuple[RunDirectory, dict[str, Any]]:
    """Hand the datasets to the framework's backend, then mark the run complete.

    run.json is written before training (so a crashed run is recognisable) and again with
    ``complete`` and the model checksum only once the model file exists.
    """
    run.write_json("run.json", meta)
    summary = backend_for(config.framework).train(
        config, train_set, val_set, run, torso_pair=manifest.torso_diameter, resume=resume,
        show_progress=show_progress, init_params=init_params)
    meta["complete"] = True
    meta["model_sha256"] = sha256_of(run.model_path)
    run.write_json("run.json", meta)
    run.plot_loss()
    return publish_run(run, Path(config.out)), summary


def refinement_datasets(config: TrainConfig, manifest, stats, train_records, val_records):
    """Simulated training (augmented, fresh draws per epoch) and validation (fixed draws)
    samples of a refinement stage."""
    from .cascade import RefinementDataset
    from .pipeline import Augmentation

    aug = Augmentation.from_recipe(config.to_json())
    common = dict(stats=stats, sigma=config.sigma, input_size=config.input_size,
                  flip_permutation=manifest.flip_permutation,
                  torso_pair=manifest.torso_diameter, seed=config.seed)
    train_set = RefinementDataset(train_records, aug=aug,
                                  samples_per_image=config.samples_per_image,
                                  train_joints=config.refine_joints,
                                  sampling=config.displacement_sampling, **common)
    val_set = (RefinementDataset(val_records, sampling=config.displacement_sampling, **common)
               if val_records else None)
    return train_set, val_set


def train_refinement_stage(config: TrainConfig, resume: bool = False, show_progress: bool = True
                           ) -> tuple[RunDirectory, dict[str, Any]]:
    """Train stage ``config.stage`` >= 2 on top of the run ``config.previous`` (stages
    1..N-1, of either framework)."""
    from .annotations import read_index
    from .cascade import DisplacementStatistics
    from .manifests import load_dataset_manifest
    from .runs import copy_chain

    if not config.previous:
        raise DeepPoseError(f"stage {config.stage} needs --previous RUN_DIR of stage {config.stage - 1}")
    previous = Path(config.previous)
    previous_meta = RunDirectory(previous).meta()
    if previous_meta["stage"] != config.stage - 1:
        raise DeepPoseError(f"--previous {previous} is a stage-{previous_meta['stage']} run; "
                            f"stage {config.stage} refines a stage-{config.stage - 1} run")
    manifest = load_dataset_manifest(config.dataset)
    train_records = read_index(Path(config.train_index), manifest.num_joints)
    val_records = (read_index(Path(config.val_index), manifest.num_joints)
                   if config.val_index else [])
    if config.displacement_source == "val" and not val_records:
        raise DeepPoseError("--displacement-source val needs a validation index (--val FILE)")
    init_params = init_parameters(config, resume)
    run = prepare_run(config, resume)

    stats_path = run.path / "displacement.json"
    if resume and stats_path.is_file():
        stats = DisplacementStatistics.from_json(json.loads(stats_path.read_text()))
    else:
        source_records, source_index = ((val_records, config.val_index)
                                        if config.displacement_source == "val"
                                        else (train_records, config.train_index))
        stats = measure_displacements(previous, source_records, manifest, config.device)
        run.write_json("displacement.json", {
            **stats.to_json(), "source": config.displacement_source,
            "index": str(source_index), "images": len(source_records),
            "rms": stats.rms().round(4).tolist()})

    meta = base_meta(config, manifest)
    meta.update({"sigma": config.sigma, "torso_pair": list(manifest.torso_diameter),
                 "chain": copy_chain(previous, run)})
    first = RunDirectory(run.path / meta["chain"][0]["dir"]).meta()
    meta["mean_pose"] = first["mean_pose"]
    train_set, val_set = refinement_datasets(config, manifest, stats, train_records, val_records)
    return run_backend(config, train_set, val_set, run, meta, manifest, resume, show_progress,
                       init_params)


def measure_displacements(previous: Path, records, manifest, device: str):
    """Displacement statistics of the cascade ``previous`` (stages 1..N-1) on ``records``."""
    from .cascade import displacement_statistics, record_diameters, run_cascade_on_records
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
    the lock on ``config.out`` for the whole run."""
    with RunLock(Path(config.out)):
        if config.stage == 1:
            return train_stage1(config, resume, show_progress)
        return train_refinement_stage(config, resume, show_progress)
