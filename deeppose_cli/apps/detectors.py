"""Finding the people in an image: person boxes from a detector or a boxes file.

A detector maps a BGR image to :class:`Detection` s (person box ``x, y, w, h`` in pixels and
a score in [0, 1]). The cascade's stage 1 is then given a square crop around each box,
enlarged the way training crops were (:func:`crop_box`). ``none`` gives the whole image as
the crop, as `deeppose predict` always did. docs/predict.md#finding-the-people.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.errors import DeepPoseError
from ..core.geometry import MAX_PIXEL_COORDINATE, MIN_BOX_SIDE

DETECTORS = ("none", "hog", "torchvision")

# Training crops are squares around the labelled joints, 1.4 x their extent (a 0.2 margin on
# each side, `index --box-margin`). A detector's box holds the whole body (head top to feet),
# a little more than the joints' extent: its crop is a square 1.25 x its longer side. HOG's
# 64 x 128 window already holds a margin (the person is about 96 px of its 128): its crop is
# the square of its longer side.
CROP_SCALE = {"boxes": 1.25, "torchvision": 1.25, "hog": 1.0}


@dataclass
class Detection:
    """A person box ``(x, y, w, h)`` in image pixels, its score in [0, 1], and the square
    crop the cascade's stage 1 is given ``(cx, cy, side, side)``."""

    box: list[float]
    score: float
    crop: np.ndarray


