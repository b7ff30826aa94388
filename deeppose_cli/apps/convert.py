"""`deeppose convert`: a run's whole cascade in the other framework's model files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import (WriteError, atomic_write, make_directory, make_temp_dir,
                          os_error_reason, replace_directory, sha256_of)
from ..engines import MODEL_SUFFIX, get_engine
from ..training.rundir import RunDirectory, RunReadLock
from ..training.runs import chain_dirs, verified_model


def convert_run(source: Path, framework: str, out: Path, half: bool = False) -> Path:
    """Write a copy of the run ``source`` (with every earlier stage in its chain) whose models
    are in ``framework``'s native format; predictions stay the same (weights are exchanged
    through the framework-free parameter layout). ``half`` stores the weights as float16
    (read back as float32), for a cascade shipped small.

    The copy is built in a hidden directory beside ``out`` and renamed to ``out`` once
    complete, so an interruption or a full disk never leaves half a run there (the next
    conversion removes what a killed one left)."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise DeepPoseError("--out must differ from the run being converted")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeepPoseError(f"{out} already exists and is not empty")
    with RunReadLock(source):  # one run, even if a retrain publishes meanwhile
        meta = RunDirectory(source).meta()
        if not meta.get("complete"):
            raise DeepPoseError(f"{source}: training did not finish; nothing to convert")
        staged = make_temp_dir(out, "new")
        try:
            _convert_into(source, meta, meta.get("model_sha256"), None, framework, staged,
                          half)
            replace_directory(staged, out)
        except WriteError as e:  # named by the hidden directory it was built in
            raise DeepPoseError(f"cannot write {out}: {e.reason}") from None
        except OSError as e:
            raise DeepPoseError(f"cannot write {out}: {os_error_reason(e)}") from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return out


def _convert_into(source: Path, meta: dict[str, Any], expected_sha: str | None,
                  recorded_by: str | None, framework: str, target: Path,
                  half: bool = False) -> None:
    """Write the converted run ``source`` (its run.json ``meta``) into ``target``; its model
    must match ``expected_sha`` (recorded by ``recorded_by``, a later run, when given)."""
    make_directory(target)
    for name in ("displacement.json", "log.jsonl", "loss.png"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    if (source / "recipe.json").is_file():
        try:
            recipe = json.loads((source / "recipe.json").read_text())
        except (OSError, ValueError) as e:
            raise DeepPoseError(f"{source / 'recipe.json'} is unreadable: {e}") from None
        RunDirectory(target).write_json("recipe.json", {**recipe, "framework": framework})
    new_chain = []
    later = f"the stage-{meta['stage']} run {source}"
    for entry, (child_dir, child_sha) in zip(meta.get("chain", []), chain_dirs(source, meta)):
        child_meta = RunDirectory(child_dir).meta()
        if not child_meta.get("complete"):
            raise DeepPoseError(f"{child_dir}: training did not finish; nothing to convert")
        child_target = target / entry["dir"]
        _convert_into(child_dir, child_meta, child_sha, later, framework, child_target, half)
        converted = RunDirectory(child_target).meta()
        new_chain.append({**entry, "framework": framework,
                          "model_sha256": sha256_of(child_target / converted["model_file"])})
    reader = get_engine(meta["framework"])
    writer = get_engine(framework)
    params = reader.read_params(verified_model(RunDirectory(source), meta, expected_sha,
                                               recorded_by))
    model_file = f"model{MODEL_SUFFIX[framework]}"
    dtype = np.float16 if half else np.float32
    atomic_write(target / model_file, lambda tmp: writer.write_model(params, meta, tmp, dtype))
    new_meta = {**meta, "framework": framework, "model_file": model_file,
                "model_sha256": sha256_of(target / model_file), "converted_from": str(source),
                "weights_dtype": "float16" if half else "float32"}
    if "chain" in meta:
        new_meta["chain"] = new_chain
    RunDirectory(target).write_json("run.json", new_meta)
