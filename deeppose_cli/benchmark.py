"""``deeppose benchmark``: the Chainer-vs-PyTorch comparison, measured in one process.

What is timed, and against what:

* compute: forward+backward+update of the training step (``train_step`` of each backend)
  over batch sizes 2^0..2^k on device-resident random batches, for the autograd and the
  hand-written loss backward; forward-only time per batch size;
* overhead: the project's step against the same network written with bare framework ops;
* pipeline: training throughput through the real data path (index -> augmentation ->
  loader/iterator -> device) next to the compute-only throughput at the same batch size;
  their ratio is the pipeline efficiency;
* cascade: predicting one image with 1..S stages (``cascade.run_cascade``) next to the sum
  of the raw forward passes it needs (1 crop, then J crops per refinement stage);
* cli: ``deeppose --help`` against ``python -c "import click, rich"``.

Everything framework-specific comes from a backend's ``Harness`` (``backends/*_bench.py``);
this module does the timing, the statistics, the JSON and the charts.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .backends import get_harness
from .errors import DeepPoseError
from .files import atomic_write

FORMAT = "deeppose-benchmark"
LOSSES = ("autograd", "explicit")
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
    input_size: int = 227
    width: float = 1.0
    num_joints: int = 14
    seed: int = 0
    dataset: str = "lsp"
    index: str | None = None          # pipeline section: training index (None: skip it)
    pipeline_batch: int = 32
    pipeline_iterations: int = 20
    # pipeline: one row per value; in-process loading, and workers that live for the run
    workers: tuple[int, ...] = (0, 2)
    precisions: tuple[str, ...] = ("fp32",)  # training-step arithmetic (compute: each)
    cascade_stages: int = 3
    cli_repeats: int = 5
    sections: tuple[str, ...] = ("compute", "overhead", "pipeline", "cascade", "cli")

    def validate(self) -> None:
        from .backends import FRAMEWORKS
        from .config import parse_device

        for name in self.frameworks:
            if name not in FRAMEWORKS:
                raise DeepPoseError(f"framework must be one of {', '.join(FRAMEWORKS)}, "
                                    f"got {name!r}")
        parse_device(self.device)
        from .config import PRECISIONS

        for name in self.precisions:
            if name not in PRECISIONS:
                raise DeepPoseError(f"precision must be one of {', '.join(PRECISIONS)}, "
                                    f"got {name!r}")
        if not self.precisions:
            raise DeepPoseError("give at least one precision")
        if not self.workers or min(self.workers) < 0:
            raise DeepPoseError("workers: give one or more counts, each at least 0")
        for name in ("repeats", "pipeline_batch", "pipeline_iterations", "cascade_stages",
                     "cli_repeats", "input_size"):
            if getattr(self, name) < 1:
                raise DeepPoseError(f"{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.max_batch_log2 <= 12:
            raise DeepPoseError("max-batch-log2 must be between 0 and 12")

    @property
    def batch_sizes(self) -> list[int]:
        return [2 ** n for n in range(self.max_batch_log2 + 1)]


def train_config(settings: BenchmarkSettings, framework: str, explicit: bool = False,
                 batch_size: int | None = None, precision: str | None = None,
                 workers: int | None = None):
    """The stage-1 recipe as training would resolve it, with the benchmark's overrides."""
    from .config import TrainConfig
    from .losses import EXPLICIT_NORMS
    from .manifests import load_stage_recipe

    recipe = load_stage_recipe(1)
    if recipe["loss"] not in EXPLICIT_NORMS:
        # Both loss rows time one loss, the recipe's if it has a hand-written backward: l1,
        # not the laplace loss, which differs only by a few elementwise operations.
        recipe["loss"] = "l1"
    recipe.update(input_size=settings.input_size, width=settings.width, seed=settings.seed,
                  device=settings.device, explicit_backward=explicit,
                  batch_size=batch_size or settings.pipeline_batch,
                  precision=precision or settings.precisions[0])
    if workers is not None:
        recipe["workers"] = workers
    return TrainConfig.from_recipe(recipe, stage=1, framework=framework,
                                   dataset=settings.dataset, train_index=settings.index or "-",
                                   out="-")


