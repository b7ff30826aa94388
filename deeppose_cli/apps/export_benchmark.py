"""Exported stage graphs beside the frameworks: file sizes, and the forward latency of one
stage network at a few batch sizes in onnxruntime, PyTorch, Chainer and TorchScript.

The stages are the recipes' networks (stages/stage1.toml: the scale layer; stage2.toml, as
every later stage: without) with random weights, since neither size nor latency depends on
the weights; each runtime loads its own file, as ``predict`` would. The graphs are the
plain ones (no flip test inside), so every runtime does the same arithmetic. Run it with
examples/export_benchmark.py; docs/export.md has the figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.exports import EXPORT_SUFFIX, ExportedStage
from ..core.losses import predicts_uncertainty
from ..core.manifests import load_stage_recipe
from ..core.weights import parameter_shapes
from ..engines import MODEL_SUFFIX, get_engine, get_export_runtime
from .benchmark import Timing, environment, interleaved

RUNTIMES = ("onnxruntime", "pytorch", "chainer", "torchscript")


def stage_meta(stage: int, input_size: int | None, width: float | None,
               num_joints: int = 14) -> dict[str, Any]:
    """The architecture of the recipe's stage ``stage`` network (``input_size`` and
    ``width`` replace the recipe's where given)."""
    recipe = load_stage_recipe(stage)
    return {"num_joints": num_joints,
            "input_size": int(input_size or recipe["input_size"]),
            "width": float(width or recipe["width"]),
            "batch_norm": bool(recipe.get("batch_norm", False)),
            "uncertainty": predicts_uncertainty(recipe.get("loss", "l2"))}


def _predictors(meta: dict[str, Any], directory: Path, threads: int, seed: int
                ) -> tuple[dict[str, Any], dict[str, int]]:
    """Every runtime's predictor of one random network, and the size of each file."""
    from ..engines.export_graph import example_input, stage_graph

    rng = np.random.default_rng(seed)
    params = {name: (rng.standard_normal(shape) * 0.01
                     + (1.0 if name.endswith(("/avg_var", "/gamma")) else 0.0)).astype(np.float32)
              for name, shape in parameter_shapes(**meta).items()}  # variances positive
    stage = ExportedStage(stage=1, file="", sha256="", input_size=meta["input_size"],
                          sigma=None, has_log_scales=meta["uncertainty"], flip_in_graph=False,
                          flip_weights="scales", trained_on_mirrors=True, source_framework="",
                          source_model_sha256="")
    predictors, sizes = {}, {}
    for framework in ("pytorch", "chainer"):
        path = directory / f"model{MODEL_SUFFIX[framework]}"
        engine = get_engine(framework)
        engine.write_model(params, meta, path)
        predictors[framework] = engine.load_predictor(path, meta, "cpu")
        sizes[f"{framework} model{MODEL_SUFFIX[framework]}"] = path.stat().st_size
    graph = stage_graph(params, meta, list(range(meta["num_joints"])), flip_in_graph=False)
    for model_format, name in (("onnx", "onnxruntime"), ("torchscript", "torchscript")):
        runtime = get_export_runtime(model_format, writing=True)
        path = directory / f"stage{EXPORT_SUFFIX[model_format]}"
        runtime.write_stage(graph, example_input(graph), path, None)
        sizes[f"{model_format} stage{EXPORT_SUFFIX[model_format]}"] = path.stat().st_size
        if model_format == "onnx":
            predictors[name] = runtime.OnnxRuntimePredictor(path, stage, meta["num_joints"],
                                                            threads=threads)
        else:
            predictors[name] = runtime.load_predictor(path, stage, meta["num_joints"])
    return predictors, sizes


def export_benchmark(input_size: int | None = None, width: float | None = None,
                     batch_sizes: Sequence[int] = (1, 32), repeats: int = 10,
                     warmup: int = 2, threads: int = 1, seed: int = 0,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sizes and forward latency (:class:`~.benchmark.Timing`) per stage architecture,
    runtime and batch size; the runtimes are timed in turn (ABCD ABCD ...), so a machine
    that slows down during the run slows every runtime alike."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for stage in (1, 2):
        meta = stage_meta(stage, input_size, width)
        with tempfile.TemporaryDirectory(prefix="deeppose-export-benchmark-") as tmp:
            predictors, sizes = _predictors(meta, Path(tmp), threads, seed)
            rng = np.random.default_rng(seed)
            for batch in batch_sizes:
                size = meta["input_size"]
                x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
                calls = [(lambda p=predictors[name]: p(x)) for name in RUNTIMES]
                for _ in range(warmup):
                    for call in calls:
                        call()
                seconds = interleaved(calls, repeats, lambda: None)
                for name, measured in zip(RUNTIMES, seconds):
                    timing = Timing(measured)
                    rows.append({"stage": stage, "architecture": meta, "batch": batch,
                                 "runtime": name, "latency": timing.to_json(),
                                 "sizes": sizes})
                    log(f"stage {stage} batch {batch} {name}: best {timing.best * 1e3:.2f} ms, "
                        f"median {timing.median * 1e3:.2f} ms")
    return {"format": "deeppose-export-benchmark", "threads": threads, "repeats": repeats,
            "warmup": warmup, "environment": environment(), "rows": rows}


def markdown_tables(result: dict[str, Any]) -> str:
    """The file sizes and the latencies as Markdown tables (median, and best, in ms)."""
    rows = result["rows"]
    lines = ["| stage network | file | MiB |", "|---|---|---:|"]
    seen = set()
    for row in rows:
        if row["stage"] in seen:
            continue
        seen.add(row["stage"])
        for name, size in row["sizes"].items():
            lines.append(f"| {_stage_name(row)} | {name} | {size / 2**20:.1f} |")
    lines += ["", "| stage network | batch | " + " | ".join(RUNTIMES) + " |",
              "|---|---:|" + "---:|" * len(RUNTIMES)]
    keys = sorted({(row["stage"], row["batch"]) for row in rows})
    for stage, batch in keys:
        cells = {row["runtime"]: row for row in rows
                 if row["stage"] == stage and row["batch"] == batch}
        first = next(iter(cells.values()))
        lines.append(f"| {_stage_name(first)} | {batch} | " + " | ".join(
            f"{cells[name]['latency']['median'] * 1e3:.1f} ({cells[name]['latency']['min'] * 1e3:.1f})"
            for name in RUNTIMES) + " |")
    return "\n".join(lines)


def _stage_name(row: dict[str, Any]) -> str:
    meta = row["architecture"]
    scales = ", scale layer" if meta["uncertainty"] else ""
    return (f"stage {row['stage']}{'+' if row['stage'] > 1 else ''} ({meta['input_size']} px, "
            f"width {meta['width']:g}{scales})")