def crop_box(box: Sequence[float], scale: float) -> np.ndarray:
    """The stage-1 crop ``(cx, cy, s, s)`` of a person box ``(x, y, w, h)``: a square on the
    box's centre, ``scale`` x its longer side."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h, MIN_BOX_SIDE) * scale
    return np.array([x + w / 2.0, y + h / 2.0, side, side])


def whole_image(width: int, height: int) -> Detection:
    """The whole image as the person: its centred square (as `predict` did before people
    were detected)."""
    side = float(max(width, height))
    return Detection([0.0, 0.0, float(width), float(height)], 1.0,
                     np.array([(width - 1) / 2.0, (height - 1) / 2.0, side, side]))


def given_box(box: Sequence[float]) -> Detection:
    """``--bbox``: the crop exactly as given (not squared or enlarged)."""
    from ..core.geometry import box_from_xywh

    return Detection([float(v) for v in box], 1.0, box_from_xywh(*box))


def clip_box(box: Sequence[float], width: int, height: int) -> list[float] | None:
    """``box`` (x, y, w, h) cut to the image, or None when less than a pixel of it is in."""
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def keep(detections: list[Detection], min_score: float, max_people: int | None
         ) -> list[Detection]:
    """Those scoring at least ``min_score``, best first, at most ``max_people``."""
    kept = sorted((d for d in detections if d.score >= min_score), key=lambda d: -d.score)
    return kept[:max_people] if max_people is not None else kept


Detector = Callable[[np.ndarray], list[Detection]]


# ----------------------------------------------------------------------------- hog


def hog_detector() -> Detector:
    """OpenCV's HOG + linear SVM people detector (Dalal & Triggs), no download. Its score is
    the SVM margin through a logistic, 1 / (1 + exp(-margin)): 0.5 at the decision boundary.
    The main OpenCV 5 wheel lacks it (the contrib wheel has it)."""
    import cv2

    if not hasattr(cv2, "HOGDescriptor"):
        raise DeepPoseError(
            f"--detector hog needs cv2.HOGDescriptor, which this OpenCV {cv2.__version__} "
            "wheel lacks: install opencv-contrib-python-headless of the same version in place "
            "of opencv-python-headless (pip uninstall opencv-python-headless; pip install "
            f"opencv-contrib-python-headless=={cv2.__version__}.*)")
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def detect(image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        if h < 128 or w < 64:  # smaller than the detection window: look at it enlarged
            factor = max(128 / h, 64 / w)
            resized = cv2.resize(image, (max(64, math.ceil(w * factor)),
                                         max(128, math.ceil(h * factor))))
        else:
            factor, resized = 1.0, image
        rects, weights = hog.detectMultiScale(resized, winStride=(8, 8), padding=(8, 8),
                                              scale=1.05)
        found = []
        for rect, weight in zip(np.reshape(rects, (-1, 4)), np.ravel(weights)):
            box = clip_box([v / factor for v in rect], w, h)
            if box is not None:
                score = float(1.0 / (1.0 + math.exp(-float(weight))))
                found.append(Detection(box, score, crop_box(box, CROP_SCALE["hog"])))
        return found

    return detect


# ----------------------------------------------------------------------------- torchvision

TORCHVISION_MODEL = "fasterrcnn_mobilenet_v3_large_fpn"
COCO_PERSON = 1  # the person label of torchvision's COCO detectors


def load_detector_weights(path: Path) -> dict:
    """A state dict from ``path``, loaded as data only (``weights_only``: a file a user
    gives us never runs code)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DeepPoseError(f"--detector-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepPoseError(f"--detector-weights {path}: not a PyTorch weights file that "
                            f"loads as plain data ({detail[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint holding the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise DeepPoseError(f"--detector-weights {path}: not a state dict (a mapping of "
                            "parameter names to tensors)")
    return state


def torchvision_detector(weights: Path | None = None, device: str = "cpu",
                         min_score: float = 0.5) -> Detector:
    """torchvision's Faster R-CNN MobileNetV3-Large FPN trained on COCO; only its person
    boxes are kept. Without ``weights`` torchvision's own COCO weights are used, downloaded
    into its cache on first use (``torch.hub.get_dir()``); ``weights``: a state dict file of
    that network (e.g. that download, copied to a machine without internet)."""
    import torch
    from torchvision.models import detection

    build = getattr(detection, TORCHVISION_MODEL)
    kwargs = dict(weights_backbone=None, box_score_thresh=min_score)
    if weights is not None:
        state = load_detector_weights(weights)
        model = build(weights=None, num_classes=91, **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DeepPoseError(f"--detector-weights {weights}: not the weights of "
                                f"{TORCHVISION_MODEL} ({first[1].strip() if len(first) > 1 else first[0]})"[:400]) from None
    else:
        default = detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
        try:
            model = build(weights=default, **kwargs)
        except Exception as e:  # no network: URLError, socket errors, hash mismatch
            raise DeepPoseError(
                f"--detector torchvision: could not get the COCO weights ({type(e).__name__}: "
                f"{str(e).strip()[:120]}); download {default.url} elsewhere and give it with "
                "--detector-weights FILE") from None
    model.eval().to(device)

    def detect(image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        tensor = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255.0)
        with torch.inference_mode():
            out = model([tensor])[0]
        found = []
        for box, label, score in zip(out["boxes"].cpu().numpy(), out["labels"].cpu().numpy(),
                                     out["scores"].cpu().numpy()):
            if int(label) != COCO_PERSON or not np.all(np.isfinite(box)):
                continue
            clipped = clip_box([box[0], box[1], box[2] - box[0], box[3] - box[1]], w, h)
            if clipped is not None:
                found.append(Detection(clipped, float(score),
                                       crop_box(clipped, CROP_SCALE["torchvision"])))
        return found

    return detect


def make_detector(name: str, weights: Path | None = None, device: str = "cpu",
                  min_score: float = 0.5) -> Detector | None:
    """The detector called ``name`` (one of :data:`DETECTORS`); None for ``none``."""
    if name == "none":
        if weights is not None:
            raise DeepPoseError("--detector-weights is for --detector torchvision")
        return None
    if name == "hog":
        if weights is not None:
            raise DeepPoseError("--detector-weights is for --detector torchvision (hog has "
                                "its weights built in)")
        return hog_detector()
    if name == "torchvision":
        return torchvision_detector(weights, device, min_score)
    raise DeepPoseError(f"unknown detector {name!r}: one of {', '.join(DETECTORS)}")


# ----------------------------------------------------------------------------- boxes files


@dataclass
class BoxEntry:
    key: str | int   # a file name or path (str), or an image_id (int)
    frame: int | None
    box: list[float]
    score: float


class BoxesFile:
    """Person boxes per image read from a file (docs/predict.md#boxes-files).

    JSON: a list of objects (COCO detection results) with ``bbox`` [x, y, w, h] in pixels,
    the image as ``file_name`` (or ``image``) or ``image_id``, optionally ``score`` (default
    1), ``category_id`` (entries other than 1, person, are skipped) and ``frame`` (a video's
    0-based frame; without it the box holds for every frame). CSV: a header naming
    ``file_name`` (or ``image``), ``x``, ``y``, ``w``, ``h``, and optionally ``score`` and
    ``frame``. A file name matches an input given as that path, the same file by another
    path, or, when no input has that path, the input of that base name.
    """

    def __init__(self, entries: list[BoxEntry], path: Path):
        self.entries, self.path = entries, path
        self._by_key: dict = {}
        for e in entries:
            self._by_key.setdefault(e.key, []).append(e)

    @classmethod
    def read(cls, path: Path) -> "BoxesFile":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DeepPoseError(f"--boxes {path}: cannot read ({e.strerror or e})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DeepPoseError(f"--boxes {path}: not UTF-8 text") from None
        stripped = text.lstrip()
        entries = (_json_entries(stripped, path) if stripped.startswith(("[", "{"))
                   else _csv_entries(text, path))
        return cls(entries, path)

    def detections(self, source: Path, frame: int | None, image_id: int, width: int,
                   height: int, names: dict) -> tuple[list[Detection], list[str]]:
        """The detections of one image or frame, and a note per box that lies outside it.
        ``names``: :meth:`source_names` of all the inputs."""
        found = list(self._by_key.get(image_id, []))
        for key in names.get(source, ()):
            found += self._by_key.get(key, [])
        detections, notes = [], []
        for entry in found:
            if entry.frame is not None and entry.frame != frame:
                continue
            clipped = clip_box(entry.box, width, height)
            if clipped is None:
                notes.append(f"box {[round(v, 1) for v in entry.box]} of {self.path} lies "
                             f"outside the {width} x {height} image: skipped")
                continue
            detections.append(Detection(clipped, entry.score,
                                        crop_box(clipped, CROP_SCALE["boxes"])))
        return detections, notes

    def source_names(self, sources: Sequence[Path]) -> dict:
        """For each input path, the file-name keys of this file that mean it."""
        keys = {k for k in self._by_key if isinstance(k, str)}
        by_base: dict[str, list[Path]] = {}
        for s in sources:
            by_base.setdefault(s.name, []).append(s)
        resolved = {}
        for key in keys:
            try:
                resolved[key] = os.path.realpath(key)
            except (OSError, ValueError):
                resolved[key] = None
        out: dict = {}
        for s in sources:
            real = os.path.realpath(s)
            mine = [k for k in keys if k == os.fspath(s) or resolved[k] == real]
            mine += [k for k in keys if k == s.name and k not in mine
                     and not any(k == os.fspath(o) for o in sources)
                     and len(by_base.get(s.name, [])) == 1]
            out[s] = mine
        return out


def _number(value, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DeepPoseError(f"{where}: {what} must be a number, got {value!r}"[:300]) from None
    if not math.isfinite(number) or abs(number) > MAX_PIXEL_COORDINATE:
        raise DeepPoseError(f"{where}: {what} must be a finite number of pixels, got {value!r}")
    return number


def _entry(obj: dict, where: str) -> BoxEntry | None:
    if obj.get("category_id", 1) != 1:
        return None
    key = obj.get("file_name", obj.get("image"))
    if key is None:
        key = obj.get("image_id")
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise DeepPoseError(f"{where}: needs the image as file_name, image or image_id")
    elif not isinstance(key, str) or not key:
        raise DeepPoseError(f"{where}: file_name must be a file name")
    bbox = obj.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DeepPoseError(f"{where}: bbox must be [x, y, w, h]")
    box = [_number(v, "bbox", where) for v in bbox]
    if min(box[2:]) < MIN_BOX_SIDE:
        raise DeepPoseError(f"{where}: bbox width and height must be at least "
                            f"{MIN_BOX_SIDE:g} pixel")
    score = _number(obj.get("score", 1.0), "score", where)
    frame = obj.get("frame")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)
                              or frame < 0):
        raise DeepPoseError(f"{where}: frame must be a frame number (0, 1, ...)")
    return BoxEntry(key, frame, box, score)


def _json_entries(text: str, path: Path) -> list[BoxEntry]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepPoseError(f"--boxes {path}: not valid JSON (line {e.lineno}: {e.msg})") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        obj = obj["annotations"]  # a COCO-format file: its boxes
    if not isinstance(obj, list):
        raise DeepPoseError(f"--boxes {path}: must hold a list of boxes")
    entries = []
    for k, item in enumerate(obj):
        where = f"--boxes {path} entry {k}"
        if not isinstance(item, dict):
            raise DeepPoseError(f"{where}: must be an object with bbox and file_name")
        entry = _entry(item, where)
        if entry is not None:
            entries.append(entry)
    return entries


def _csv_entries(text: str, path: Path) -> list[BoxEntry]:
    reader = csv.DictReader(io.StringIO(text))
    header = set(reader.fieldnames or ())
    name = "file_name" if "file_name" in header else "image"
    missing = {name, "x", "y", "w", "h"} - header
    if missing:
        raise DeepPoseError(f"--boxes {path}: a CSV file needs the columns file_name, x, y, "
                            f"w, h (optionally score, frame); missing {', '.join(sorted(missing))}")
    entries = []
    for row in reader:
        where = f"--boxes {path} line {reader.line_num}"
        if None in row or any(row.get(c) in (None, "") for c in (name, "x", "y", "w", "h")):
            raise DeepPoseError(f"{where}: needs {name}, x, y, w, h")
        frame = row.get("frame") or None
        if frame is not None:
            if not frame.strip().isdigit():
                raise DeepPoseError(f"{where}: frame must be a frame number (0, 1, ...)")
            frame = int(frame)
        entries.append(_entry({"file_name": row[name],
                               "bbox": [row["x"], row["y"], row["w"], row["h"]],
                               "score": row.get("score") or 1.0, "frame": frame}, where))
    return entries
