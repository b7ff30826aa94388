"""Dataset annotations -> JSON Lines index files, and reading index files back.

An index file has one JSON object per line, one per image::

    {"id": "im00001", "image": "../images/im00001.jpg", "width": 157, "height": 105,
     "joints": [[x, y], ...], "visible": [1, 0, ...], "box": [x, y, w, h]}

``image`` is absolute or relative to the index file's directory; ``joints`` are 0-based image
pixels (pixel centres at integers) in the dataset's joint order; ``visible`` is 1 where the
joint is visible (invisible joints' coordinates are ignored); ``box`` is the person box
(top-left x, y, width, height) that crops are taken from; an optional ``head_size`` is the
person's PCKh normalizer in pixels (MPII gives one). Any file that follows this format works
for training and evaluation. One line is one annotated person: an image with several people
(MPII, COCO) has several lines, which always land in the same split.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import atomic_write_text
from ..core.geometry import MAX_PIXEL_COORDINATE, MIN_BOX_SIDE, box_from_xywh, person_box
from ..core.manifests import DatasetManifest
from ..core.records import PoseRecord
from .formats import Person, read_flic, read_mpii

SPLITS = ("train", "val", "test")


def read_joints_mat(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``joints.mat`` of LSP (3x14xN, flag 0 = visible) or LSPET (14x3xN, flag 1 = visible).

    Returns joints (N, 14, 2) in 0-based pixels (MATLAB's coordinates are 1-based) and a
    boolean visibility (N, 14). The two archives store the flag with opposite meanings.
    """
    import scipy.io

    try:
        raw = scipy.io.loadmat(str(path))["joints"]
    except KeyError:
        raise DeepPoseError(f"{path}: no variable `joints` in the file") from None
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DeepPoseError(f"cannot read annotations {path}: {e}") from None
    raw = np.asarray(raw)
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        raise DeepPoseError(f"{path}: `joints` must hold numbers, found {raw.dtype.name} values")
    raw = raw.astype(np.float64)
    if fmt not in JOINTS_MAT_LAYOUTS:
        raise DeepPoseError(f"unknown annotation format {fmt!r} (known: "
                            f"{', '.join(sorted(JOINTS_MAT_LAYOUTS))})")
    arr, visible = JOINTS_MAT_LAYOUTS[fmt](raw, path)
    return arr[..., :2] - 1.0, visible


