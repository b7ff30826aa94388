"""Dataset manifests (``datasets/*.toml``) and stage recipes (``stages/*.toml``).

Both live at the top of the repository and are installed inside the package as
``deeppose_cli.dataset_manifests`` / ``deeppose_cli.stage_recipes``, so the same lookup works
from a clone, an editable install and a wheel. ``DEEPPOSE_MANIFESTS`` / ``DEEPPOSE_RECIPES``
point at extra directories searched first (a user's own datasets or recipes).

A dataset that ``deeppose index --coco`` wrote has its manifest inside its own directory,
``ROOT/<name>/dataset.toml`` (with ``skeleton.toml`` beside it), so it travels with its
images and index files; it is found under the data root (``$DEEPPOSE_DATA``, else ``./data``)
and under any other root a command names.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import DeepPoseError

_REPO_ROOT = Path(__file__).resolve().parents[2]
#: Environment variable naming the default data root.
DATA_ROOT_ENV = "DEEPPOSE_DATA"
#: The manifest a generated dataset keeps in its own directory, ``ROOT/<name>/dataset.toml``.
GENERATED_MANIFEST = "dataset.toml"
#: Metrics a manifest may name as its headline (``[evaluation] headline``); a ``/GROUP``
#: suffix restricts one to a joint group of ``[evaluation.groups]``.
HEADLINE_METRICS = ("pckh@0.5", "pck@0.2", "pdj@0.1", "pdj@0.2", "pdj_auc", "pcp")


def default_data_root() -> Path:
    """Where datasets live unless ``--root`` says otherwise: ``$DEEPPOSE_DATA`` or ``./data``."""
    env = os.environ.get(DATA_ROOT_ENV, "")
    return Path(env) if env else Path("data")


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


def _data_roots(roots: Iterable[Path]) -> list[Path]:
    """The roots whose ``<name>/dataset.toml`` manifests count: those given, then the default."""
    out: list[Path] = []
    for root in [*roots, default_data_root()]:
        if root is not None and Path(root) not in out:
            out.append(Path(root))
    return out


def _find(kind: str, name: str, roots: Iterable[Path] = ()) -> Path:
    for d in _search_dirs(kind):
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    roots = list(roots)
    if kind == "datasets" and _is_plain_name(name):
        for root in _data_roots(roots):
            candidate = root / name / GENERATED_MANIFEST
            if candidate.is_file():
                return candidate
    known = ", ".join(available(kind, roots)) or "none"
    raise DeepPoseError(f"unknown {kind[:-1]} {name!r} (known: {known})")


def _is_plain_name(name: str) -> bool:
    """A name that is one path component (never ``..`` or a path)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def available(kind: str, roots: Iterable[Path] = ()) -> list[str]:
    """Names of the datasets or stage recipes that can be loaded (datasets: with those
    generated under ``roots`` and the default data root)."""
    names: set[str] = set()
    for d in _search_dirs(kind):
        names.update(p.stem for p in d.glob("*.toml"))
    if kind == "datasets":
        for root in _data_roots(roots):
            if root.is_dir():
                names.update(p.parent.name for p in root.glob(f"*/{GENERATED_MANIFEST}"))
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
    #: The two joints whose distance is the PCKh head size where a record has none of its
    #: own (MPII's records carry the official head-box size); None: no PCKh.
    head_segment: tuple[int, int] | None = None
    #: Joints left out of the PCKh means (MPII's evaluation leaves out pelvis and thorax).
    pckh_excludes: tuple[int, ...] = ()
    #: ``[evaluation]``: ``headline`` (metric names shown first) and ``groups`` (joint
    #: groups with their own PDJ curves, e.g. FLIC's elbows and wrists).
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: ``[annotation]``: what the format's parser needs beyond the skeleton (FLIC's rows of
    #: ``coords``, a generated COCO dataset's source files).
    annotation: dict[str, Any] = field(default_factory=dict)

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

    @property
    def annotations_file(self) -> str:
        """The annotation file, relative to the dataset directory."""
        return str(self.archive.get("annotations", "") or "")

    @property
    def archive_parts(self) -> list[dict[str, Any]]:
        """The archives the dataset is unpacked from, each with a ``name``.

        One ``[archive]`` table is one archive (named after the dataset) that must hold the
        annotation file; ``[[archive.parts]]`` lists several (MPII: images and annotations),
        each with its own ``filename``, ``urls``, ``size``, ``sha256``, ``max_extracted_bytes``,
        the subdirectory it unpacks into (``into``) and a file it must hold (``contains``).
        """
        parts = self.archive.get("parts")
        if not parts:
            return [{**{k: v for k, v in self.archive.items() if k != "parts"},
                     "name": self.name, "contains": self.annotations_file, "into": ""}]
        return [{"into": "", "contains": "", **part} for part in parts]

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics the evaluation table shows first."""
        value = self.evaluation.get("headline", "pdj@0.2")
        return (value,) if isinstance(value, str) else tuple(value)

    @property
    def joint_groups(self) -> dict[str, tuple[int, ...]]:
        """``[evaluation.groups]``: group name -> joint indices."""
        return {name: tuple(self.joint_names.index(j) for j in joints)
                for name, joints in self.evaluation.get("groups", {}).items()}


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


def load_dataset_manifest(name: str, roots: Iterable[Path] = ()) -> DatasetManifest:
    """Load the manifest of dataset ``name`` (with its included skeleton file).

    Searched: ``$DEEPPOSE_MANIFESTS``, the package's ``datasets/<name>.toml``, then the
    generated ``ROOT/<name>/dataset.toml`` for each of ``roots`` and the default data root.
    """
    return read_dataset_manifest(_find("datasets", name, roots))


def read_dataset_manifest(path: Path) -> DatasetManifest:
    """The manifest in the TOML file ``path``; every problem is one line naming the file."""
    raw = _load_toml(path)
    joints = dict(raw.get("joints", {}))
    if "include" in joints:
        joints = {**_load_toml(path.parent / joints.pop("include")), **joints}
    try:
        head = joints.get("head_segment")
        manifest = DatasetManifest(
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
            torso_diameter=tuple(int(j) for j in joints["torso_diameter"]),
            min_visible=int(joints.get("min_visible", 1)),
            generator=raw.get("generator", {}),
            path=path,
            homepage=str(raw.get("homepage", "") or ""),
            head_segment=(int(head[0]), int(head[1])) if head else None,
            pckh_excludes=tuple(int(j) for j in joints.get("pckh_excludes", [])),
            evaluation=dict(raw.get("evaluation", {})),
            annotation=dict(raw.get("annotation", {})),
        )
    except KeyError as e:
        raise DeepPoseError(f"{path}: manifest is missing key {e}") from None
    except (TypeError, ValueError, IndexError) as e:
        raise DeepPoseError(f"{path}: malformed manifest ({e})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise DeepPoseError(f"{path}: {problem}")
    return manifest


def manifest_problem(manifest: DatasetManifest) -> str | None:
    """What makes a manifest unusable (a joint index out of range, an unknown headline
    metric or group), or None."""
    count = manifest.num_joints
    if count < 1:
        return "the skeleton has no joints"
    if len(set(manifest.joint_names)) != count:
        return "joint names must be unique"
    pairs = [("flip_pairs", p) for p in manifest.flip_pairs]
    pairs += [(f"limb {limb.name}", limb.joints) for limb in manifest.skeleton]
    pairs += [("torso_diameter", manifest.torso_diameter)]
    if manifest.head_segment:
        pairs.append(("head_segment", manifest.head_segment))
    pairs += [("pckh_excludes", (j,)) for j in manifest.pckh_excludes]
    for where, joints in pairs:
        if len(joints) not in (1, 2) or not all(0 <= j < count for j in joints):
            return f"{where} names joints {list(joints)}, outside 0..{count - 1}"
    groups = manifest.evaluation.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        return "[evaluation.groups] must map each group name to a list of joint names"
    for group, names in groups.items():
        unknown = [n for n in names if n not in manifest.joint_names]
        if unknown:
            return f"evaluation group {group!r} names unknown joints {unknown}"
    for metric in manifest.headline:
        if not isinstance(metric, str):
            return f"headline metrics must be names, found {metric!r}"
        base, _, group = metric.partition("/")
        if base not in HEADLINE_METRICS:
            return (f"unknown headline metric {metric!r} (known: "
                    f"{', '.join(HEADLINE_METRICS)}, each optionally /GROUP)")
        if group and (base == "pcp" or group not in groups):
            return (f"headline metric {metric!r}: only the curves (pckh, pck, pdj) take a "
                    "/GROUP of [evaluation.groups]" if base == "pcp" else
                    f"headline metric {metric!r} names no group of [evaluation.groups]")
        if base == "pckh@0.5" and manifest.head_segment is None:
            return f"headline metric {metric!r} needs a head_segment in the skeleton"
    return None


def dataset_manifest_roots(path: Path | str | None) -> list[Path]:
    """Data roots under which a generated dataset's manifest sits, given a file inside the
    dataset: its index file (``ROOT/<name>/index/train.jsonl``) or its manifest."""
    if not path:
        return []
    path = Path(path).resolve()
    return [path.parent.parent] if path.name == GENERATED_MANIFEST else [path.parent.parent.parent]


def run_manifest(meta: dict[str, Any]) -> DatasetManifest:
    """The manifest of the dataset a run was trained on (its ``run.json``): by name, also
    under the data root of the generated manifest the run recorded."""
    return load_dataset_manifest(meta["dataset"], dataset_manifest_roots(meta.get("manifest")))


def dataset_names(roots: Iterable[Path] = ()) -> list[str]:
    return available("datasets", roots)


def manifest_dataset_names() -> list[str]:
    """The datasets of the package and ``$DEEPPOSE_MANIFESTS`` (not the generated ones)."""
    return sorted({p.stem for d in _search_dirs("datasets") for p in d.glob("*.toml")})


def load_stage_recipe(stage: int) -> dict[str, Any]:
    """The recipe for cascade stage ``stage`` (``stages/stage<N>.toml``; N>3 reuses stage 3's)."""
    names = available("stages")
    name = f"stage{stage}"
    if name not in names:
        if stage < 1:
            raise DeepPoseError(f"stage must be 1 or more, got {stage}")
        name = "stage3" if stage > 3 else name
    return _load_toml(_find("stages", name))
