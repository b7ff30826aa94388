"""``deeppose benchmark``: the Chainer-vs-PyTorch comparison, measured in one process (but
for the scaling section).

What is timed, and against what:

* compute: forward+backward+update of the training step (each engine's own ``step``, on
  the network and loss of the resolved stage-1 recipe) over batch sizes 2^0..2^k on
  device-resident random batches; beside it the autograd and the hand-written backward of a
  loss that has both; forward-only time per batch size;
* overhead: the engine's step against the same network, loss and update written with bare
  framework ops (``engines/*_reference.py``);
* pipeline: training throughput through the real data path (index -> augmentation ->
  loader/iterator -> device) next to the compute-only throughput at the same batch size;
  their ratio is the pipeline efficiency;
* cascade: predicting one image with 1..S stages (``cascade.run_cascade``) next to the sum
  of the raw forward passes it needs (1 crop, then J crops per refinement stage);
* cli: ``deeppose --help`` against ``python -c "import click, rich"``;
* scaling (only when asked: it launches real trainings): ``train-stage 1`` on 1 and on N
  processes under the framework's launcher (torchrun, mpiexec), images/s read from each
  run's log, and the efficiency N-process / (N x 1-process).

Everything framework-specific comes from the engines (``engines/``), the same objects the
training loop drives; this module does the timing, the statistics, the JSON and the charts.
Every row names the network it timed (``network``): the resolved recipe's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..engines import get_engine, get_reference
from ..core.errors import DeepPoseError
from ..core.files import atomic_write

FORMAT = "deeppose-benchmark"
# Seconds one training launched by the scaling section may take before it is stopped.
SCALING_TIMEOUT = 1800.0
# Iterations between the training log's records (TrainingReporter's log_every).
TRAINING_LOG_EVERY = 10
BACKWARDS = ("autograd", "explicit")
TARGETS = {  # name: (bound, "min" or "max")
    "pipeline_efficiency": (0.90, "min"),
    "model_vs_bare": (0.95, "min"),
    "cascade_vs_forward_sum": (1.3, "max"),
    "help_vs_import": (2.0, "max"),
}


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Repeated wall-clock measurements of one thing, in seconds.

    Ratios between two measurements use ``best`` (the fastest repetition, as ``timeit``
    advises): other work on a shared machine only ever adds time, and on these 2-core
    machines one step's time varies by up to 2x, which drowns a 5 % difference in medians.
    Medians are kept beside them.
    """

    seconds: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def best(self) -> float:
        return float(min(self.seconds))

    def to_json(self) -> dict[str, Any]:
        q1, q3 = np.percentile(self.seconds, [25, 75])
        return {"median": self.median, "q1": float(q1), "q3": float(q3),
                "min": self.best, "max": float(max(self.seconds)),
                "repeats": len(self.seconds), "seconds": [float(s) for s in self.seconds]}


# End to end (loading + step) cannot beat the step alone on fixed data; above this ratio
# (noise allowed for) a clock reading missed unfinished work, so the figure is an error.
MAX_CREDIBLE_EFFICIENCY = 1.05
EFFICIENCY_ERROR = ("measurement error: end to end faster than compute only (a clock read "
                    "before the device finished?); not a result")


