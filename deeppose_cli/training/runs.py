"""Runs as a whole: finding the finished ones, and loading one as a cascade of stages
(its own model and the earlier stages of its chain). ``rundir.py`` is one run directory's
files as training writes them.

A stage-N run directory is self-sufficient: ``run.json`` lists the earlier stages it was
trained on, each copied under ``chain/stage<k>/`` with the sha256 of its model file, so the
directory alone runs stages 1..N.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..core.cascade import StageModel
from ..core.errors import DeepPoseError
from ..core.exports import is_export_directory, read_export
from ..core.files import os_error_reason, sha256_of
from ..engines import framework_of_model_file, get_engine, get_export_runtime
from .rundir import RunDirectory, RunReadLock, chain_dir_problem, run_meta_problem

RUNS_ROOT = Path("runs")


def completed_runs(root: Path = RUNS_ROOT) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, run.json) of the runs under ``root`` whose training finished, newest first."""
    found = []
    for meta_path in Path(root).glob("**/run.json"):
        parts = meta_path.relative_to(root).parts[:-1]
        # Chain copies, and runs still training beside the run they replace (OUT.next).
        if "chain" in parts or any(p.startswith(".") or p.endswith(".next") for p in parts):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == "deeppose-run" and \
                meta.get("complete") and run_meta_problem(meta) is None:
            found.append((meta_path.stat().st_mtime, meta_path.parent, meta))
    found.sort(key=lambda t: t[0], reverse=True)
    return [(p, meta) for _, p, meta in found]


def latest_run(root: Path = RUNS_ROOT, dataset: str | None = None,
               stage: int | None = None) -> Path:
    """The most recently finished run (optionally of one dataset and stage)."""
    for path, meta in completed_runs(root):
        if (dataset is None or meta["dataset"] == dataset) and \
                (stage is None or meta["stage"] == stage):
            return path
    what = " ".join(filter(None, [dataset and f"dataset {dataset}",
                                  stage and f"stage {stage}"]))
    raise DeepPoseError(f"no finished {what + ' ' if what else ''}run under {root}/: "
                        "train one with `deeppose train-stage` or pass --model RUN_DIR")


# Cascades shipped inside the package (deeppose_cli/models/<name>/, a run directory each):
# `--model NAME` names one, and predict and evaluate fall back on DEFAULT_MODEL when there is
# no run of the user's own.
PACKAGED_MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "lspet-small"


def packaged_models() -> list[str]:
    """Names of the cascades shipped inside the package."""
    if not PACKAGED_MODELS.is_dir():
        return []
    return sorted(p.name for p in PACKAGED_MODELS.iterdir() if (p / "run.json").is_file())