def random_batch(batch_size: int, settings: BenchmarkSettings, rng: np.random.Generator):
    images = rng.standard_normal((batch_size, 3, settings.input_size, settings.input_size),
                                 dtype=np.float32)
    joints = rng.uniform(-0.5, 0.5, (batch_size, settings.num_joints, 2)).astype(np.float32)
    visible = (rng.random((batch_size, settings.num_joints)) < 0.9).astype(np.float32)
    return images, joints, visible


# ----------------------------------------------------------------------------- sections


def compute_section(settings: BenchmarkSettings, framework: str,
                    log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Step time per precision, loss implementation and batch size; forward time per batch
    size (fp32)."""
    rng = np.random.default_rng(settings.seed)
    train_rows, forward_rows = [], []
    precisions = settings.precisions
    if framework == "chainer" and "bf16" in precisions:
        log("chainer has no bfloat16: its bf16 rows are left out")
        precisions = tuple(p for p in precisions if p != "bf16")
    for precision, loss in [(p, loss) for p in precisions for loss in LOSSES]:
        harness = get_harness(framework)(train_config(settings, framework, loss == "explicit",
                                                      precision=precision),
                                           settings.num_joints)
        for batch_size in settings.batch_sizes:
            batch = harness.batch(*random_batch(batch_size, settings, rng))
            timing = time_repeats(lambda: harness.step(batch), settings.repeats,
                                  settings.warmup, harness.sync)
            train_rows.append({"framework": framework, "loss": loss, "precision": precision,
                               "batch_size": batch_size,
                               "time": timing.to_json(),
                               "images_per_second": images_per_second(batch_size,
                                                                      timing.median)})
            log(f"{framework} {loss} {precision} batch {batch_size}: step "
                f"{timing.median * 1e3:.1f} ms")
            if loss == "autograd" and not any(r["batch_size"] == batch_size
                                              for r in forward_rows):
                timing = time_repeats(lambda: harness.forward(batch), settings.repeats,
                                      settings.warmup, harness.sync)
                forward_rows.append({"framework": framework, "batch_size": batch_size,
                                     "time": timing.to_json(),
                                     "images_per_second": images_per_second(batch_size,
                                                                            timing.median)})
    return train_rows, forward_rows


def overhead_section(settings: BenchmarkSettings, framework: str,
                     log: Callable[[str], None]) -> dict:
    """The project's training step against bare framework ops for the same network."""
    config = train_config(settings, framework)
    cls = get_harness(framework)
    ours, bare = cls(config, settings.num_joints), cls(config, settings.num_joints, bare=True)
    rng = np.random.default_rng(settings.seed)
    data = random_batch(settings.pipeline_batch, settings, rng)
    ours_batch, bare_batch = ours.batch(*data), bare.batch(*data)
    for _ in range(settings.warmup):
        ours.step(ours_batch)
        bare.step(bare_batch)
    ours_s, bare_s = interleaved([lambda: ours.step(ours_batch), lambda: bare.step(bare_batch)],
                                 settings.pipeline_iterations, ours.sync)
    ours_t, bare_t = Timing(ours_s), Timing(bare_s)
    row = {"framework": framework, "batch_size": settings.pipeline_batch,
           "model_time": ours_t.to_json(), "bare_time": bare_t.to_json(),
           "model_images_per_second": images_per_second(settings.pipeline_batch, ours_t.best),
           "bare_images_per_second": images_per_second(settings.pipeline_batch, bare_t.best),
           "ratio": bare_t.best / ours_t.best, "ratio_of_medians": bare_t.median / ours_t.median}
    log(f"{framework} model vs bare ops: {row['ratio']:.3f}")
    return row


def pipeline_section(settings: BenchmarkSettings, framework: str,
                     log: Callable[[str], None], workers: int | None = None) -> dict:
    """End-to-end training throughput on real images against compute-only throughput.

    Compute steps (one fixed device batch) and end-to-end steps (the real data path: index
    records, decoding, augmentation, the backend's loader, transfer) alternate, so the
    machine's drift hits both alike; throughputs come from the best time per step. With
    ``workers`` > 0 the blocks are longer than the loader's prefetch, so a block of compute
    cannot hide loading work. The loader alone (no compute) is timed last, to show how much
    headroom the data path has.
    """
    from .manifests import load_dataset_manifest
    from .training import stage1_datasets

    config = train_config(settings, framework, workers=workers)
    manifest = load_dataset_manifest(settings.dataset)
    dataset, _ = stage1_datasets(config, manifest)
    harness = get_harness(framework)(config, manifest.num_joints)
    block = 1 if config.workers == 0 else max(4 * config.workers, 4)
    rounds = max(1, settings.pipeline_iterations // block)
    # Enough batches for the warm-up and both timed loops, from one loader (workers start once).
    batches = harness.pipeline(dataset, 1 + 2 * max(settings.warmup, 2) + 2 * rounds * block)
    try:
        fixed = next(batches)
        for _ in range(max(settings.warmup, 2)):
            harness.step(fixed)
            harness.step(next(batches))

        def compute_block():
            for _ in range(block):
                harness.step(fixed)

        def end_to_end_block():
            for _ in range(block):
                harness.step(next(batches))

        def loader_block():
            for _ in range(block):
                next(batches)

        compute_s, end_to_end_s = interleaved([compute_block, end_to_end_block], rounds,
                                              harness.sync)
        (loader_s,) = interleaved([loader_block], rounds, harness.sync)
    finally:
        batches.close()
    images = block * config.batch_size
    row = {"framework": framework, "batch_size": config.batch_size, "index": settings.index,
           "records": len(dataset), "workers": config.workers, "precision": config.precision,
           "block_iterations": block,
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
                        stages: int) -> list[Path]:
    """Model files of random weights (timing does not depend on them), written and read
    through the backend's own model-file functions as a trained cascade would be."""
    from .backends import MODEL_SUFFIX, get_backend
    from .weights import parameter_shapes

    rng = np.random.default_rng(settings.seed)
    meta = {"num_joints": settings.num_joints, "input_size": settings.input_size,
            "width": settings.width}
    paths = []
    for stage in range(1, stages + 1):
        params = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32)
                  for name, shape in parameter_shapes(**meta).items()}
        path = directory / f"stage{stage}-{framework}{MODEL_SUFFIX[framework]}"
        get_backend(framework).write_model(params, meta, path)
        paths.append(path)
    return paths