def interleaved(blocks: Sequence[Callable[[], Any]], rounds: int, sync: Callable[[], None]
                ) -> list[list[float]]:
    """Time each callable once per round, alternating (ABAB...), so a machine that slows
    down or speeds up during the run affects every candidate alike. ``sync`` runs once
    before the first call and after every call: each clock reading sees finished work."""
    seconds: list[list[float]] = [[] for _ in blocks]
    sync()
    for _ in range(rounds):
        for k, fn in enumerate(blocks):
            start = time.perf_counter()
            fn()
            sync()
            seconds[k].append(time.perf_counter() - start)
    return seconds


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int,
                 sync: Callable[[], None] = lambda: None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then time ``repeats`` calls (``sync`` before
    reading the clock, so GPU work is counted)."""
    for _ in range(warmup):
        fn()
    return Timing(interleaved([fn], repeats, sync)[0])


def images_per_second(batch_size: int, seconds: float) -> float:
    return batch_size / seconds if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- settings


@dataclass
class BenchmarkSettings:
    frameworks: tuple[str, ...] = ("chainer", "pytorch")
    device: str = "cpu"
    max_batch_log2: int = 5
    repeats: int = 5
    warmup: int = 1
    # stage-1 recipe values given as train-stage flags (input_size, width, loss, ...)
    recipe: dict[str, Any] = field(default_factory=dict)
    num_joints: int | None = None    # None: the dataset's skeleton
    seed: int = 0
    dataset: str = "lsp"
    index: str | None = None          # pipeline section: training index (None: skip it)
    pipeline_iterations: int = 20
    # pipeline: one row per value; in-process loading, and workers that live for the run
    workers: tuple[int, ...] = (0, 2)
    precisions: tuple[str, ...] = ("fp32",)  # training-step arithmetic (compute: each)
    cascade_stages: int = 3
    cli_repeats: int = 5
    # scaling (only when listed): 1 process against each count, train-stage under a launcher
    processes: tuple[int, ...] = (2,)
    scaling_iterations: int = 40
    scaling_timeout: float = SCALING_TIMEOUT
    sections: tuple[str, ...] = ("compute", "overhead", "pipeline", "cascade", "cli")

    def validate(self) -> None:
        from ..core.config import parse_device
        from ..engines import check_framework

        for name in self.frameworks:
            check_framework(name)
        parse_device(self.device)
        if not self.precisions:
            raise DeepPoseError("give at least one precision")
        if not self.workers or min(self.workers) < 0:
            raise DeepPoseError("workers: give one or more counts, each at least 0")
        for name in ("repeats", "pipeline_iterations", "cascade_stages", "cli_repeats"):
            if getattr(self, name) < 1:
                raise DeepPoseError(f"{name.replace('_', '-')} must be at least 1")
        if "scaling" in self.sections:
            if not self.processes or min(self.processes) < 2:
                raise DeepPoseError("processes: give one or more counts, each at least 2")
            if self.scaling_iterations < 2 * TRAINING_LOG_EVERY:
                raise DeepPoseError(f"scaling-iterations must be at least "
                                    f"{2 * TRAINING_LOG_EVERY} (the training log writes every "
                                    f"{TRAINING_LOG_EVERY}; the first window is left out)")
        if not 0 <= self.max_batch_log2 <= 12:
            raise DeepPoseError("max-batch-log2 must be between 0 and 12")
        for framework in self.frameworks:
            train_config(self, framework)  # the recipe resolves, as train-stage would

    @property
    def batch_sizes(self) -> list[int]:
        return [2 ** n for n in range(self.max_batch_log2 + 1)]


def train_config(settings: BenchmarkSettings, framework: str, **overrides: Any):
    """The stage-1 recipe as ``train-stage`` resolves it with the same flags
    (``settings.recipe``), then the benchmark's own overrides."""
    from ..core.config import TrainConfig
    from ..core.manifests import load_stage_recipe

    recipe = load_stage_recipe(1)
    recipe.update(settings.recipe)
    recipe.update(seed=settings.seed, device=settings.device,
                  precision=settings.precisions[0])
    recipe.update(overrides)
    recipe.setdefault("workers", 0)
    return TrainConfig.from_recipe(recipe, stage=1, framework=framework,
                                   dataset=settings.dataset, train_index=settings.index or "-",
                                   out="-")


def timed_network(config) -> dict[str, Any]:
    """What a row timed: the network, loss and arithmetic of ``config``."""
    from ..core.losses import predicts_uncertainty

    return {"architecture": config.architecture, "input_size": config.input_size,
            "width": config.width, "batch_norm": config.batch_norm, "dropout": config.dropout,
            "loss": config.loss, "uncertainty": predicts_uncertainty(config.loss),
            "optimizer": config.optimizer, "precision": config.precision,
            "explicit_backward": config.explicit_backward}


def random_raw_batch(batch_size: int, config, num_joints: int, rng: np.random.Generator):
    """A random batch in the loaders' raw form (uint8 crops, per-sample scale and bias)."""
    from ..core.images import input_scale_bias
    from ..data.pipeline import RawBatch

    size = config.input_size
    scale, bias = input_scale_bias()
    return RawBatch(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
                    np.tile(scale, (batch_size, 1)), np.tile(bias, (batch_size, 1)),
                    rng.uniform(-0.5, 0.5, (batch_size, num_joints, 2)).astype(np.float32),
                    (rng.random((batch_size, num_joints)) < 0.9).astype(np.float32))


def loss_rows(config) -> list[tuple[str, bool]]:
    """(loss, hand-written backward) of the compute rows: the recipe's loss with autograd
    (what training runs), then autograd against the hand-written backward of the recipe's
    loss, or of ``l1`` where the recipe's loss has no hand-written backward."""
    from ..core.losses import EXPLICIT_NORMS

    compared = config.loss if config.loss in EXPLICIT_NORMS else "l1"
    rows = [(config.loss, False)]
    return rows + [(compared, explicit) for explicit in (False, True)
                   if (compared, explicit) not in rows]