def packaged_output_dir(run_dir: Path, suffix: str, root: Path = RUNS_ROOT) -> Path | None:
    """Where a command writes what it makes of a packaged cascade (``root/NAME-suffix/``):
    the package directory is installed code, never written to. None for every other run."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != PACKAGED_MODELS.resolve():
        return None
    return Path(root) / f"{run_dir.name}-{suffix}"


def packaged_eval_dir(run_dir: Path, root: Path = RUNS_ROOT) -> Path | None:
    """Where ``evaluate`` writes for a packaged cascade (``root/NAME-eval/``)."""
    return packaged_output_dir(run_dir, "eval", root)


def run_or_packaged(name: str) -> Path:
    """A run directory given on the command line, or the name of a packaged cascade when no
    such directory exists (``convert lspet-small``)."""
    path = Path(name)
    if not path.exists() and name in packaged_models():
        return PACKAGED_MODELS / name
    return path


def resolve_model(model: str | None, chained: Path | None = None,
                  root: Path = RUNS_ROOT) -> tuple[Path, str | None]:
    """The run directory ``--model`` means, and a one-line note when it was not said.

    ``model`` is a run (or exported) directory, or the name of a packaged cascade; without
    it, the run the command chain just produced, else the most recent finished run under
    ``root``, else the packaged ``DEFAULT_MODEL`` (with a note saying so)."""
    if model:
        path = Path(model)
        if not path.exists() and model in packaged_models():
            return PACKAGED_MODELS / model, None
        if not path.exists():
            shipped = ", ".join(packaged_models()) or "none"
            raise DeepPoseError(f"--model {model}: no such run directory (or packaged model: "
                                f"{shipped})")
        return path, None
    if chained is not None:
        return Path(chained), None
    try:
        return latest_run(root), None
    except DeepPoseError:
        if DEFAULT_MODEL not in packaged_models():
            raise
    return (PACKAGED_MODELS / DEFAULT_MODEL,
            f"no finished run under {root}/: using the pretrained {DEFAULT_MODEL} cascade "
            "(LSPET, 14 joints, research use; docs/model-card.md)")


def verified_model(run: RunDirectory, meta: dict[str, Any], expected_sha: str | None,
                    recorded_by: str | None = None) -> Path:
    """The run's model file, refused when it is missing or differs from the checksum recorded
    by ``recorded_by`` (the later run whose chain holds it), else by its own run.json."""
    path = run.path / meta["model_file"]
    if not path.is_file():
        raise DeepPoseError(f"{path} not found: the run did not finish or was moved partly")
    if not isinstance(expected_sha, str) or not re.fullmatch(r"[0-9a-f]{64}", expected_sha):
        where = (f"{recorded_by} records no model_sha256 for it" if recorded_by
                 else f"{run.meta_path} has no model_sha256")
        raise DeepPoseError(f"{path} cannot be verified: {where} (every finished run records "
                            "the checksum of its model); train the stage again, or add the "
                            "checksum by hand if you trust the file")
    if sha256_of(path) != expected_sha:
        where = (f"the checksum {recorded_by} recorded when it was trained on top of it"
                 if recorded_by else f"the checksum in {run.meta_path}")
        raise DeepPoseError(f"{path} does not match {where}: the file was changed or damaged "
                            "after training; restore it or train this stage again")
    return path


def finished_stage(run_dir: Path, expected_sha: str | None = None,
                   recorded_by: str | None = None) -> tuple[RunDirectory, dict[str, Any], Path]:
    """A finished stage's run directory, run.json and verified model file (see
    :func:`verified_model`); a one-line error for an unfinished or damaged one."""
    run = RunDirectory(run_dir)
    meta = run.meta()
    if not meta.get("complete"):
        raise DeepPoseError(f"{run_dir}: training did not finish (resume it with --resume)")
    if expected_sha is None and recorded_by is None:  # a run on its own: its own checksum
        expected_sha = meta.get("model_sha256")
    return run, meta, verified_model(run, meta, expected_sha, recorded_by)


def load_stage(run_dir: Path, device: str = "cpu", expected_sha: str | None = None,
               recorded_by: str | None = None) -> StageModel:
    run, meta, model_path = finished_stage(run_dir, expected_sha, recorded_by)
    predictor = get_engine(meta["framework"]).load_predictor(model_path, meta, device)
    return StageModel(stage=meta["stage"], framework=meta["framework"], predictor=predictor,
                      sigma=meta.get("sigma"), trained_on_mirrors=trained_on_mirrors(run))


def trained_on_mirrors(run: RunDirectory) -> bool:
    """Whether the run's recipe flipped its training images; a run without a readable
    recipe.json (a bare model made into a run) counts as the recipes' default, which does."""
    try:
        recipe = json.loads(run.recipe_path.read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(recipe, dict) or recipe.get("flip", True) is not False


def chain_dirs(run_dir: Path, meta: dict[str, Any] | None = None
               ) -> list[tuple[Path, str | None]]:
    """(directory, expected model sha256) of stages 1..N of a run, in order.

    Every chain entry must lie inside the run: ``run.json`` names them (``chain/stage1``),
    and one that leads elsewhere (``..``, an absolute path, a symbolic link out) is refused,
    naming the entry, rather than loaded or written to."""
    run_dir = Path(run_dir)
    run = RunDirectory(run_dir)
    meta = run.meta() if meta is None else meta
    inside = run_dir.resolve()
    entries = []
    for number, entry in enumerate(meta.get("chain", []), 1):
        problem = chain_dir_problem(entry["dir"])
        directory = run_dir / entry["dir"]
        if problem is None and not directory.resolve().is_relative_to(inside):
            problem = "leads outside the run directory (through a symbolic link)"
        if problem:
            raise DeepPoseError(f"{run.meta_path}: chain entry {number} ({entry['dir']!r}) "
                                f"{problem}; refusing to use it")
        entries.append((directory, entry.get("model_sha256")))
    return entries + [(run_dir, meta.get("model_sha256"))]


def finished_chain(run_dir: Path) -> list[tuple[RunDirectory, dict[str, Any], Path]]:
    """:func:`finished_stage` of stages 1..N of a run, each model file checked against the
    checksum the run recorded for it."""
    dirs = chain_dirs(run_dir)
    later = f"the stage-{RunDirectory(run_dir).meta()['stage']} run {run_dir}"
    return [finished_stage(d, sha, None if i == len(dirs) - 1 else later)
            for i, (d, sha) in enumerate(dirs)]


def _check_stage_count(stages: int | None, available: int, where: Path) -> None:
    if stages is not None and not 1 <= stages <= available:
        raise DeepPoseError(f"--stages must be between 1 and {available} for {where}")


def load_cascade(run_dir: Path, device: str = "cpu",
                 stages: int | None = None) -> tuple[list[StageModel], dict[str, Any]]:
    """Stages 1..N (or 1..``stages``) of a run, and the run's metadata, read under the run's
    shared lock: a retrained run published meanwhile waits, so every stage comes from the
    same run. Or of an export (``deeppose export``), whose metadata is then
    ``ExportDescription.run_meta``."""
    if is_export_directory(run_dir):
        return load_export_cascade(Path(run_dir), device, stages)
    with RunReadLock(run_dir):
        meta = RunDirectory(run_dir).meta()
        dirs = chain_dirs(run_dir, meta)
        _check_stage_count(stages, len(dirs), run_dir)
        last = len(dirs) - 1
        later = f"the stage-{meta['stage']} run {run_dir}"
        return [load_stage(d, device, sha, None if i == last else later)
                for i, (d, sha) in enumerate(dirs[:stages])], meta


def load_export_cascade(export_dir: Path, device: str = "cpu", stages: int | None = None
                        ) -> tuple[list[StageModel], dict[str, Any]]:
    """Stages 1..N (or 1..``stages``) of an export, each run by its format's runtime
    (onnxruntime, TorchScript); a graph that carries the flip test is a stage whose
    ``flip_test`` is already on."""
    description = read_export(export_dir)
    _check_stage_count(stages, len(description.stages), export_dir)
    runtime = get_export_runtime(description.model_format)
    cascade = []
    for entry in description.stages[:stages]:
        predictor = runtime.load_predictor(export_dir / entry.file, entry,
                                           description.num_joints, device)
        cascade.append(StageModel(stage=entry.stage, framework=description.model_format,
                                  predictor=predictor, sigma=entry.sigma,
                                  trained_on_mirrors=entry.trained_on_mirrors,
                                  flip_test=entry.flip_in_graph,
                                  flip_weights=entry.flip_weights))
    return cascade, description.run_meta()


def model_meta(model_dir: Path) -> dict[str, Any]:
    """The run.json of a run, or what an export says in its place
    (``ExportDescription.run_meta``), without loading any network."""
    if is_export_directory(model_dir):
        return read_export(model_dir, verify=False).run_meta()
    return RunDirectory(model_dir).meta()


def stage_directories(model_dir: Path) -> list[Path | None]:
    """The run directory of each stage 1..N (where its displacement statistics lie); None
    for each stage of an export, which keeps graphs only."""
    if is_export_directory(model_dir):
        return [None] * len(read_export(model_dir, verify=False).stages)
    return [d for d, _sha in chain_dirs(model_dir)]


def training_index(model_dir: Path) -> Path | None:
    """The index file the run (or the run an export came from) trained on, if recorded."""
    if is_export_directory(model_dir):
        recorded = read_export(model_dir, verify=False).source.get("train_index")
    else:
        try:
            recorded = json.loads(RunDirectory(model_dir).recipe_path.read_text()).get("train_index")
        except (OSError, ValueError, AttributeError):
            recorded = None
    return Path(recorded) if isinstance(recorded, str) and recorded else None


def copy_chain(previous_dir: Path, run: RunDirectory) -> list[dict[str, Any]]:
    """Copy stages 1..N-1 (``previous_dir`` and its own chain) into ``run/chain/`` and return
    the chain entries recorded in the new run's run.json."""
    entries = []
    target_root = run.path / "chain"
    previous_meta = RunDirectory(previous_dir).meta()
    later = f"the stage-{previous_meta['stage']} run {previous_dir}"
    sources = chain_dirs(previous_dir, previous_meta)
    try:
        if target_root.exists():
            shutil.rmtree(target_root)
    except OSError as e:
        raise DeepPoseError(f"cannot replace {target_root}: {os_error_reason(e)}") from None
    for k, (source, sha) in enumerate(sources):
        meta = RunDirectory(source).meta()
        if not meta.get("complete"):
            raise DeepPoseError(f"--previous {source}: that training did not finish")
        verified_model(RunDirectory(source), meta, sha,
                       None if k == len(sources) - 1 else later)
        target = target_root / f"stage{meta['stage']}"
        try:
            target.mkdir(parents=True)
            for name in ("run.json", "recipe.json", "displacement.json", "log.jsonl",
                         meta["model_file"]):
                if (source / name).is_file():
                    shutil.copy2(source / name, target / name)
        except OSError as e:
            raise DeepPoseError(f"cannot copy {source} into {target}: "
                                f"{os_error_reason(e)}") from None
        child = RunDirectory(target)
        child_meta = child.meta()
        child_meta.pop("chain", None)  # the chain is recorded once, in the new run
        child.write_json("run.json", child_meta)
        entries.append({"stage": meta["stage"], "framework": meta["framework"],
                        "dir": str(target.relative_to(run.path)),
                        "model_sha256": sha256_of(target / meta["model_file"])})
    return entries


def initial_parameters(source: Path | str) -> dict[str, Any]:
    """The canonical parameters (``{"conv1/W": array, ...}``) of ``--init SOURCE``: a run
    directory (its final model, checksum verified) or a model file of either framework."""
    source = Path(source)
    if source.is_dir():
        run = RunDirectory(source)
        meta = run.meta()
        if not meta.get("complete"):
            raise DeepPoseError(f"--init {source}: that training did not finish")
        path = verified_model(run, meta, meta.get("model_sha256"))
        return get_engine(meta["framework"]).read_params(path)
    if not source.is_file():
        raise DeepPoseError(f"--init {source}: no such run directory or model file")
    return get_engine(framework_of_model_file(source) or "pytorch").read_params(source)
