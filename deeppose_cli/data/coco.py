"""Any COCO-format keypoint dataset: reading its JSON and writing it as a deeppose dataset.

``deeppose index --coco ANNOTATIONS.json --images DIR --name NAME`` writes
``ROOT/NAME/dataset.toml`` and ``ROOT/NAME/skeleton.toml`` (generated from the keypoint
category's ``keypoints`` names and ``skeleton``), then the index files, so every command
accepts ``--dataset NAME``. The images stay where they are; the manifest records the JSON
files and image directories, so ``deeppose index NAME`` indexes them again.

The COCO conventions kept (https://cocodataset.org/#format-data): ``keypoints`` is
``[x1, y1, v1, ...]`` with ``v`` = 0 not labelled (x = y = 0), 1 labelled but not visible
(occluded), 2 labelled and visible; ``skeleton`` pairs are 1-based; ``bbox`` is
``[x, y, width, height]``; ``iscrowd`` regions carry no keypoints. deeppose counts every
labelled keypoint (v = 1 or 2: an occluded keypoint is annotated where it is, and COCO's own
evaluation scores it too) and ignores v = 0. Keypoint coordinates are taken as pixel
positions with pixel centres at integers, as the index files hold them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import atomic_write_text
from ..core.manifests import (GENERATED_MANIFEST, DatasetManifest, manifest_dataset_names,
                              read_dataset_manifest)
from .formats import Person

#: The person box: a square of this many times the longer side of ``bbox``, on its centre
#: (the padding of MMPose's and HRNet's top-down COCO loaders; the crop must be square).
COCO_BOX_PADDING = 1.25
SKELETON_FILE = "skeleton.toml"
#: PCP limb categories, from the joints' names without their side.
PCP_CATEGORIES = {frozenset({"shoulder", "elbow"}): "upper_arms",
                  frozenset({"elbow", "wrist"}): "lower_arms",
                  frozenset({"hip", "knee"}): "upper_legs",
                  frozenset({"knee", "ankle"}): "lower_legs"}
_SIDE_WORDS = (("left", "right"), ("Left", "Right"), ("LEFT", "RIGHT"))
_SIDE_LETTERS = {"l": "r", "r": "l", "L": "R", "R": "L"}
_HEAD_TOPS = ("head_top", "headtop", "top_head", "head")
_NECKS = ("upper_neck", "neck")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_coco(path: Path) -> dict[str, Any]:
    """A COCO JSON file, checked for the parts deeppose reads; one line says what is wrong."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DeepPoseError(f"COCO annotations {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DeepPoseError(f"cannot read COCO annotations {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DeepPoseError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise DeepPoseError(f"{path}: a COCO file is a JSON object with images, annotations "
                            "and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DeepPoseError(f"{path}: `{key}` must be a list")
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or \
                not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise DeepPoseError(f"{path}: images[{k}] needs an id and a file_name")
    return data


def keypoint_category(data: dict[str, Any], path: Path, name: str | None) -> dict[str, Any]:
    """The category whose keypoints to read: ``name``, else the only one with keypoints."""
    with_keypoints = [c for c in data["categories"]
                      if isinstance(c, dict) and c.get("keypoints")]
    if name is not None:
        chosen = [c for c in with_keypoints if c.get("name") == name]
        if not chosen:
            known = ", ".join(repr(c.get("name")) for c in with_keypoints) or "none"
            raise DeepPoseError(f"{path}: no keypoint category {name!r} (with keypoints: {known})")
        return chosen[0]
    if len(with_keypoints) != 1:
        known = ", ".join(repr(c.get("name")) for c in with_keypoints)
        raise DeepPoseError(f"{path}: {len(with_keypoints)} categories have keypoints"
                            + (f" ({known}); choose one with --category" if known else ""))
    category = with_keypoints[0]
    names = category["keypoints"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DeepPoseError(f"{path}: category {category.get('name')!r}: keypoints must be a "
                            "list of names")
    if len(set(names)) != len(names):
        raise DeepPoseError(f"{path}: category {category.get('name')!r} names a keypoint twice")
    if len(names) < 2:
        raise DeepPoseError(f"{path}: category {category.get('name')!r} has fewer than 2 "
                            "keypoints")
    return category


# --------------------------------------------------------------------------------------------
# The generated skeleton


def mirror_name(name: str) -> str | None:
    """The name of the joint a horizontal flip swaps ``name`` with (left <-> right), if any."""
    for left, right in _SIDE_WORDS:
        if left in name:
            return name.replace(left, right, 1)
        if right in name:
            return name.replace(right, left, 1)
    tokens = re.split(r"([_\-. ])", name)
    for k, token in enumerate(tokens):
        if token in _SIDE_LETTERS:
            return "".join(tokens[:k] + [_SIDE_LETTERS[token]] + tokens[k + 1:])
    return None


def side_of(name: str) -> str:
    mirrored = mirror_name(name)
    if mirrored is None:
        return "center"
    lowered = name.lower()
    if "left" in lowered:
        return "left"
    if "right" in lowered:
        return "right"
    tokens = re.split(r"[_\-. ]", name)
    return "left" if {"l", "L"} & set(tokens) else "right"


def base_name(name: str) -> str:
    """The joint's name without its side: ``left_shoulder``, ``l_shoulder`` -> ``shoulder``."""
    lowered = re.sub(r"left|right", "", name.lower())
    tokens = [t for t in re.split(r"[_\-. ]+", lowered) if t and t not in ("l", "r")]
    return "_".join(tokens)


def coco_skeleton(category: dict[str, Any], people: Iterable[Person], path: Path,
                  min_keypoints: int) -> dict[str, Any]:
    """The skeleton TOML's content for a keypoint category (see the module docstring)."""
    names = list(category["keypoints"])
    count = len(names)
    index = {n: k for k, n in enumerate(names)}
    flip_pairs = sorted({tuple(sorted((k, index[mirror_name(n)]))) for k, n in enumerate(names)
                         if mirror_name(n) in index and index[mirror_name(n)] != k})
    limbs, extra = [], []
    edges = category.get("skeleton") or []
    if not isinstance(edges, list):
        raise DeepPoseError(f"{path}: category {category.get('name')!r}: skeleton must be a "
                            "list of [a, b] pairs")
    for edge in edges:
        if not (isinstance(edge, list) and len(edge) == 2 and
                all(isinstance(j, int) and 1 <= j <= count for j in edge)):
            raise DeepPoseError(f"{path}: category {category.get('name')!r}: skeleton pair "
                                f"{edge!r} is not two keypoint numbers in 1..{count}")
        a, b = edge[0] - 1, edge[1] - 1
        sides = {side_of(names[a]), side_of(names[b])}
        side = sides.pop() if len(sides) == 1 else "center"
        entry = {"name": f"{names[a]}-{names[b]}", "joints": [a, b], "side": side}
        pcp = PCP_CATEGORIES.get(frozenset({base_name(names[a]), base_name(names[b])}))
        if pcp and side != "center":
            limbs.append({**entry, "category": pcp})
        else:
            extra.append(entry)
    bases = {(base_name(n), side_of(n)): k for k, n in enumerate(names)}
    torso = None
    for shoulder, hip in ((("shoulder", "left"), ("hip", "right")),
                          (("shoulder", "right"), ("hip", "left"))):
        if shoulder in bases and hip in bases:
            torso = [bases[shoulder], bases[hip]]
            break
    if torso is None:
        torso = _widest_pair(people, count)
    skeleton: dict[str, Any] = {"names": names, "flip_pairs": [list(p) for p in flip_pairs],
                                "torso_diameter": torso, "min_visible": min_keypoints,
                                "limbs": limbs, "skeleton_extra": extra}
    plain = {base_name(n): k for k, n in enumerate(names)} | {n.lower(): k for k, n in
                                                              enumerate(names)}
    top = next((plain[n] for n in _HEAD_TOPS if n in plain), None)
    neck = next((plain[n] for n in _NECKS if n in plain), None)
    if top is not None and neck is not None and top != neck:
        skeleton["head_segment"] = [neck, top]
    return skeleton


def _widest_pair(people: Iterable[Person], count: int) -> list[int]:
    """Two keypoints with the largest median distance between them (relative to the person
    box): the torso diameter's stand-in for a skeleton without shoulders and hips."""
    ratios: dict[tuple[int, int], list[float]] = {}
    for person in people:
        if person.box is None:
            continue
        labelled = np.flatnonzero(person.visible)
        for i in labelled:
            for j in labelled[labelled > i]:
                distance = float(np.linalg.norm(person.joints[i] - person.joints[j]))
                ratios.setdefault((int(i), int(j)), []).append(distance / person.box[2])
    if not ratios:
        return [0, 1]
    best = max(sorted(ratios), key=lambda pair: float(np.median(ratios[pair])))
    return list(best)


# --------------------------------------------------------------------------------------------
# Reading a generated dataset's annotations


def read_coco(manifest: DatasetManifest, dataset_dir: Path) -> list[Person]:
    """Every person of the category in the manifest's ``[[annotation.sources]]``."""
    sources = manifest.annotation.get("sources") or []
    if not sources:
        raise DeepPoseError(f"{manifest.path}: [annotation] lists no COCO sources")
    people: list[Person] = []
    groups: dict[tuple[int, Any], int] = {}
    for number, source in enumerate(sources):
        path = Path(source["annotations"])
        data = load_coco(path)
        category = keypoint_category(data, path, manifest.annotation.get("category"))
        if list(category["keypoints"]) != list(manifest.joint_names):
            raise DeepPoseError(f"{path}: the keypoints of category {category.get('name')!r} "
                                f"differ from dataset {manifest.name}'s skeleton")
        people += _people(data, category, path, Path(source["images"]), source.get("split"),
                          lambda image_id, n=number: groups.setdefault((n, image_id),
                                                                       len(groups) + 1))
    return people


def _people(data: dict[str, Any], category: dict[str, Any], path: Path, images_dir: Path,
            split: str | None, group_of) -> list[Person]:
    images = {image["id"]: image for image in data["images"]}
    count = len(category["keypoints"])
    people = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("category_id") != category.get("id"):
            continue
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DeepPoseError(f"{path}: annotations[{k}] refers to image "
                                f"{ann.get('image_id')!r}, which `images` does not list")
        name = image["file_name"]
        person = Person(f"{Path(name).stem}_{ann.get('id', k)}", images_dir / name,
                        np.full((count, 2), np.nan), np.zeros(count, dtype=bool),
                        group_of(image["id"]), split=split)
        people.append(person)
        if ann.get("iscrowd"):
            person.problem = "a crowd region (iscrowd), not one person"
            continue
        try:
            values = np.asarray(ann.get("keypoints"), dtype=np.float64)
        except (TypeError, ValueError):
            values = np.zeros(0)
        if values.shape != (3 * count,):
            person.problem = f"keypoints must be {3 * count} numbers (x, y, v per keypoint)"
            continue
        triples = values.reshape(count, 3)
        person.visible = triples[:, 2] > 0
        person.joints = np.where(person.visible[:, None], triples[:, :2], np.nan)
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            continue  # no usable bbox: the box comes from the keypoints
        if all(np.isfinite([x, y, w, h])) and w > 0 and h > 0:
            side = COCO_BOX_PADDING * max(w, h)
            person.box = np.array([x + w / 2.0, y + h / 2.0, side, side])
    return people


# --------------------------------------------------------------------------------------------
# Writing a dataset

SPLIT_NAMES = ("train", "val", "test")


def _split_value(value: str) -> tuple[str | None, str]:
    split, sep, rest = value.partition("=")
    if sep and split in SPLIT_NAMES:
        return split, rest
    return None, value


def coco_sources(coco_files: Iterable[str], image_dirs: Iterable[str]
                 ) -> list[tuple[str | None, Path, Path]]:
    """``--coco [SPLIT=]FILE`` and ``--images [SPLIT=]DIR`` values as (split, file, image
    directory) each: one DIR serves every file, else each split names its own."""
    files = [_split_value(v) for v in coco_files]
    dirs = [_split_value(v) for v in image_dirs]
    if not dirs:
        raise DeepPoseError("--coco needs --images DIR, the directory its images are in")
    shared = [d for split, d in dirs if split is None]
    by_split = {split: d for split, d in dirs if split is not None}
    if len(shared) > 1 or (shared and by_split):
        raise DeepPoseError("--images: give one DIR for every file, or SPLIT=DIR for each split")
    sources = []
    for split, path in files:
        folder = shared[0] if shared else by_split.get(split or "")
        if folder is None:
            raise DeepPoseError(f"--images: no directory for the {split} file {path} "
                                f"(add --images {split}=DIR)")
        sources.append((split, Path(path), Path(folder)))
    return sources


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _table(name: str, entries: dict[str, Any], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head] + [f"{k} = {_toml(v)}" for k, v in entries.items()]) + "\n"


def write_coco_dataset(name: str, root: Path, sources: list[tuple[str | None, Path, Path]], *,
                       category: str | None = None, min_keypoints: int = 1,
                       val_fraction: float | None = None, seed: int | None = None
                       ) -> DatasetManifest:
    """Write ``root/name/dataset.toml`` and ``skeleton.toml`` for COCO files; return the
    manifest. ``sources``: (split or None, annotations JSON, image directory) each; with one
    source and no split, a seeded image-level split into train and val."""
    if not _NAME_RE.match(name):
        raise DeepPoseError(f"--name {name!r}: use letters, digits, '_', '-' and '.', "
                            "starting with a letter or digit")
    if name in manifest_dataset_names():
        raise DeepPoseError(f"--name {name}: a dataset of that name exists already; choose "
                            "another name")
    if min_keypoints < 1:
        raise DeepPoseError("--min-keypoints must be at least 1")
    splits = [split for split, _, _ in sources]
    if len(sources) > 1 and None in splits:
        raise DeepPoseError("with several --coco files, give each its split: "
                            "--coco train=FILE --coco val=FILE")
    if len(set(splits)) != len(splits):
        raise DeepPoseError("--coco: one file per split")
    datas = []
    for split, path, images in sources:
        if not Path(images).is_dir():
            raise DeepPoseError(f"image directory {images} not found")
        data = load_coco(path)
        datas.append((data, keypoint_category(data, path, category), split, Path(path),
                      Path(images)))
    first = datas[0][1]
    for _data, other, _split, path, _images in datas[1:]:
        if list(other["keypoints"]) != list(first["keypoints"]):
            raise DeepPoseError(f"{path}: its keypoints differ from those of "
                                f"{datas[0][3]}")
    people = [p for data, cat, split, path, images in datas
              for p in _people(data, cat, path, images, split, lambda image_id: 0)]
    skeleton = coco_skeleton(first, people, datas[0][3], min_keypoints)
    dataset_dir = Path(root) / name
    limbs = skeleton.pop("limbs")
    extra = skeleton.pop("skeleton_extra")
    skeleton_text = ("# Generated by `deeppose index --coco` from the keypoint category "
                     f"{first.get('name')!r} of {datas[0][3]}.\n"
                     + "".join(f"{k} = {_toml(v)}\n" for k, v in skeleton.items())
                     + "".join("\n" + _table("limbs", e, array=True) for e in limbs)
                     + "".join("\n" + _table("skeleton_extra", e, array=True) for e in extra))
    rule: dict[str, Any] = {"rule": "random" if splits == [None] else "annotated"}
    if rule["rule"] == "random":
        rule["val_fraction"] = 0.1 if val_fraction is None else val_fraction
    elif val_fraction is not None:
        rule["val_fraction"] = val_fraction
    rule["seed"] = 0 if seed is None else seed
    headline = "pckh@0.5" if "head_segment" in skeleton else "pck@0.2"
    title = f"{name} (COCO-format keypoints: {first.get('name')})"
    manifest_text = "".join([
        "# Generated by `deeppose index --coco`: a COCO-format keypoint dataset whose images\n"
        "# stay where its sources say. `deeppose index NAME` indexes it again.\n",
        f"name = {_toml(name)}\n",
        f"title = {_toml(title)}\n",
        'citation = ""\nhomepage = ""\nformat = "coco"\n\n',
        _table("archive", {"filename": "", "urls": []}), "\n",
        _table("annotation", {"category": str(first.get("name"))}), "\n",
        "".join(_table("annotation.sources",
                       {**({"split": split} if split else {}),
                        "annotations": str(path.resolve()), "images": str(images.resolve())},
                       array=True) + "\n"
                for _data, _cat, split, path, images in datas),
        _table("splits", rule), "\n",
        _table("evaluation", {"headline": headline}), "\n",
        _table("joints", {"include": SKELETON_FILE}),
    ])
    dataset_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dataset_dir / SKELETON_FILE, skeleton_text)
    atomic_write_text(dataset_dir / GENERATED_MANIFEST, manifest_text)
    return read_dataset_manifest(dataset_dir / GENERATED_MANIFEST)