def cascade_section(settings: BenchmarkSettings, framework: str, image: np.ndarray,
                    box: np.ndarray, log: Callable[[str], None]) -> list[dict]:
    """Latency of predicting one (decoded) image with 1..S stages, and the sum of the raw
    forward passes those stages need: one crop for stage 1, J crops per later stage.

    The stages are loaded through the backend's ``load_regressor``, as ``predict`` loads
    them. (Regressors return NumPy, so a GPU forward pass is complete when they return.)"""
    from .cascade import StageModel, run_cascade
    from .manifests import load_dataset_manifest
    from .backends import get_backend

    torso_pair = load_dataset_manifest(settings.dataset).torso_diameter
    meta = {"num_joints": settings.num_joints, "input_size": settings.input_size,
            "width": settings.width}
    backend = get_backend(framework)
    with tempfile.TemporaryDirectory(prefix="deeppose-benchmark-") as tmp:
        paths = _random_model_files(settings, framework, Path(tmp), settings.cascade_stages)
        regressors = [backend.load_regressor(path, meta, settings.device) for path in paths]
        stages = [StageModel(stage=k + 1, framework=framework, regress=regress,
                             # sigma changes which pixels are cropped, not how many
                             input_size=settings.input_size, sigma=None if k == 0 else 2.0,
                             regress_crops=getattr(regress, "regress_crops", None),
                             has_scales=getattr(regress, "has_scales", False))
                  for k, regress in enumerate(regressors)]
    # The raw forward passes: the same stage networks on ready-made network inputs, so the
    # ratio shows what cropping, normalizing and mapping back cost on top of them.
    rng = np.random.default_rng(settings.seed)
    one = random_batch(1, settings, rng)[0]
    per_joint = random_batch(settings.num_joints, settings, rng)[0]
    rows = []
    for count in range(1, settings.cascade_stages + 1):
        def predict():
            run_cascade(stages[:count], [image], box[None], torso_pair)

        def forward_passes():
            stages[0].regress(one)
            for stage in stages[1:count]:
                stage.regress(per_joint)

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


