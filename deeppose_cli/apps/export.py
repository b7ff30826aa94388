"""`deeppose export`: a run's whole cascade as ONNX or TorchScript graphs and a
``cascade.json``, for running it without deeppose (docs/export.md).

Every stage of the run's chain (either framework: a Chainer stage's parameters are rebuilt
in PyTorch, as ``deeppose convert`` does) becomes one graph with a dynamic batch. Each graph
is run once by its runtime against the PyTorch network before anything is published, and
the directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import DeepPoseError
from ..core.exports import (EXPORT_SUFFIX, ExportDescription, ExportedStage,
                            is_export_directory, read_export)
from ..core.files import current_umask, sha256_of, write_json
from ..core.manifests import load_dataset_manifest
from ..engines import check_export_format, get_engine, get_export_runtime
from ..engines.export_graph import example_input, graph_outputs, stage_graph
from ..training.rundir import RunDirectory
from ..training.runs import finished_chain, trained_on_mirrors

# The self-check: the exported graph against the PyTorch network it came from, in the
# networks' normalized coordinates (0.5 px is 0.002 of a 227 px box; float32 reordering
# stays below 1e-5).
SELF_CHECK_TOLERANCE = 1e-4
SELF_CHECK_BATCH = 3  # differs from the traced batch (2): the batch really is dynamic


@dataclass
class ExportResult:
    out: Path
    description: ExportDescription

    def sizes(self) -> dict[str, int]:
        """Bytes of each stage file."""
        return {s.file: (self.out / s.file).stat().st_size for s in self.description.stages}


def default_export_dir(run_dir: Path, model_format: str) -> Path:
    return Path(f"{str(run_dir).rstrip('/')}-{model_format}")


def export_run(run_dir: Path, model_format: str = "onnx", out: Path | None = None,
               opset: int | None = None, flip_test: bool | None = None) -> ExportResult:
    """Export stages 1..N of the run ``run_dir`` to ``out`` (default ``RUN_DIR-FORMAT``).

    ``flip_test``: every graph carries the flip test (``True``), none does (``False``), or
    (``None``) each stage whose recipe trained it on mirrored images, the default
    ``deeppose predict`` applies; so by default the export predicts what ``deeppose
    predict RUN_DIR`` does. A graph without it can still be flipped by its consumer."""
    check_export_format(model_format)
    if opset is not None and model_format != "onnx":
        raise DeepPoseError("--opset applies to --format onnx only")
    run_dir = Path(run_dir)
    if is_export_directory(run_dir):
        raise DeepPoseError(f"{run_dir} is an export already; export the run it came from")
    runtime = get_export_runtime(model_format, writing=True)
    chain = finished_chain(run_dir)  # every model file verified against its checksum
    meta = chain[-1][1]
    manifest = load_dataset_manifest(meta["dataset"])
    out = Path(out) if out is not None else default_export_dir(run_dir, model_format)
    _check_target(out, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(work, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from a group
    try:
        stages = []
        for run, stage_meta, model_path in chain:
            k = stage_meta["stage"]
            mirrors = trained_on_mirrors(run)
            in_graph = mirrors if flip_test is None else flip_test
            params = get_engine(stage_meta["framework"]).read_params(model_path)
            graph = stage_graph(params, stage_meta, manifest.flip_permutation, in_graph)
            name = f"stage{k}{EXPORT_SUFFIX[model_format]}"
            runtime.write_stage(graph, example_input(graph), work / name, opset)
            entry = ExportedStage(
                stage=k, file=name, sha256=sha256_of(work / name),
                input_size=int(stage_meta["input_size"]),
                sigma=None if k == 1 else float(stage_meta["sigma"]),
                has_log_scales=bool(graph.network.uncertainty), flip_in_graph=in_graph,
                flip_weights="scales", trained_on_mirrors=mirrors,
                source_framework=stage_meta["framework"],
                source_model_sha256=sha256_of(model_path))
            _self_check(runtime, work / name, entry, graph, manifest.num_joints)
            stages.append(entry)
        description = ExportDescription(
            path=out, model_format=model_format, dataset=meta["dataset"],
            joint_names=tuple(meta.get("joint_names") or manifest.joint_names),
            flip_pairs=manifest.flip_pairs, torso_pair=tuple(manifest.torso_diameter),
            mean_pose=meta["mean_pose"], stages=tuple(stages),
            source=_source(run_dir, meta, stages),
            opset=(opset or runtime.DEFAULT_OPSET) if model_format == "onnx" else None)
        write_json(work / "cascade.json", description.to_json())
        read_export(work)  # what was written reads back, checksums included
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(out, description)


def _check_target(out: Path, run_dir: Path) -> None:
    """Refuse an ``--out`` that would overwrite anything but an earlier export."""
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise DeepPoseError("--out must lie outside the run being exported")
    if out.exists() and not out.is_dir():
        raise DeepPoseError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export_directory(out):
        raise DeepPoseError(f"{out} already exists, is not empty and is not an export: "
                            "choose another --out")


def _self_check(runtime, path: Path, entry: ExportedStage, graph, num_joints: int) -> None:
    """Run the written file with its own runtime against the PyTorch graph."""
    x = example_input(graph, SELF_CHECK_BATCH, seed=1)
    predictor = runtime.load_predictor(path, entry, num_joints, "cpu")
    got = predictor.run(np.ascontiguousarray(x.numpy()))
    expected = graph_outputs(graph, x)
    worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(got, expected))
    if len(got) != len(expected) or not worst <= SELF_CHECK_TOLERANCE:
        raise DeepPoseError(f"the exported stage {entry.stage} differs from its network by "
                            f"{worst:.3g} (more than {SELF_CHECK_TOLERANCE}): nothing was written")


def _source(run_dir: Path, meta: dict, stages: list[ExportedStage]) -> dict:
    """Where the export came from: the run, its training index (``evaluate``'s default
    test split lies beside it) and each stage's model file checksum."""
    try:
        recipe = json.loads(RunDirectory(run_dir).recipe_path.read_text())
    except (OSError, ValueError):
        recipe = {}
    return {"run": str(run_dir.resolve()), "framework": meta["framework"],
            "stage": meta["stage"], "dataset": meta["dataset"],
            "train_index": recipe.get("train_index") if isinstance(recipe, dict) else None,
            "frameworks": [s.source_framework for s in stages],
            "model_sha256": [s.source_model_sha256 for s in stages],
            "exported_by": f"deeppose {__version__}"}


def _publish(work: Path, out: Path) -> None:
    """Put the finished export at ``out``; an earlier export there is replaced only now."""
    retired = out.with_name(f".{out.name}.replaced")
    if retired.exists():
        shutil.rmtree(retired)
    if out.exists():
        os.rename(out, retired)
    os.rename(work, out)
    shutil.rmtree(retired, ignore_errors=True)
