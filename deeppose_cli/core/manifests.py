"""Dataset manifests (``datasets/*.toml``) and stage recipes (``stages/*.toml``).

Both live at the top of the repository and are installed inside the package as
``deeppose_cli.dataset_manifests`` / ``deeppose_cli.stage_recipes``, so the same lookup works
from a clone, an editable install and a wheel. ``DEEPPOSE_MANIFESTS`` / ``DEEPPOSE_RECIPES``
point at extra directories searched first (a user's own datasets or recipes).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DeepPoseError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _search_dirs(kind: str) -> list[Path]:
    """Directories holding ``kind`` ("datasets" or "stages") TOML files, most specific first."""
    env = {"datasets": "DEEPPOSE_MANIFESTS", "stages": "DEEPPOSE_RECIPES"}[kind]
    package = {"datasets": "dataset_manifests", "stages": "stage_recipes"}[kind]
    dirs = [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p]
    dirs.append(_REPO_ROOT / kind)  # a clone or an editable install
    try:
        dirs.append(Path(str(resources.files("deeppose_cli") / package)))  # a wheel
    except (ModuleNotFoundError, TypeError):
        pass
    return [d for d in dirs if d.is_dir()]


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise DeepPoseError(f"{path}: invalid TOML: {e}") from None


def _find(kind: str, name: str) -> Path:
    for d in _search_dirs(kind):
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(available(kind)) or "none"
    raise DeepPoseError(f"unknown {kind[:-1]} {name!r} (known: {known})")


def available(kind: str) -> list[str]:
    """Names of the datasets or stage recipes that can be loaded."""
    names: set[str] = set()
    for d in _search_dirs(kind):
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


@dataclass(frozen=True)
class Limb:
    name: str
    joints: tuple[int, int]
    category: str
    side: str


@dataclass(frozen=True)
class DatasetManifest:
    """Everything the toolkit knows about a dataset, read from its TOML manifest."""

    name: str
    title: str
    citation: str
    format: str
    archive: dict[str, Any]
    splits: dict[str, Any]
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    limbs: tuple[Limb, ...]
    skeleton_extra: tuple[Limb, ...]
    torso_diameter: tuple[int, int]
    min_visible: int
    generator: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: Where the dataset is published: named when no mirror can deliver the archive.
    homepage: str = ""

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def skeleton(self) -> tuple[Limb, ...]:
        """Every segment drawn on a prediction: the PCP limbs plus the extra ones."""
        return self.limbs + self.skeleton_extra

    @property
    def flip_permutation(self) -> list[int]:
        """``perm[i]`` is the joint that lands at index ``i`` after a horizontal flip."""
        return flip_permutation(self.num_joints, self.flip_pairs)


def flip_permutation(num_joints: int, flip_pairs: Any) -> list[int]:
    """The permutation a horizontal flip applies to ``num_joints`` joints whose left/right
    pairs are ``flip_pairs``: ``perm[i]`` is the joint that lands at index ``i``."""
    perm = list(range(num_joints))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


def _limbs(entries: list[dict[str, Any]]) -> tuple[Limb, ...]:
    return tuple(
        Limb(
            name=e.get("name", f"{e['joints'][0]}-{e['joints'][1]}"),
            joints=(int(e["joints"][0]), int(e["joints"][1])),
            category=e.get("category", ""),
            side=e.get("side", "center"),
        )
        for e in entries
    )


def load_dataset_manifest(name: str) -> DatasetManifest:
    """Load ``datasets/<name>.toml`` (with its included skeleton file)."""
    path = _find("datasets", name)
    raw = _load_toml(path)
    joints = dict(raw.get("joints", {}))
    if "include" in joints:
        joints = {**_load_toml(path.parent / joints.pop("include")), **joints}
    try:
        return DatasetManifest(
            name=raw["name"],
            title=raw.get("title", raw["name"]),
            citation=raw.get("citation", ""),
            format=raw["format"],
            archive=raw.get("archive", {}),
            splits=raw.get("splits", {}),
            joint_names=tuple(joints["names"]),
            flip_pairs=tuple((int(a), int(b)) for a, b in joints.get("flip_pairs", [])),
            limbs=_limbs(joints.get("limbs", [])),
            skeleton_extra=_limbs(joints.get("skeleton_extra", [])),
            torso_diameter=tuple(joints["torso_diameter"]),
            min_visible=int(joints.get("min_visible", 1)),
            generator=raw.get("generator", {}),
            path=path,
            homepage=str(raw.get("homepage", "") or ""),
        )
    except KeyError as e:
        raise DeepPoseError(f"{path}: manifest is missing key {e}") from None


def dataset_names() -> list[str]:
    return available("datasets")


def load_stage_recipe(stage: int) -> dict[str, Any]:
    """The recipe for cascade stage ``stage`` (``stages/stage<N>.toml``; N>3 reuses stage 3's)."""
    names = available("stages")
    name = f"stage{stage}"
    if name not in names:
        if stage < 1:
            raise DeepPoseError(f"stage must be 1 or more, got {stage}")
        name = "stage3" if stage > 3 else name
    return _load_toml(_find("stages", name))