def compute_section(settings: BenchmarkSettings, framework: str,
                    log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Step time per precision, loss and backward, and batch size; forward time per batch
    size (the recipe's network, first precision)."""
    from ..engines import ENGINES

    rng = np.random.default_rng(settings.seed)
    train_rows, forward_rows = [], []
    supported = ENGINES[framework].precisions
    precisions = [p for p in settings.precisions if p in supported]
    for skipped in sorted(set(settings.precisions) - set(precisions)):
        log(f"{framework} has no {skipped}: its {skipped} rows are left out")
    recipe_config = train_config(settings, framework)
    for precision in precisions:
        for loss, explicit in loss_rows(recipe_config):
            config = train_config(settings, framework, precision=precision, loss=loss,
                                  explicit_backward=explicit)
            engine = get_engine(framework).Engine(config, settings.num_joints)
            backward = "explicit" if explicit else "autograd"
            for batch_size in settings.batch_sizes:
                batch = engine.to_device(random_raw_batch(batch_size, config,
                                                          settings.num_joints, rng))
                timing = time_repeats(lambda: engine.step(batch), settings.repeats,
                                      settings.warmup, engine.sync)
                train_rows.append({"framework": framework, "loss": loss, "backward": backward,
                                   "precision": precision, "batch_size": batch_size,
                                   "network": timed_network(config), "time": timing.to_json(),
                                   "images_per_second": images_per_second(batch_size,
                                                                          timing.median)})
                log(f"{framework} {loss} {backward} {precision} batch {batch_size}: step "
                    f"{timing.median * 1e3:.1f} ms")
                if (loss, explicit, precision) == (recipe_config.loss, False, precisions[0]):
                    timing = time_repeats(lambda: engine.forward(batch), settings.repeats,
                                          settings.warmup, engine.sync)
                    forward_rows.append({"framework": framework, "batch_size": batch_size,
                                         "network": timed_network(config),
                                         "time": timing.to_json(),
                                         "images_per_second": images_per_second(
                                             batch_size, timing.median)})
    return train_rows, forward_rows


def overhead_section(settings: BenchmarkSettings, framework: str,
                     log: Callable[[str], None]) -> dict | None:
    """The engine's training step against the same network, loss and update written with
    bare framework ops, on the same device batches."""
    config = train_config(settings, framework)
    if framework == "chainer" and config.precision != "fp32":
        log("chainer's bare reference is fp32 only: its overhead row is left out")
        return None
    engine = get_engine(framework).Engine(config, settings.num_joints)
    bare = get_reference(framework).Reference(config, settings.num_joints)
    rng = np.random.default_rng(settings.seed)
    batch = engine.to_device(random_raw_batch(config.batch_size, config, settings.num_joints,
                                              rng))
    for _ in range(settings.warmup):
        engine.step(batch)
        bare.step(batch)
    ours_s, bare_s = interleaved([lambda: engine.step(batch), lambda: bare.step(batch)],
                                 settings.pipeline_iterations, engine.sync)
    ours_t, bare_t = Timing(ours_s), Timing(bare_s)
    row = {"framework": framework, "batch_size": config.batch_size,
           "network": timed_network(config),
           "model_time": ours_t.to_json(), "bare_time": bare_t.to_json(),
           "model_images_per_second": images_per_second(config.batch_size, ours_t.best),
           "bare_images_per_second": images_per_second(config.batch_size, bare_t.best),
           "ratio": bare_t.best / ours_t.best, "ratio_of_medians": bare_t.median / ours_t.median}
    log(f"{framework} engine step vs bare ops: {row['ratio']:.3f}")
    return row


def pipeline_section(settings: BenchmarkSettings, framework: str,
                     log: Callable[[str], None], workers: int | None = None) -> dict:
    """End-to-end training throughput on real images against compute-only throughput.

    Compute steps (one fixed device batch) and end-to-end steps (the real data path: index
    records, decoding, augmentation, the engine's loader, transfer and normalization on the
    device) alternate, so the machine's drift hits both alike; throughputs come from the
    best time per step. With ``workers`` > 0 the blocks are longer than the loader's
    prefetch, so a block of compute cannot hide loading work. The loader alone (no compute)
    is timed last, to show how much headroom the data path has.
    """
    from ..core.manifests import dataset_manifest_roots, load_dataset_manifest
    from ..training.reporting import IterationPlan
    from ..training.stages import stage1_datasets

    config = train_config(settings, framework, workers=workers or 0)
    manifest = load_dataset_manifest(settings.dataset, dataset_manifest_roots(settings.index))
    dataset, _ = stage1_datasets(config, manifest)
    engine = get_engine(framework).Engine(config, manifest.num_joints)
    block = 1 if config.workers == 0 else max(4 * config.workers, 4)
    rounds = max(1, settings.pipeline_iterations // block)
    # Enough batches for the warm-up and both timed loops, from one loader (workers start once).
    needed = 1 + 2 * max(settings.warmup, 2) + 2 * rounds * block
    per_epoch = IterationPlan.make(len(dataset), config.batch_size, 1, None).iterations_per_epoch
    sampler = IterationPlan(per_epoch, needed).sampler(len(dataset), config.batch_size,
                                                       config.seed)
    with engine.batches(dataset, sampler) as batches:
        fixed = next(batches)
        for _ in range(max(settings.warmup, 2)):
            engine.step(fixed)
            engine.step(next(batches))

        def compute_block():
            for _ in range(block):
                engine.step(fixed)

        def end_to_end_block():
            for _ in range(block):
                engine.step(next(batches))

        def loader_block():
            for _ in range(block):
                next(batches)

        compute_s, end_to_end_s = interleaved([compute_block, end_to_end_block], rounds,
                                              engine.sync)
        (loader_s,) = interleaved([loader_block], rounds, engine.sync)
    images = block * config.batch_size
    row = {"framework": framework, "batch_size": config.batch_size, "index": settings.index,
           "records": len(dataset), "workers": config.workers, "precision": config.precision,
           "network": timed_network(config), "block_iterations": block,
           "compute_time": Timing(compute_s).to_json(),
           "end_to_end_time": Timing(end_to_end_s).to_json(),
           "loader_time": Timing(loader_s).to_json()}
    for name in ("compute", "end_to_end", "loader"):
        row[f"{name}_images_per_second"] = images / row[f"{name}_time"]["min"]
    row["efficiency"] = row["end_to_end_images_per_second"] / row["compute_images_per_second"]
    row["efficiency_of_medians"] = (row["compute_time"]["median"] /
                                    row["end_to_end_time"]["median"])
    if row["efficiency"] > MAX_CREDIBLE_EFFICIENCY:
        row["invalid"] = EFFICIENCY_ERROR
    log(f"{framework} pipeline, {config.workers} workers: "
        f"{row['end_to_end_images_per_second']:.1f} img/s end to end, "
        f"{row['compute_images_per_second']:.1f} compute only, efficiency "
        f"{row['efficiency']:.3f}")
    return row


def _random_model_files(settings: BenchmarkSettings, framework: str, directory: Path,
                        stages: int) -> tuple[list[Path], dict[str, Any]]:
    """Model files of random weights (timing does not depend on them) of the recipe's
    network, written and read through the engine's own model-file functions as a trained
    cascade would be; returns the paths and their architecture."""
    from ..core.losses import predicts_uncertainty
    from ..core.weights import parameter_shapes
    from ..engines import MODEL_SUFFIX

    config = train_config(settings, framework)
    rng = np.random.default_rng(settings.seed)
    meta = {"num_joints": settings.num_joints, "input_size": config.input_size,
            "width": config.width, "batch_norm": config.batch_norm,
            "uncertainty": predicts_uncertainty(config.loss)}
    paths = []
    for stage in range(1, stages + 1):
        params = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32)
                  for name, shape in parameter_shapes(**meta).items()}
        for name in params:  # batch norm as a trained one: positive variances, unit gains
            if name.endswith(("avg_var", "gamma")):
                params[name] = np.ones_like(params[name])
        path = directory / f"stage{stage}-{framework}{MODEL_SUFFIX[framework]}"
        get_engine(framework).write_model(params, meta, path)
        paths.append(path)
    return paths, meta


def cascade_section(settings: BenchmarkSettings, framework: str, image: np.ndarray,
                    box: np.ndarray, log: Callable[[str], None]) -> list[dict]:
    """Latency of predicting one (decoded) image with 1..S stages, and the sum of the raw
    forward passes those stages need: one crop for stage 1, J crops per later stage.

    The stages are loaded through the engine's ``load_predictor``, as ``predict`` loads
    them. (Predictors return NumPy, so a GPU forward pass is complete when they return.)"""
    from ..core.cascade import StageModel, run_cascade
    from ..core.manifests import dataset_manifest_roots, load_dataset_manifest

    torso_pair = load_dataset_manifest(settings.dataset,
                                       dataset_manifest_roots(settings.index)).torso_diameter
    engine = get_engine(framework)
    with tempfile.TemporaryDirectory(prefix="deeppose-benchmark-") as tmp:
        paths, meta = _random_model_files(settings, framework, Path(tmp),
                                          settings.cascade_stages)
        stages = [StageModel(stage=k + 1, framework=framework,
                             predictor=engine.load_predictor(path, meta, settings.device),
                             # sigma changes which pixels are cropped, not how many
                             sigma=None if k == 0 else 2.0)
                  for k, path in enumerate(paths)]
    # The raw forward passes: the same stage networks on ready-made network inputs, so the
    # ratio shows what cropping, normalizing and mapping back cost on top of them.
    rng = np.random.default_rng(settings.seed)
    size = meta["input_size"]
    one = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    per_joint = rng.standard_normal((settings.num_joints, 3, size, size), dtype=np.float32)
    rows = []
    for count in range(1, settings.cascade_stages + 1):
        def predict():
            run_cascade(stages[:count], [image], box[None], torso_pair)

        def forward_passes():
            stages[0].predictor(one)
            for stage in stages[1:count]:
                stage.predictor(per_joint)

        for _ in range(settings.warmup):
            predict()
            forward_passes()
        predict_s, forward_s = interleaved([predict, forward_passes], settings.repeats,
                                           lambda: None)
        latency, forward = Timing(predict_s), Timing(forward_s)
        rows.append({"framework": framework, "stages": count, "latency": latency.to_json(),
                     "forward_time": forward.to_json(), "ratio": latency.best / forward.best,
                     "ratio_of_medians": latency.median / forward.median})
        log(f"{framework} cascade of {count}: {latency.best * 1e3:.1f} ms "
            f"(forward passes {forward.best * 1e3:.1f} ms)")
    return rows


def cli_section(settings: BenchmarkSettings, log: Callable[[str], None]) -> dict:
    """Start-up cost of ``deeppose --help`` against importing click and rich alone."""
    script = Path(sys.executable).with_name("deeppose")
    help_cmd = ([str(script), "--help"] if script.is_file() else
                [sys.executable, "-c", "from deeppose_cli.cli import run; run()", "--help"])
    import_cmd = [sys.executable, "-c", "import click, rich"]

    def runner(cmd):
        return lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)

    for cmd in (help_cmd, import_cmd):
        runner(cmd)()  # warm the file cache
    help_s, import_s = interleaved([runner(help_cmd), runner(import_cmd)], settings.cli_repeats,
                                   lambda: None)
    row = {"help_command": help_cmd, "import_command": import_cmd,
           "help_time": Timing(help_s).to_json(), "import_time": Timing(import_s).to_json()}
    row["ratio"] = Timing(help_s).best / Timing(import_s).best
    row["ratio_of_medians"] = Timing(help_s).median / Timing(import_s).median
    log(f"deeppose --help {Timing(help_s).best * 1e3:.0f} ms, import click, rich "
        f"{Timing(import_s).best * 1e3:.0f} ms")
    return row


