"""Annotation files of the datasets the field uses, read into :class:`Person` candidates.

Each reader takes a manifest and its fetched dataset directory and returns every annotated
person it finds, before any check against the images: ``annotations.build_index`` checks
them (readable image, finite joints, enough labelled joints), assigns splits and writes the
index files. A structural problem with the file (not a MATLAB file, a variable or field
missing, the wrong shape) raises one :class:`DeepPoseError` line naming the file and what
is wrong; a problem with one person is recorded on it (``Person.problem``) and that person
is skipped and listed, while the rest go on.

MATLAB stores pixel coordinates 1-based; every reader returns 0-based pixels (pixel centres
at integers), as the index files hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DeepPoseError
from ..core.manifests import DatasetManifest

#: MPII: the person's height is about 200 px x ``scale``; the hourglass and HRNet loaders
#: crop a square of 1.25 x that side, centred 15 x ``scale`` px below ``objpos``.
MPII_BOX_PADDING = 1.25
MPII_CENTRE_SHIFT = 15.0
#: MPII's PCKh head size: this fraction of the head box's diagonal (the official
#: evaluation's SC_BIAS).
MPII_HEAD_FRACTION = 0.6


@dataclass
class Person:
    """One annotated person as its annotation file describes it, before any checks."""

    id: str
    image: Path
    joints: np.ndarray                 # (J, 2) 0-based pixels; NaN where not labelled
    visible: np.ndarray                # (J,) bool: the joint is labelled and counts
    group: int                         # its image's 1-based number: one image, one split
    box: np.ndarray | None = None      # (cx, cy, w, h) from the annotations; None: from joints
    head_size: float | None = None     # the PCKh normalizer, where the dataset gives one
    split: str | None = None           # the split the annotations assign, if any
    problem: str | None = None         # why it cannot be used (it is skipped and listed)


def load_mat(path: Path, variable: str) -> Any:
    """``variable`` of a MATLAB file, with structs as attribute objects."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), struct_as_record=False)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DeepPoseError(f"cannot read annotations {path}: {' '.join(str(e).split())}") \
            from None
    if variable not in data:
        raise DeepPoseError(f"{path}: no variable `{variable}` in the file")
    return data[variable]


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, np.ndarray) and value.size == 0)


def _structs(value: Any) -> list[Any]:
    """The structs of a MATLAB struct array (any shape; empty -> [])."""
    if _is_empty(value):
        return []
    if hasattr(value, "_fieldnames"):
        return [value]
    return [v for v in np.asarray(value, dtype=object).ravel() if hasattr(v, "_fieldnames")]


def _struct(value: Any) -> Any | None:
    found = _structs(value)
    return found[0] if found else None


def _number(value: Any) -> float | None:
    """A MATLAB scalar (1x1 numeric, or a numeric string such as MPII's ``'1'``), else None."""
    if _is_empty(value):
        return None
    item = np.asarray(value).ravel()[0]
    try:
        number = float(item)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text(value: Any) -> str | None:
    if _is_empty(value):
        return None
    if isinstance(value, str):
        return value
    item = np.asarray(value).ravel()[0]
    return item if isinstance(item, str) else None


def _field(struct: Any, name: str) -> Any:
    return getattr(struct, name, None)


# --------------------------------------------------------------------------------------------
# MPII Human Pose: the RELEASE struct of mpii_human_pose_v1_u12_1.mat