def _lsp_layout(raw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """LSP: 3 x J x N, flag 0 = visible."""
    if raw.ndim != 3 or raw.shape[0] != 3:
        raise DeepPoseError(f"{path}: expected LSP joints 3 x J x N, got {raw.shape}")
    arr = raw.transpose(2, 1, 0)  # N, J, 3
    return arr, arr[..., 2] == 0


def _lspet_layout(raw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """LSPET: J x 3 x N, flag 1 = visible."""
    if raw.ndim != 3 or raw.shape[1] != 3:
        raise DeepPoseError(f"{path}: expected LSPET joints J x 3 x N, got {raw.shape}")
    arr = raw.transpose(2, 0, 1)
    return arr, arr[..., 2] == 1


# A manifest's ``format`` -> how its joints.mat is laid out: (N, J, 3) joints and visibility.
# A dataset in another layout is one function here plus a manifest naming it.
JOINTS_MAT_LAYOUTS = {"lsp": _lsp_layout, "lspet": _lspet_layout}


def split_ids(manifest: DatasetManifest, numbers: list[int], val_fraction: float | None,
              seed: int | None, given: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Assign 1-based image numbers to splits by the manifest's rule.

    ``ranges``: fixed inclusive ranges (LSP: 1-1000 train, 1001-2000 test); a val split is
    carved out of train only when ``val_fraction`` is given. ``random``: a seeded split of
    everything into train and val. ``annotated``: the split the annotations give each image
    (``given``: FLIC's istrain/istest, COCO files named per split); a val split is carved out
    of train only when ``val_fraction`` (or the manifest's) is given.
    """
    rule = manifest.splits.get("rule", "random")
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    if rule == "ranges":
        for split in SPLITS:
            if split in manifest.splits:
                lo, hi = manifest.splits[split]
                out[split] = [n for n in numbers if lo <= n <= hi]
        pool_split, fraction = "train", val_fraction or 0.0
    elif rule == "annotated":
        given = given or {}
        for split in SPLITS:
            out[split] = [n for n in numbers if given.get(n) == split]
        pool_split = "train"
        fraction = manifest.splits.get("val_fraction", 0.0) if val_fraction is None \
            else val_fraction
    elif rule == "random":
        out["train"] = list(numbers)
        pool_split = "train"
        fraction = manifest.splits.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    else:
        raise DeepPoseError(f"{manifest.name}: unknown split rule {rule!r}")
    if not 0.0 <= fraction < 1.0:
        raise DeepPoseError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction > 0:
        seed = manifest.splits.get("seed", 0) if seed is None else seed
        pool = np.array(out[pool_split])
        rng = np.random.default_rng(seed)
        chosen = rng.permutation(len(pool))[: int(round(fraction * len(pool)))]
        val = set(pool[chosen].tolist())
        out["val"] = sorted(val)
        out[pool_split] = [n for n in out[pool_split] if n not in val]
    return out


@dataclass
class IndexReport:
    index_dir: Path
    counts: dict[str, int]
    skipped: list[dict] = field(default_factory=list)

    @property
    def skipped_reasons(self) -> Counter:
        return Counter(s["reason"] for s in self.skipped)

    def files(self) -> dict[str, Path]:
        return {s: self.index_dir / f"{s}.jsonl" for s, n in self.counts.items() if n}


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) of a decodable, complete image, or the reason it is unusable."""
    from ..core.images import ImageError, read_bgr, truncation_reason

    if not path.is_file():
        return "missing image"
    try:
        image = read_bgr(path)
        truncated = truncation_reason(path)
    except ImageError as e:
        return e.reason
    if truncated:
        return truncated
    return image.shape[1], image.shape[0]


def write_index(path: Path, records: Iterable[PoseRecord]) -> None:
    lines = [json.dumps(r.to_json(path.parent), allow_nan=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def joints_mat_people(manifest: DatasetManifest, dataset_dir: Path) -> list[Person]:
    """LSP / LSPET ``joints.mat``: one person per image, image ``n`` at the manifest's
    ``image_template``; the person box comes from the visible joints."""
    annotations = dataset_dir / manifest.annotations_file
    joints, visible = read_joints_mat(annotations, manifest.format)
    if joints.shape[1] != manifest.num_joints:
        raise DeepPoseError(f"{annotations}: {joints.shape[1]} joints, manifest "
                            f"{manifest.name} expects {manifest.num_joints}")
    template = manifest.archive["image_template"]
    people = []
    for n in range(1, len(joints) + 1):
        path = dataset_dir / template.format(n)
        people.append(Person(path.stem, path, joints[n - 1], visible[n - 1], n))
    return people


def _coco_people(manifest: DatasetManifest, dataset_dir: Path) -> list[Person]:
    from .coco import read_coco

    return read_coco(manifest, dataset_dir)


# A manifest's ``format`` -> the reader of its annotations. A dataset in another format is one
# function here (returning ``formats.Person`` candidates) plus a manifest naming it.
ANNOTATION_READERS = {"lsp": joints_mat_people, "lspet": joints_mat_people,
                      "mpii": read_mpii, "flic": read_flic, "coco": _coco_people}


def build_index(manifest: DatasetManifest, dataset_dir: Path, *, val_fraction: float | None = None,
                seed: int | None = None, box_margin: float = 0.2,
                min_visible: int | None = None) -> IndexReport:
    """Parse a fetched dataset into ``dataset_dir/index/{train,val,test}.jsonl``.

    Unreadable images and people with fewer than ``min_visible`` (default: the manifest's)
    labelled joints are skipped and listed in ``index/skipped.jsonl``, not fatal. A person's
    box is the one its annotations give (MPII, COCO), else the square around its labelled
    joints enlarged by ``box_margin`` of its side on each side.
    """
    from concurrent.futures import ThreadPoolExecutor

    dataset_dir = Path(dataset_dir)
    reader = ANNOTATION_READERS.get(manifest.format)
    if reader is None:
        raise DeepPoseError(f"{manifest.path or manifest.name}: unknown annotation format "
                            f"{manifest.format!r} (known: {', '.join(sorted(ANNOTATION_READERS))})")
    annotations = dataset_dir / manifest.annotations_file
    if manifest.annotations_file and not annotations.is_file():
        raise DeepPoseError(f"{annotations} not found: run `deeppose fetch {manifest.name}` first")
    people = reader(manifest, dataset_dir)
    min_visible = manifest.min_visible if min_visible is None else int(min_visible)
    images = sorted({p.image for p in people if p.problem is None})
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = dict(zip(images, pool.map(_image_size, images)))

    records: dict[int, list[PoseRecord]] = {}
    given: dict[int, str] = {}
    skipped = []
    for person in people:
        vis = np.asarray(person.visible, dtype=bool)
        size = sizes.get(person.image)
        reason = person.problem
        if reason is None and isinstance(size, str):
            reason = size
        elif reason is None and not np.isfinite(person.joints[vis]).all():
            reason = "non-finite joint coordinates"
        elif reason is None and int(vis.sum()) < min_visible:
            reason = f"fewer than {min_visible} visible joints"
        if reason:
            skipped.append({"id": person.id, "image": str(person.image), "reason": reason})
            continue
        # An invisible joint's coordinates are ignored; a NaN there must not make the index
        # invalid JSON.
        pose = np.where(np.isfinite(person.joints), person.joints, 0.0)
        box = person.box if person.box is not None else person_box(pose, vis, box_margin)
        records.setdefault(person.group, []).append(PoseRecord(
            id=person.id, image=person.image, joints=pose, visible=vis, box=box,
            width=size[0], height=size[1], head_size=person.head_size))
        if person.split:
            given[person.group] = person.split

    splits = split_ids(manifest, list(records), val_fraction, seed, given)
    index_dir = dataset_dir / "index"
    counts = {}
    for split in SPLITS:
        target = index_dir / f"{split}.jsonl"
        chosen = [r for n in splits[split] for r in records[n]]
        if chosen:
            write_index(target, chosen)
        elif target.exists():
            target.unlink()  # a stale split from an earlier run with other settings
        counts[split] = len(chosen)
    atomic_write_text(index_dir / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    return IndexReport(index_dir=index_dir, counts=counts, skipped=skipped)


def _record_from_json(obj: dict, index_dir: Path, num_joints: int | None,
                      check_images: bool) -> PoseRecord:
    """One index line as a :class:`PoseRecord`; ``ValueError`` says what is wrong with it."""
    for key in ("image", "joints"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(obj["image"], str) or not obj["image"]:
        raise ValueError(f"image must be a file path (a string), found "
                         f"{type(obj['image']).__name__} {_short(obj['image'])}")
    try:
        joints = np.asarray(obj["joints"], dtype=np.float64)
        box_values = np.asarray(obj["box"], dtype=np.float64) if "box" in obj else None
    except OverflowError:
        raise ValueError("a number is too large to be a pixel coordinate") from None
    except (TypeError, ValueError):
        raise ValueError("joints and box must be numbers") from None
    if joints.ndim != 2 or joints.shape[1] != 2:
        raise ValueError("joints must be [[x, y], ...] and visible one flag per joint")
    visible = _visibility(obj.get("visible", [1] * len(joints)), len(joints))
    image = Path(obj["image"])
    if num_joints is not None and len(joints) != num_joints:
        raise ValueError(f"{len(joints)} joints, the skeleton has {num_joints}")
    if not np.isfinite(joints).all():
        raise ValueError("joint coordinates must be finite numbers (NaN or infinity found)")
    if np.abs(joints).max(initial=0.0) > MAX_PIXEL_COORDINATE:
        raise ValueError(f"joint coordinates must be within {MAX_PIXEL_COORDINATE:.0e} pixels "
                         f"of the image origin (found {np.abs(joints).max():.3g})")
    if not image.is_absolute():
        image = index_dir / image
    if box_values is not None:
        if box_values.shape != (4,) or not np.isfinite(box_values).all():
            raise ValueError("box must be four finite numbers x, y, w, h")
        if np.abs(box_values).max() > MAX_PIXEL_COORDINATE:
            raise ValueError(f"box values must be within {MAX_PIXEL_COORDINATE:.0e} pixels")
        box = box_from_xywh(*box_values.tolist())
        if box[2] < MIN_BOX_SIDE or box[3] < MIN_BOX_SIDE:
            raise ValueError(f"box width and height must be at least {MIN_BOX_SIDE:g} pixel")
    else:
        if not visible.any():
            raise ValueError("no box and no visible joint to derive one from")
        box = person_box(joints, visible)
    if check_images and not image.is_file():
        raise ValueError(f"image {image} not found")
    width, height = (_pixel_count(obj.get(key, 0), key) for key in ("width", "height"))
    head_size = obj.get("head_size")
    if head_size is not None:
        if isinstance(head_size, bool) or not isinstance(head_size, (int, float)) or \
                not np.isfinite(head_size) or head_size <= 0:
            raise ValueError("head_size must be a positive number of pixels")
        head_size = float(head_size)
    return PoseRecord(id=str(obj.get("id", image.stem)), image=image, joints=joints,
                      visible=visible, box=box, width=width, height=height,
                      head_size=head_size)


def _visibility(flags: object, count: int) -> np.ndarray:
    """``visible`` as booleans: one 0 or 1 (or false/true) per joint, nothing else; a -1, 2 or
    0.1 is a mistake (another dataset's convention), not a guess to make."""
    if not isinstance(flags, list) or len(flags) != count:
        raise ValueError("joints must be [[x, y], ...] and visible one flag per joint")
    if not all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in flags):
        bad = next(v for v in flags if not (isinstance(v, (bool, int, float)) and v in (0, 1)))
        raise ValueError(f"visible must hold 0 or 1 (or false/true) per joint, found "
                         f"{_short(bad)}")
    return np.array([bool(v) for v in flags], dtype=bool)


def _pixel_count(value: object, key: str) -> int:
    """An image ``width`` or ``height``: a whole number of pixels (0: not recorded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value == value and 0 <= value <= MAX_PIXEL_COORDINATE) or value != int(value):
        raise ValueError(f"{key} must be a whole number of pixels, found {_short(value)}")
    return int(value)


def _short(value: object) -> str:
    try:
        text = repr(value) if isinstance(value, float) else json.dumps(value)
    except (RecursionError, TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# Bad lines listed in one error before the rest are summarised as a count.
MAX_REPORTED_LINES = 20


def read_index(path: Path, num_joints: int | None = None,
               check_images: bool = True) -> list[PoseRecord]:
    """Read and validate a JSONL index file.

    Every record is checked up front (finite joints, a finite positive box, ``num_joints``
    joints when given, the same count on every line, the image file present), so a bad record
    is reported before training starts instead of killing it at whichever iteration meets it.
    All bad lines are reported together, one ``FILE:LINE: reason`` each.
    """
    path = Path(path)
    if not path.is_file():
        raise DeepPoseError(f"index file {path} not found")
    records: list[PoseRecord] = []
    problems: list[str] = []
    first_count: int | None = None
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DeepPoseError(f"cannot read index file {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line, parse_constant=_refuse_constant)
            if not isinstance(obj, dict):
                raise ValueError("each line must be a JSON object")
            record = _record_from_json(obj, path.parent, num_joints, check_images)
            if first_count is None:
                first_count = len(record.joints)
            elif len(record.joints) != first_count:
                raise ValueError(f"{len(record.joints)} joints, but the first record has "
                                 f"{first_count}")
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
        except RecursionError:
            problems.append(f"{where}: not an index record (JSON nested too deeply)")
        except ValueError as e:
            problems.append(f"{where}: {e}")
        else:
            records.append(record)
    if problems:
        shown = problems[:MAX_REPORTED_LINES]
        more = len(problems) - len(shown)
        raise DeepPoseError("\n".join([f"{path}: {len(problems)} invalid record(s); fix or "
                                        "remove them (or re-run `deeppose index`):", *shown]
                                       + ([f"... and {more} more"] if more else [])))
    if not records:
        raise DeepPoseError(f"index file {path} has no records")
    return records


def _refuse_constant(name: str):
    """``json`` accepts NaN and Infinity by default; an index must not."""
    raise ValueError(f"{name} is not a valid number")