# ----------------------------------------------------------------------------- scaling


def scaling_rows(framework: str, runs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per process count of ``framework``: what its run recorded (``runs[N]``:
    ``images_per_second``, or a ``reason`` it has none), its speed-up over one process and
    its efficiency N-process / (N x 1-process); both None where a figure is missing."""
    base = runs.get(1, {}).get("images_per_second")
    rows = []
    for processes in sorted(runs):
        row = {"framework": framework, "processes": processes, "images_per_second": None,
               **runs[processes], "speed_up": None, "efficiency": None}
        speed = row["images_per_second"]
        if speed and base:
            row["speed_up"] = speed / base
            row["efficiency"] = speed / (processes * base)
        rows.append(row)
    return rows


def throughput_from_log(records: Sequence[dict[str, Any]], batch_size: int
                        ) -> dict[str, Any] | None:
    """Training images/s from a run's log: the images of the steps between the first and
    the last training record over the time between them (the first window, which holds
    the start-up, is left out), and the run's own per-window figures. None with fewer
    than two training records."""
    rows = [r for r in records if "images_per_second" in r and "elapsed" in r]
    if len(rows) < 2 or rows[-1]["elapsed"] <= rows[0]["elapsed"]:
        return None
    first, last = rows[0], rows[-1]
    images = (last["iteration"] - first["iteration"]) * batch_size
    return {"images_per_second": images / (last["elapsed"] - first["elapsed"]),
            "measured_iterations": [first["iteration"], last["iteration"]],
            "window_images_per_second": [r["images_per_second"] for r in rows]}


def scaling_index(settings: BenchmarkSettings, directory: Path,
                  log: Callable[[str], None]) -> Path:
    """The training index the scaling runs train on: the given one when it is the synthetic
    dataset's, else the synthetic dataset rendered and indexed under ``directory``."""
    if settings.dataset == "synthetic" and settings.index:
        return Path(settings.index)
    from ..core.manifests import load_dataset_manifest
    from ..data.annotations import build_index
    from ..data.fetch import fetch_dataset

    log("scaling: rendering the synthetic dataset")
    manifest = load_dataset_manifest("synthetic")
    fetched = fetch_dataset(manifest, directory, progress=False)
    return build_index(manifest, fetched.dataset_dir).index_dir / "train.jsonl"


def scaling_command(settings: BenchmarkSettings, framework: str, processes: int,
                    index: Path, out: Path) -> list[str]:
    """``train-stage 1`` of ``framework`` on ``processes`` processes under its launcher, with
    the benchmark's recipe options, as a user would type it (DeepPoseError: the launcher
    cannot run here)."""
    from ..core.distributed import launch_command
    from ..core.settings import setting_flags

    config = train_config(settings, framework)
    device = settings.device
    if processes > 1 and device.startswith("cuda"):
        device = "cuda"  # each process takes the device of its local rank
    args = ["-m", "deeppose_cli", "train-stage", "1", "--framework", framework,
            "--dataset", "synthetic", "--train", str(index), "--out", str(out),
            "--max-iterations", str(settings.scaling_iterations),
            "--checkpoint-every", str(settings.scaling_iterations), "--seed", str(settings.seed),
            "--device", device, "--precision", config.precision, "--quiet"]
    if device == "cpu":
        args += ["--workers", "0"]
    return launch_command(framework, processes, sys.executable) + args + setting_flags(
        settings.recipe)


def scaling_environment(device: str) -> dict[str, str]:
    """The launched runs' environment: this one without a launcher's variables, this
    deeppose_cli first on the path, and one compute thread per process on the CPU."""
    from ..core.distributed import LAUNCHER_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def failure_line(output: str) -> str:
    """The one line that says why a launched run failed: its ``Error:`` line, else the last
    line it printed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def launch_run(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``command`` in its own process group; (exit status, output), or (None, output)
    when it ran past ``timeout`` seconds (then the whole group is stopped)."""
    import signal

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def scaling_run(settings: BenchmarkSettings, framework: str, processes: int, index: Path,
                out: Path) -> dict[str, Any]:
    """Launch one training run and read its images/s from what it recorded."""
    try:
        command = scaling_command(settings, framework, processes, index, out)
    except DeepPoseError as e:
        return {"reason": str(e)}
    launcher = Path(command[0]).name if framework == "chainer" else "torchrun"
    entry: dict[str, Any] = {"launcher": launcher, "command": command}
    status, output = launch_run(command, scaling_environment(settings.device),
                                settings.scaling_timeout)
    if status is None:
        return {**entry, "reason": f"stopped after {settings.scaling_timeout:.0f} s: "
                                   f"{failure_line(output)}"}
    if status != 0:
        return {**entry, "reason": f"exit status {status}: {failure_line(output)}"}
    from ..training.rundir import RunDirectory

    run = RunDirectory(out)
    try:
        meta, recipe, log = run.meta(), json.loads(run.recipe_path.read_text()), \
            run.read_log()
    except (OSError, ValueError, DeepPoseError) as e:
        return {**entry, "reason": f"the run's record is unreadable: {e}"}
    recorded = meta.get("processes", 1)
    if recorded != processes:
        return {**entry, "reason": f"the run says it trained on {recorded} processes"}
    measured = throughput_from_log(log, recipe["batch_size"])
    if measured is None:
        return {**entry, "reason": "the run's log has fewer than two training records"}
    return {**entry, **measured, "batch_size": recipe["batch_size"],
            "batch_size_per_process": meta.get("batch_size_per_process",
                                                recipe["batch_size"])}


def scaling_section(settings: BenchmarkSettings, framework: str, index: Path,
                    directory: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Training images/s of ``framework`` on 1 and on each of ``settings.processes``
    processes, each a real ``train-stage 1`` under the framework's launcher."""
    runs = {}
    for processes in sorted({1, *settings.processes}):
        run = scaling_run(settings, framework, processes, index,
                          directory / f"{framework}-{processes}")
        runs[processes] = run
        what = (f"{run['images_per_second']:.1f} images/s" if run.get("images_per_second")
                else run["reason"])
        log(f"{framework} on {processes} process{'es' if processes > 1 else ''}: {what}")
    rows = scaling_rows(framework, runs)
    network = timed_network(train_config(settings, framework))
    for row in rows:
        row["network"] = network
    return rows


# ----------------------------------------------------------------------------- whole run


def environment() -> dict[str, Any]:
    from .info import describe_environment

    info = dict(describe_environment())
    info.update({"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS",
                                                            "MKL_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")
                                 if k in os.environ}})
    return info


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark with the measured value and whether it is met."""
    values: list[tuple[str, str, float]] = []
    for row in result.get("pipeline", []):
        values.append(("pipeline_efficiency", f"{row['framework']}, {row['workers']} workers",
                       row["efficiency"]))
    for row in result.get("overhead", []):
        values.append(("model_vs_bare", row["framework"], row["ratio"]))
    for row in result.get("cascade", []):
        stages = f"{row['stages']} stage{'s' if row['stages'] > 1 else ''}"
        values.append(("cascade_vs_forward_sum", f"{row['framework']}, {stages}",
                       row["ratio"]))
    if result.get("cli"):
        values.append(("help_vs_import", "cli", result["cli"]["ratio"]))
    out = []
    for name, what, value in values:
        bound, kind = TARGETS[name]
        met = value >= bound if kind == "min" else value <= bound
        entry = {"target": name, "what": what, "value": value,
                 "bound": f"{'>=' if kind == 'min' else '<='} {bound}", "met": bool(met)}
        if name == "pipeline_efficiency" and value > MAX_CREDIBLE_EFFICIENCY:
            entry.update(met=False, invalid=EFFICIENCY_ERROR)
        out.append(entry)
    return out


def load_sample_image(index: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The first record's image and person box, or a blank 480x640 image when there is no
    index (latency does not depend on the pixels)."""
    from ..core.geometry import box_from_xywh

    if index:
        from ..data.annotations import read_index
        from ..core.images import read_rgb

        record = read_index(Path(index))[0]
        return read_rgb(record.image), np.asarray(record.box, dtype=np.float64)
    return np.zeros((480, 640, 3), np.uint8), box_from_xywh(160, 0, 320, 480)


