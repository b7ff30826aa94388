"""`deeppose convert`: a run's whole cascade in the other framework's model files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import atomic_write, sha256_of
from ..engines import MODEL_SUFFIX, get_engine
from ..training.rundir import RunDirectory
from ..training.runs import verified_model


def convert_run(source: Path, framework: str, out: Path, half: bool = False) -> Path:
    """Write a copy of the run ``source`` (with every earlier stage in its chain) whose models
    are in ``framework``'s native format; predictions stay the same (weights are exchanged
    through the framework-free parameter layout). ``half`` stores the weights as float16
    (read back as float32), for a cascade shipped small."""

    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise DeepPoseError("--out must differ from the run being converted")
    if out.exists() and any(out.iterdir()):
        raise DeepPoseError(f"{out} already exists and is not empty")
    meta = RunDirectory(source).meta()
    if not meta.get("complete"):
        raise DeepPoseError(f"{source}: training did not finish; nothing to convert")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("displacement.json", "log.jsonl", "loss.png"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if (source / "recipe.json").is_file():
        recipe = json.loads((source / "recipe.json").read_text())
        RunDirectory(out).write_json("recipe.json", {**recipe, "framework": framework})
    new_chain = []
    for entry in meta.get("chain", []):
        target = out / entry["dir"]
        convert_run(source / entry["dir"], framework, target, half)
        child = RunDirectory(target).meta()
        new_chain.append({**entry, "framework": framework,
                          "model_sha256": sha256_of(target / child["model_file"])})
    reader = get_engine(meta["framework"])
    writer = get_engine(framework)
    params = reader.read_params(verified_model(RunDirectory(source), meta, meta.get("model_sha256")))
    model_file = f"model{MODEL_SUFFIX[framework]}"
    dtype = np.float16 if half else np.float32
    atomic_write(out / model_file, lambda tmp: writer.write_model(params, meta, tmp, dtype))
    new_meta = {**meta, "framework": framework, "model_file": model_file,
                "model_sha256": sha256_of(out / model_file), "converted_from": str(source),
                "weights_dtype": "float16" if half else "float32"}
    if "chain" in meta:
        new_meta["chain"] = new_chain
    RunDirectory(out).write_json("run.json", new_meta)
    return out