def read_mpii(manifest: DatasetManifest, dataset_dir: Path) -> list[Person]:
    """Every person of MPII's training images that carries joint annotations.

    ``RELEASE.annolist(i)`` is image i: ``image.name`` and ``annorect(r)``, person r, with
    ``annopoints.point(p)`` (``id`` 0-15, ``x``, ``y``, ``is_visible``), ``objpos`` (``x``,
    ``y``) and ``scale`` (person height / 200 px), and the head box ``x1, y1, x2, y2``.
    ``RELEASE.img_train(i)`` is 1 for the training images; the others are the test set,
    whose labels are not public. A labelled point counts whatever its ``is_visible``
    (occluded joints are annotated where they are, and MPII's PCKh scores them too); that
    flag is stored as a number, a string or an empty array, and is not needed.

    Person box: square, side ``1.25 x 200 x scale``, centred ``15 x scale`` px below
    ``objpos`` (the rule of the stacked-hourglass and HRNet MPII loaders). Head size for PCKh:
    0.6 x the head box diagonal, as in the official evaluation.
    """
    path = dataset_dir / manifest.annotations_file
    release = _struct(load_mat(path, "RELEASE"))
    if release is None:
        raise DeepPoseError(f"{path}: `RELEASE` is not a struct")
    annolist = _structs(_field(release, "annolist"))
    if not annolist:
        raise DeepPoseError(f"{path}: RELEASE has no annolist")
    train_flags = _field(release, "img_train")
    if _is_empty(train_flags) or np.asarray(train_flags).size != len(annolist):
        raise DeepPoseError(f"{path}: RELEASE.img_train must hold one flag per annolist entry "
                            f"({len(annolist)})")
    try:
        train_flags = np.asarray(train_flags, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DeepPoseError(f"{path}: RELEASE.img_train must hold numbers") from None
    template = str(manifest.archive.get("image_template", "images/{}"))
    num_joints = manifest.num_joints
    people: list[Person] = []
    for number, (entry, is_train) in enumerate(zip(annolist, train_flags), 1):
        if is_train != 1:
            continue
        name = _text(_field(_struct(_field(entry, "image")), "name"))
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise DeepPoseError(f"{path}: annolist({number}).image.name is missing or not a "
                                f"file name")
        image = dataset_dir / template.format(name)
        for r, rect in enumerate(_structs(_field(entry, "annorect")), 1):
            people.append(_mpii_person(rect, f"{Path(name).stem}_{r}", image, number,
                                       num_joints))
    return people


def _mpii_person(rect: Any, person_id: str, image: Path, group: int,
                 num_joints: int) -> Person:
    joints = np.full((num_joints, 2), np.nan)
    visible = np.zeros(num_joints, dtype=bool)
    person = Person(person_id, image, joints, visible, group)
    points = _structs(_field(_struct(_field(rect, "annopoints")), "point"))
    if not points:
        person.problem = "no joint annotations (annopoints)"
        return person
    for point in points:
        joint, x, y = (_number(_field(point, k)) for k in ("id", "x", "y"))
        if joint is None or x is None or y is None:
            person.problem = "a point without a numeric id, x or y"
            return person
        if joint != int(joint) or not 0 <= joint < num_joints:
            person.problem = f"point id {joint:g} outside 0..{num_joints - 1}"
            return person
        joints[int(joint)] = (x - 1.0, y - 1.0)
        visible[int(joint)] = True
    objpos = _struct(_field(rect, "objpos"))
    centre = [_number(_field(objpos, k)) for k in ("x", "y")] if objpos is not None else []
    scale = _number(_field(rect, "scale"))
    if len(centre) == 2 and None not in centre and scale is not None and scale > 0:
        side = MPII_BOX_PADDING * 200.0 * scale
        person.box = np.array([centre[0] - 1.0, centre[1] - 1.0 + MPII_CENTRE_SHIFT * scale,
                               side, side])
    head = [_number(_field(rect, k)) for k in ("x1", "y1", "x2", "y2")]
    if None not in head:
        diagonal = float(np.hypot(head[2] - head[0], head[3] - head[1]))
        if diagonal > 0:
            person.head_size = MPII_HEAD_FRACTION * diagonal
    return person


# --------------------------------------------------------------------------------------------
# FLIC: examples.mat


def read_flic(manifest: DatasetManifest, dataset_dir: Path) -> list[Person]:
    """Every example of FLIC's ``examples.mat``: ``coords`` (2 x 29, NaN where a joint is not
    labelled) read at the manifest's ``[annotation] coords_rows``, the image ``filepath``,
    and the official split from ``istrain`` / ``istest``."""
    path = dataset_dir / manifest.annotations_file
    examples = _structs(load_mat(path, "examples"))
    if not examples:
        raise DeepPoseError(f"{path}: `examples` holds no examples")
    rows = [int(r) for r in manifest.annotation.get("coords_rows", range(manifest.num_joints))]
    if len(rows) != manifest.num_joints:
        raise DeepPoseError(f"{manifest.path}: [annotation] coords_rows names {len(rows)} rows "
                            f"for {manifest.num_joints} joints")
    template = str(manifest.archive.get("image_template", "images/{}"))
    people = []
    for number, example in enumerate(examples, 1):
        where = f"{path}: examples({number})"
        try:
            coords = np.asarray(_field(example, "coords"), dtype=np.float64)
        except (TypeError, ValueError):
            raise DeepPoseError(f"{where}.coords must hold numbers") from None
        if coords.ndim != 2 or coords.shape[0] != 2 or coords.shape[1] <= max(rows):
            raise DeepPoseError(f"{where}.coords must be 2 x K with K > {max(rows)}, "
                                f"got {' x '.join(map(str, coords.shape)) or 'nothing'}")
        filepath = _text(_field(example, "filepath"))
        if not filepath or "\\" in filepath or ".." in Path(filepath).parts or \
                Path(filepath).is_absolute():
            raise DeepPoseError(f"{where}.filepath is missing or leaves the image directory")
        joints = coords[:, rows].T - 1.0
        visible = np.isfinite(joints).all(axis=1)
        person = Person(Path(filepath).stem, dataset_dir / template.format(filepath), joints,
                        visible, number)
        is_train, is_test = (_number(_field(example, k)) for k in ("istrain", "istest"))
        if is_train is None and is_test is None:
            raise DeepPoseError(f"{where} has neither istrain nor istest")
        person.split = "train" if is_train else "test" if is_test else None
        if person.split is None:
            person.problem = "in neither the official train nor test split"
        people.append(person)
    return people