def run_benchmark(settings: BenchmarkSettings,
                  log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every section of the benchmark in this process; returns the JSON-ready result."""
    settings.validate()
    if settings.num_joints is None:
        from dataclasses import replace

        from ..core.manifests import dataset_manifest_roots, load_dataset_manifest

        settings = replace(settings, num_joints=load_dataset_manifest(
            settings.dataset, dataset_manifest_roots(settings.index)).num_joints)
    result: dict[str, Any] = {"format": FORMAT, "version": 1,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "settings": asdict(settings), "environment": environment(),
                              "compute": [], "forward": [], "overhead": [], "pipeline": [],
                              "cascade": [], "cli": None, "scaling": []}
    for framework in settings.frameworks:
        get_engine(framework).check_device(settings.device)
    if "pipeline" in settings.sections and not settings.index:
        raise DeepPoseError("the pipeline section needs a training index (--index FILE or "
                            "--dataset NAME with an index), or leave it out with --skip pipeline")
    image, box = (load_sample_image(settings.index) if "cascade" in settings.sections
                  else (None, None))
    for framework in settings.frameworks:
        if "compute" in settings.sections:
            train_rows, forward_rows = compute_section(settings, framework, log)
            result["compute"] += train_rows
            result["forward"] += forward_rows
        if "overhead" in settings.sections:
            row = overhead_section(settings, framework, log)
            result["overhead"] += [row] if row else []
        if "pipeline" in settings.sections:
            for workers in settings.workers:
                result["pipeline"].append(pipeline_section(settings, framework, log, workers))
        if "cascade" in settings.sections:
            result["cascade"] += cascade_section(settings, framework, image, box, log)
    if "cli" in settings.sections:
        result["cli"] = cli_section(settings, log)
    if "scaling" in settings.sections:
        with tempfile.TemporaryDirectory(prefix="deeppose-scaling-") as directory:
            index = scaling_index(settings, Path(directory) / "data", log)
            for framework in settings.frameworks:
                result["scaling"] += scaling_section(settings, framework, index,
                                                     Path(directory), log)
    result["targets"] = targets(result)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


# ----------------------------------------------------------------------------- charts


def plot_charts(result: dict[str, Any], directory: Path) -> list[Path]:
    """``compute-time.png`` (step and forward time against batch size, per framework) and
    ``autograd-vs-explicit.png`` (the two loss backwards side by side), like the
    comparison articles' figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    rows = result.get("compute", [])
    if not rows:
        return written
    frameworks = sorted({r["framework"] for r in rows})

    fig, (ax_train, ax_fwd) = plt.subplots(1, 2, figsize=(11, 4.2))
    for framework in frameworks:
        mine = [r for r in rows if r["framework"] == framework
                and (r["loss"], r["backward"]) == (r["network"]["loss"], "autograd")
                and r["precision"] == rows[0]["precision"]]
        _errorbar(ax_train, mine, framework)
        _errorbar(ax_fwd, [r for r in result.get("forward", []) if r["framework"] == framework],
                  framework)
    for ax, title in ((ax_train, "forward + backward + update"), (ax_fwd, "forward only")):
        _batch_axes(ax, title)
    fig.suptitle(_device_title(result))
    fig.tight_layout()
    written.append(_save(fig, directory / "compute-time.png"))

    fig, axes = plt.subplots(1, len(frameworks), figsize=(5.5 * len(frameworks), 4.2),
                             squeeze=False)
    for ax, framework in zip(axes[0], frameworks):
        mine = [r for r in rows if r["framework"] == framework
                and r["precision"] == rows[0]["precision"]]
        compared = next((r["loss"] for r in mine if r["backward"] == "explicit"), None)
        for backward in BACKWARDS:
            _errorbar(ax, [r for r in mine if (r["loss"], r["backward"]) == (compared, backward)],
                      backward)
        _batch_axes(ax, f"{framework}: {compared} loss, autograd vs explicit backward")
    fig.suptitle(_device_title(result))
    fig.tight_layout()
    written.append(_save(fig, directory / "autograd-vs-explicit.png"))
    plt.close("all")
    return written


def _errorbar(ax, rows: Iterable[dict], label: str) -> None:
    rows = sorted(rows, key=lambda r: r["batch_size"])
    if not rows:
        return
    x = [r["batch_size"] for r in rows]
    median = np.array([r["time"]["median"] for r in rows])
    low = median - np.array([r["time"]["min"] for r in rows])
    high = np.array([r["time"]["max"] for r in rows]) - median
    ax.errorbar(x, median, yerr=[low, high], marker="o", capsize=3, label=label)


def _batch_axes(ax, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("seconds per batch (median, min-max)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)


def _device_title(result: dict[str, Any]) -> str:
    network = result["compute"][0]["network"]
    return (f"AlexNet {network['input_size']} px, width {network['width']}, "
            f"device {result['settings']['device']}, "
            f"{result['environment'].get('cpu_count')} CPUs")


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


# ----------------------------------------------------------------------------- report


@dataclass
class ReportTable:
    """One table of the benchmark report: typed here, drawn by the CLI."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    right_from: int = 1  # columns from this one on are numbers (right-justified)
    alert_column: int | None = None  # a column whose "no"/"invalid…" cells are failures


def _ms(timing: dict[str, Any]) -> str:
    return f"{timing['median'] * 1e3:.1f} (±{(timing['q3'] - timing['q1']) * 5e2:.1f})"


def report_tables(result: dict[str, Any]) -> list[ReportTable | str]:
    """The report of a benchmark result, section by section: tables and one-line notes."""
    out: list[ReportTable | str] = []
    if result.get("compute"):
        columns = list(dict.fromkeys((r["framework"], r["loss"], r["backward"], r["precision"])
                                     for r in result["compute"]))
        frameworks = list(dict.fromkeys(c[0] for c in columns))
        networks = {r["framework"]: r["network"] for r in result["compute"]}
        out.append("timed network: " + "; ".join(
            f"{f}: AlexNet {n['input_size']} px, width {n['width']}, batch norm "
            f"{'on' if n['batch_norm'] else 'off'}, dropout {n['dropout']}, loss {n['loss']}, "
            f"{n['optimizer']}" for f, n in networks.items()))
        table = ReportTable("Step time, ms per batch: median (± half IQR); images/s",
                            ["batch"] + [f"{f} {loss} {b}" + ("" if p == "fp32" else f" {p}")
                                         for f, loss, b, p in columns]
                            + [f"{f} forward" for f in frameworks], [], right_from=0)
        for size in sorted({r["batch_size"] for r in result["compute"]}):
            cells = [str(size)]
            for column in columns:
                row = next(r for r in result["compute"]
                           if (r["framework"], r["loss"], r["backward"], r["precision"],
                               r["batch_size"]) == (*column, size))
                cells.append(f"{_ms(row['time'])}; {row['images_per_second']:.1f}")
            for framework in frameworks:
                row = next(r for r in result["forward"]
                           if (r["framework"], r["batch_size"]) == (framework, size))
                cells.append(f"{_ms(row['time'])}; {row['images_per_second']:.1f}")
            table.rows.append(cells)
        out.append(table)
    if result.get("overhead"):
        out.append(ReportTable(
            "Training step: project model vs bare framework ops (images/s from the best step)",
            ["framework", "batch", "model", "bare ops", "ratio", "ratio of medians"],
            [[r["framework"], str(r["batch_size"]), f"{r['model_images_per_second']:.1f}",
              f"{r['bare_images_per_second']:.1f}", f"{r['ratio']:.3f}",
              f"{r['ratio_of_medians']:.3f}"] for r in result["overhead"]]))
    if result.get("pipeline"):
        out.append(ReportTable(
            "Training throughput on real images (images/s from the best step)",
            ["framework", "batch", "workers", "precision", "end to end", "compute only",
             "loader only", "efficiency", "of medians"],
            [[r["framework"], str(r["batch_size"]), str(r["workers"]),
              r.get("precision", "fp32"),
              f"{r['end_to_end_images_per_second']:.1f}",
              f"{r['compute_images_per_second']:.1f}", f"{r['loader_images_per_second']:.1f}",
              f"{r['efficiency']:.3f}" + (" (invalid)" if r.get("invalid") else ""),
              f"{r['efficiency_of_medians']:.3f}"] for r in result["pipeline"]]))
    if result.get("cascade"):
        out.append(ReportTable(
            "Predict one image: cascade latency vs its raw forward passes (ms)",
            ["framework", "stages", "predict (median)", "predict (best)",
             "forward passes (best)", "ratio", "of medians"],
            [[r["framework"], str(r["stages"]), _ms(r["latency"]),
              f"{r['latency']['min'] * 1e3:.1f}", f"{r['forward_time']['min'] * 1e3:.1f}",
              f"{r['ratio']:.3f}", f"{r['ratio_of_medians']:.3f}"] for r in result["cascade"]]))
    if result.get("cli"):
        cli = result["cli"]
        out.append(f"deeppose --help: {_ms(cli['help_time'])} ms; python -c \"import click, "
                   f"rich\": {_ms(cli['import_time'])} ms; ratio of best runs {cli['ratio']:.2f}")
    if result.get("scaling"):
        out.append(ReportTable(
            "Training on several processes: images/s of each run (from its log), efficiency "
            "N-process / (N x 1-process)",
            ["framework", "processes", "images/s", "speed-up", "efficiency"],
            [[r["framework"], str(r["processes"]),
              "-" if r["images_per_second"] is None else f"{r['images_per_second']:.1f}",
              "-" if r["speed_up"] is None else f"{r['speed_up']:.2f}x",
              "-" if r["efficiency"] is None else f"{r['efficiency']:.0%}"]
             for r in result["scaling"]]))
        out += [f"{r['framework']} on {r['processes']} process"
                f"{'es' if r['processes'] > 1 else ''}: no figure ({r['reason']})"
                for r in result["scaling"] if r.get("reason")]
    if result.get("targets"):
        out.append(ReportTable(
            "Targets", ["target", "what", "measured", "bound", "met"],
            [[t["target"], t["what"], f"{t['value']:.3f}", t["bound"],
              f"invalid: {t['invalid']}" if t.get("invalid") else ("yes" if t["met"] else "no")]
             for t in result["targets"]], right_from=99, alert_column=4))
    return out