# ----------------------------------------------------------------------------- whole run


def environment() -> dict[str, Any]:
    from .environment import describe_environment

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
    from .geometry import box_from_xywh

    if index:
        from .annotations import read_index
        from .pipeline import load_image

        record = read_index(Path(index))[0]
        return load_image(record.image), np.asarray(record.box, dtype=np.float64)
    return np.zeros((480, 640, 3), np.uint8), box_from_xywh(160, 0, 320, 480)


def run_benchmark(settings: BenchmarkSettings,
                  log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every section of the benchmark in this process; returns the JSON-ready result."""
    from .backends import get_backend

    settings.validate()
    result: dict[str, Any] = {"format": FORMAT, "version": 1,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "settings": asdict(settings), "environment": environment(),
                              "compute": [], "forward": [], "overhead": [], "pipeline": [],
                              "cascade": [], "cli": None}
    for framework in settings.frameworks:
        get_backend(framework).check_device(settings.device)
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
            result["overhead"].append(overhead_section(settings, framework, log))
        if "pipeline" in settings.sections:
            for workers in settings.workers:
                result["pipeline"].append(pipeline_section(settings, framework, log, workers))
        if "cascade" in settings.sections:
            result["cascade"] += cascade_section(settings, framework, image, box, log)
    if "cli" in settings.sections:
        result["cli"] = cli_section(settings, log)
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
        mine = [r for r in rows if r["framework"] == framework and r["loss"] == "autograd"]
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
        for loss in LOSSES:
            _errorbar(ax, [r for r in rows if r["framework"] == framework and r["loss"] == loss],
                      loss)
        _batch_axes(ax, f"{framework}: autograd vs explicit backward")
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
    settings = result["settings"]
    return (f"AlexNet {settings['input_size']} px, width {settings['width']}, "
            f"device {settings['device']}, {result['environment'].get('cpu_count')} CPUs")


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
        columns = list(dict.fromkeys((r["framework"], r["loss"], r.get("precision", "fp32"))
                                     for r in result["compute"]))
        frameworks = list(dict.fromkeys(f for f, _, _ in columns))
        table = ReportTable("Step time, ms per batch: median (± half IQR); images/s",
                            ["batch"] + [f"{f} {loss}" + ("" if p == "fp32" else f" {p}")
                                         for f, loss, p in columns]
                            + [f"{f} forward" for f in frameworks], [], right_from=0)
        for size in sorted({r["batch_size"] for r in result["compute"]}):
            cells = [str(size)]
            for framework, loss, precision in columns:
                row = next(r for r in result["compute"]
                           if (r["framework"], r["loss"], r.get("precision", "fp32"),
                               r["batch_size"]) == (framework, loss, precision, size))
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
    if result.get("targets"):
        out.append(ReportTable(
            "Targets", ["target", "what", "measured", "bound", "met"],
            [[t["target"], t["what"], f"{t['value']:.3f}", t["bound"],
              f"invalid: {t['invalid']}" if t.get("invalid") else ("yes" if t["met"] else "no")]
             for t in result["targets"]], right_from=99, alert_column=4))
    return out
