"""Exported cascades: the ``cascade.json`` that describes a directory written by
``deeppose export``, and reading it back.

An export holds one network file per stage (ONNX or TorchScript) and ``cascade.json``: what
a consumer needs to run the cascade without deeppose (stage order, crop size, input
normalization, sigma, mean pose, joint names, flip pairs, torso pair, which outputs each
graph has, whether a graph carries the flip test) and the checksums of the source run's
model files and of the exported ones. docs/export.md is its reference. Light to import
(no NumPy): the CLI's choices come from here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeepPoseError

EXPORT_FORMAT = "deeppose-export"
EXPORT_VERSION = 1
CASCADE_FILE = "cascade.json"
# model format -> file suffix of its stage graphs
EXPORT_SUFFIX: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript"}
EXPORT_FORMATS: tuple[str, ...] = tuple(EXPORT_SUFFIX)
INPUT_NAME = "input"
COORDS_OUTPUT = "coords"
LOG_SCALES_OUTPUT = "log_scales"

# How to run the cascade, written into cascade.json for a consumer who has only the export.
HOW_TO_RUN = [
    "Boxes are (cx, cy, w, h) in image pixels, pixel centres at integer coordinates.",
    "A crop of box b is the size x size image whose pixel (u, v) samples the image at "
    "x = cx + (u - (size - 1) / 2) * w / size, y = cy + (v - (size - 1) / 2) * h / size, "
    "bilinear, black (0) outside the image (OpenCV warpAffine, INTER_LINEAR, BORDER_CONSTANT).",
    "Network input: the RGB uint8 crop as float32 NCHW, x = pixel * scale + bias per channel "
    "(scale = 1 / (255 std), bias = -mean / std).",
    "Outputs: coords (N, J, 2), and log_scales (N, J, 2) where has_log_scales, in the "
    "crop's normalized coordinates: the joint is at (cx + coords_x * w, cy + coords_y * h); "
    "a log scale plus log(w) (x) or log(h) (y) is in pixels.",
    "Stage 1: one crop of the person box per image.",
    "Stage s >= 2: d = distance between joints torso_pair of the previous stage's joints, "
    "clipped to [0.05, 2] x max(w, h) of the person box; joint j is cropped in the square "
    "box of side sigma * d centred on its previous position; all J crops of an image go "
    "through the stage and joint j takes output j of its own crop.",
    "flip_in_graph: the graph already averages each crop with its mirror image. Otherwise, "
    "for the flip test, run the mirrored crop too, map its joints back (joint i from "
    "flip_permutation[i], x negated) and average (see docs/export.md for the weights).",
]


@dataclass(frozen=True)
class ExportedStage:
    """One stage of an export, as cascade.json describes it."""

    stage: int
    file: str
    sha256: str
    input_size: int
    sigma: float | None
    has_log_scales: bool
    flip_in_graph: bool
    flip_weights: str
    trained_on_mirrors: bool
    source_framework: str
    source_model_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "file": self.file, "sha256": self.sha256,
                "input_size": self.input_size, "sigma": self.sigma,
                "outputs": [COORDS_OUTPUT] + ([LOG_SCALES_OUTPUT] if self.has_log_scales
                                              else []),
                "has_log_scales": self.has_log_scales, "flip_in_graph": self.flip_in_graph,
                "flip_weights": self.flip_weights,
                "trained_on_mirrors": self.trained_on_mirrors,
                "source": {"framework": self.source_framework,
                           "model_sha256": self.source_model_sha256}}


@dataclass(frozen=True)
class ExportDescription:
    """A whole export: what cascade.json says, and where it lies."""

    path: Path
    model_format: str
    dataset: str
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    torso_pair: tuple[int, int]
    mean_pose: list[list[float]]
    stages: tuple[ExportedStage, ...]
    source: dict[str, Any]
    opset: int | None = None

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def flip_permutation(self) -> list[int]:
        """``perm[i]`` is the joint that lands at index ``i`` after a horizontal flip."""
        from .manifests import flip_permutation  # tomllib etc.: not at `--help` time

        return flip_permutation(self.num_joints, self.flip_pairs)

    def run_meta(self) -> dict[str, Any]:
        """The keys of a run.json that inference reads (``evaluate``, ``predict``)."""
        return {"format": EXPORT_FORMAT, "dataset": self.dataset,
                "num_joints": self.num_joints, "joint_names": list(self.joint_names),
                "mean_pose": self.mean_pose, "torso_pair": list(self.torso_pair),
                "stage": len(self.stages), "framework": self.model_format,
                "source": self.source}

    def to_json(self) -> dict[str, Any]:
        from .images import IMAGE_MEAN, IMAGE_STD, input_scale_bias

        scale, bias = input_scale_bias()
        return {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "model_format": self.model_format,
            **({"opset": self.opset} if self.opset is not None else {}),
            "source": self.source,
            "dataset": self.dataset, "num_joints": self.num_joints,
            "joint_names": list(self.joint_names),
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "flip_permutation": self.flip_permutation,
            "torso_pair": list(self.torso_pair),
            "mean_pose": self.mean_pose,
            "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                      "channels": "RGB", "batch": "dynamic",
                      "mean": [round(float(v), 6) for v in IMAGE_MEAN],
                      "std": [round(float(v), 6) for v in IMAGE_STD],
                      "scale": [float(v) for v in scale], "bias": [float(v) for v in bias]},
            "stages": [s.to_json() for s in self.stages],
            "how_to_run": HOW_TO_RUN,
        }


def is_export_directory(path: Path | str) -> bool:
    return (Path(path) / CASCADE_FILE).is_file()


def _problem(cascade: Any) -> str | None:
    """What makes a parsed cascade.json unusable (None when every key readers need is there)."""
    if not isinstance(cascade, dict) or cascade.get("format") != EXPORT_FORMAT:
        return "not a deeppose export description"
    if cascade.get("version") != EXPORT_VERSION:
        return (f"version {cascade.get('version')!r}, but this deeppose reads version "
                f"{EXPORT_VERSION}")
    if cascade.get("model_format") not in EXPORT_FORMATS:
        return f"model_format must be one of {', '.join(EXPORT_FORMATS)}"
    names = cascade.get("joint_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "joint_names must be a list of names"
    j = len(names)

    def joint_pairs(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(_index(v, j) for v in p) for p in value)

    if not joint_pairs(cascade.get("flip_pairs")):
        return "flip_pairs must be a list of [joint, joint] pairs"
    if not joint_pairs([cascade.get("torso_pair")]):
        return "torso_pair must be [joint, joint]"
    pose = cascade.get("mean_pose")
    if not isinstance(pose, list) or len(pose) != j or not all(
            isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in pose):
        return f"mean_pose must be {j} [x, y] pairs"
    stages = cascade.get("stages")
    if not isinstance(stages, list) or not stages:
        return "stages must be a non-empty list"
    suffix = EXPORT_SUFFIX[cascade["model_format"]]
    for k, stage in enumerate(stages, 1):
        problem = _stage_problem(stage, k, suffix)
        if problem:
            return f"stage {k}: {problem}"
    return None


def _index(value: Any, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stage_problem(stage: Any, k: int, suffix: str) -> str | None:
    if not isinstance(stage, dict) or stage.get("stage") != k:
        return f"expected the description of stage {k}"
    name = stage.get("file")
    if not isinstance(name, str) or not name.endswith(suffix) or "/" in name or "\\" in name \
            or name.startswith("."):
        return f"file must be a {suffix} file name in the export directory, found {name!r}"
    size = stage.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return f"input_size must be a positive integer, found {size!r}"
    sigma = stage.get("sigma")
    if k >= 2 and not (_number(sigma) and sigma > 0):
        return f"sigma must be a positive number, found {sigma!r}"
    for key in ("has_log_scales", "flip_in_graph", "trained_on_mirrors"):
        if not isinstance(stage.get(key), bool):
            return f"{key} must be true or false"
    if stage.get("flip_weights") not in ("scales", "equal"):
        return "flip_weights must be scales or equal"
    if not isinstance(stage.get("sha256"), str):
        return "sha256 missing"
    return None


def read_export(path: Path | str, verify: bool = True) -> ExportDescription:
    """The export in directory ``path``, its cascade.json checked and (``verify``) every
    stage file's checksum verified: a one-line error for a damaged or foreign directory."""
    path = Path(path)
    cascade_path = path / CASCADE_FILE
    if not cascade_path.is_file():
        raise DeepPoseError(f"{path} is not a deeppose export (no {CASCADE_FILE})")
    try:
        cascade = json.loads(cascade_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeepPoseError(f"{cascade_path} is corrupt: {e}") from None
    problem = _problem(cascade)
    if problem:
        raise DeepPoseError(f"{cascade_path} is not a valid export description: {problem}")
    from .files import sha256_of

    stages = []
    for entry in cascade["stages"]:
        file = path / entry["file"]
        if not file.is_file():
            raise DeepPoseError(f"{file} not found: the export was moved or deleted partly")
        if verify and sha256_of(file) != entry["sha256"]:
            raise DeepPoseError(f"{file} does not match the checksum in {cascade_path}: the "
                                "file was changed or damaged after export; export the run again")
        source = entry.get("source") if isinstance(entry.get("source"), dict) else {}
        stages.append(ExportedStage(
            stage=entry["stage"], file=entry["file"], sha256=entry["sha256"],
            input_size=entry["input_size"],
            sigma=None if entry.get("sigma") is None else float(entry["sigma"]),
            has_log_scales=entry["has_log_scales"], flip_in_graph=entry["flip_in_graph"],
            flip_weights=entry["flip_weights"], trained_on_mirrors=entry["trained_on_mirrors"],
            source_framework=str(source.get("framework", "")),
            source_model_sha256=str(source.get("model_sha256", ""))))
    return ExportDescription(
        path=path, model_format=cascade["model_format"], dataset=str(cascade.get("dataset", "")),
        joint_names=tuple(cascade["joint_names"]),
        flip_pairs=tuple((a, b) for a, b in cascade["flip_pairs"]),
        torso_pair=(cascade["torso_pair"][0], cascade["torso_pair"][1]),
        mean_pose=cascade["mean_pose"], stages=tuple(stages),
        source=cascade.get("source") if isinstance(cascade.get("source"), dict) else {},
        opset=cascade.get("opset"))

