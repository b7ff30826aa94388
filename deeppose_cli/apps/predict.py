"""`deeppose predict`: a cascade on photo collections and videos, one pose per person.

The Python API (docs/predict.md#python-api)::

    from deeppose_cli import PoseModel

    model = PoseModel("runs/lspet/stage2-pytorch", detector="torchvision")
    for result in model.predict(["photos/", "clip.mp4"]):
        for person in result.people:
            print(result.source, result.frame, person.box, person.joints, person.confidence)

A :class:`PoseResult` per image or video frame (like ultralytics' ``Results``) holds its
:class:`Person` s; :func:`write_coco_json` and :func:`write_csv` save a list of them.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import atomic_write, atomic_write_text, check_writable, printable, write_json
from ..core.images import ImageError, read_bgr
from .detectors import BoxesFile, Detection, given_box, keep, make_detector, whole_image
from .sources import Frame, SourceFailure, camera_source, expand_sources, read_frames

# A joint's confidence: the probability, under the Laplace distributions the network
# predicts for its x and y (taken as independent), that the joint lies within this fraction
# of the predicted torso diameter of the prediction along both axes (PDJ@0.2's distance,
# per axis). docs/predict.md#confidence
CONFIDENCE_FRACTION = 0.2


@dataclass
class Person:
    """One person's pose: ``box`` the person box (x, y, w, h, pixels) and its ``score``,
    ``crop`` the square box stage 1 was given (x, y, w, h), ``joints`` (J, 2) in image pixels
    after the last stage, ``confidence`` (J,) in [0, 1] or None when no stage of the model
    predicts Laplace scales."""

    box: list[float]
    score: float
    crop: list[float]
    joints: np.ndarray
    confidence: np.ndarray | None = None

    @property
    def box_text(self) -> str:
        """The box for a message: ``x 12, y 40, 243 x 162`` (whole pixels, never ``-0``)."""
        x, y, w, h = (int(round(v)) + 0 for v in self.box)
        return f"x {x}, y {y}, {w} x {h}"


@dataclass
class PoseResult:
    """The people found in one image (``frame`` None) or one video frame (0-based)."""

    source: Path
    frame: int | None
    image_id: int           # 1, 2, ... in the order the images and frames were read
    width: int
    height: int
    joint_names: tuple[str, ...]
    people: list[Person] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)  # BGR, with keep_images
    skeleton: tuple = field(default=(), repr=False)
    fps: float | None = None  # a video's frame rate

    def plot(self, image: np.ndarray | None = None) -> np.ndarray:
        """The image (BGR) with every person's box and skeleton drawn."""
        from .drawing import draw_people

        image = self.image if image is None else image
        if image is None:
            raise DeepPoseError("this result keeps no image: pass one, or predict with "
                                "keep_images=True")
        return draw_people(image, [(p.box, p.joints) for p in self.people], self.skeleton)

    def to_coco(self) -> list[dict]:
        """The COCO keypoint results of this image: one object per person."""
        return [coco_entry(self, k, person) for k, person in enumerate(self.people)]


def _confidence(coords: np.ndarray, log_scales: np.ndarray, crops: np.ndarray,
                torso_pair: Sequence[int]) -> np.ndarray:
    """(N, J) confidences from joints (N, J, 2) and their log Laplace scales in pixels."""
    from ..core.cascade import safe_diameter

    radius = CONFIDENCE_FRACTION * safe_diameter(coords, torso_pair, crops)  # (N,)
    scales = np.exp(np.asarray(log_scales, dtype=np.float64))
    inside = 1.0 - np.exp(-radius[:, None, None] / np.maximum(scales, 1e-12))
    return np.prod(inside, axis=-1)


class PoseModel:
    """A cascade ready to predict, with the way people are found.

    ``model``: a run or export directory, or a packaged cascade's name (None: the latest
    finished run under ``runs/``). ``detector``: ``none`` (the whole image is the person),
    ``hog`` or ``torchvision`` (docs/predict.md#finding-the-people), ``detector_weights``
    the torchvision detector's state dict file; ``bbox`` one person box (x, y, w, h) used as
    the crop on every image, or ``boxes`` a boxes file; ``min_score`` and ``max_people``
    filter the detections."""

    def __init__(self, model: str | os.PathLike | None = None, *, stages: int | None = None,
                 device: str = "cpu", flip_test: bool | None = None,
                 flip_weights: str = "scales", detector: str = "none",
                 detector_weights: str | os.PathLike | None = None, min_score: float = 0.5,
                 max_people: int | None = None, bbox: Sequence[float] | None = None,
                 boxes: str | os.PathLike | None = None, chunk: int = 32):
        from ..core.cascade import with_flip_test
        from ..core.manifests import run_manifest
        from ..training.runs import load_cascade, resolve_model

        if sum(x is not None for x in (bbox, boxes)) + (detector != "none") > 1:
            raise DeepPoseError("give one way of finding the people: --bbox, --boxes or "
                                "--detector")
        if max_people is not None and max_people < 1:
            raise DeepPoseError("--max-people must be at least 1")
        self.boxes = BoxesFile.read(Path(boxes)) if boxes is not None else None
        self.detector = make_detector(detector, Path(detector_weights)
                                      if detector_weights is not None else None,
                                      device, min_score)
        self.detector_name = detector
        self.bbox, self.min_score, self.max_people = bbox, min_score, max_people
        run_dir, self.note = resolve_model(None if model is None else os.fspath(model))
        cascade, meta = load_cascade(run_dir, device, stages)
        self.manifest = run_manifest(meta)
        self.cascade = with_flip_test(cascade, self.manifest.flip_permutation, flip_test,
                                      flip_weights)
        self.run_dir, self.chunk = run_dir, chunk

    @property
    def joint_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.joint_names)

    @property
    def has_confidence(self) -> bool:
        """Whether some stage predicts Laplace scales (so joints get a confidence)."""
        return any(stage.predictor.has_scales for stage in self.cascade)

    # --------------------------------------------------------------------- people

    def people_of(self, frame: Frame, image_id: int, names: dict | None = None,
                  notes: Callable[[str], None] | None = None) -> list[Detection]:
        h, w = frame.image.shape[:2]
        if self.bbox is not None:
            return [given_box(self.bbox)]
        if self.boxes is not None:
            found, problems = self.boxes.detections(frame.source, frame.frame, image_id, w, h,
                                                    names or {})
            for problem in problems:
                (notes or warnings.warn)(problem)
        elif self.detector is not None:
            found = self.detector(frame.image)
        else:
            return [whole_image(w, h)]
        return keep(found, self.min_score, self.max_people)

    # --------------------------------------------------------------------- predicting

    def _pose(self, frames: list[tuple[Frame, int, list[Detection]]],
              keep_images: bool) -> list[PoseResult]:
        """Results of a chunk of frames with their detections: every person of every frame
        goes through the cascade together."""
        import cv2

        from ..core.cascade import cascade_predictions
        from ..core.geometry import box_to_xywh

        rgb = {}
        images, crops, owners = [], [], []
        for k, (frame, _, detections) in enumerate(frames):
            if detections:
                rgb[k] = cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB)
            for d in detections:
                images.append(rgb[k])
                crops.append(d.crop)
                owners.append((k, d))
        people: list[list[Person]] = [[] for _ in frames]
        if images:
            per_stage = cascade_predictions(self.cascade, images, np.stack(crops),
                                            self.manifest.torso_diameter, self.chunk)
            final = per_stage[-1]
            scaled = next((p for p in reversed(per_stage) if p.log_scales is not None), None)
            confidence = (None if scaled is None else
                          _confidence(final.coords, scaled.log_scales, np.stack(crops),
                                      self.manifest.torso_diameter))
            for n, (k, d) in enumerate(owners):
                people[k].append(Person(
                    [float(v) for v in d.box], float(d.score), box_to_xywh(d.crop),
                    final.coords[n], None if confidence is None else confidence[n]))
        return [PoseResult(frame.source, frame.frame, image_id, frame.image.shape[1],
                           frame.image.shape[0], self.joint_names, people[k],
                           frame.image if keep_images else None, self.manifest.skeleton,
                           frame.fps)
                for k, (frame, image_id, _) in enumerate(frames)]

    def predict_frames(self, frames: Iterable[Frame | SourceFailure], keep_images: bool = False,
                       on_failure: Callable[[SourceFailure], None] | None = None,
                       names: dict | None = None) -> Iterator[PoseResult]:
        """A :class:`PoseResult` per :class:`Frame`, in order, predicted a chunk at a time;
        each :class:`SourceFailure` met goes to ``on_failure`` (default: a warning)."""
        report = on_failure or (lambda f: warnings.warn(str(f), stacklevel=3))
        pending: list[tuple[Frame, int, list[Detection]]] = []
        image_id = 0
        for item in frames:
            if isinstance(item, SourceFailure):
                report(item)
                continue
            image_id += 1
            where = item.source if item.frame is None else f"{item.source} frame {item.frame}"
            pending.append((item, image_id, self.people_of(
                item, image_id, names, lambda note: report(SourceFailure(os.fspath(where),
                                                                         note)))))
            if sum(len(d) for _, _, d in pending) >= self.chunk or len(pending) >= self.chunk:
                yield from self._pose(pending, keep_images)
                pending = []
        if pending:
            yield from self._pose(pending, keep_images)

    def predict(self, sources: Sequence[str | os.PathLike] | str | os.PathLike = (), *,
                recursive: bool = False, every: int = 1, keep_images: bool = False,
                on_failure: Callable[[SourceFailure], None] | None = None,
                camera: int | None = None, max_frames: int | None = None
                ) -> Iterator[PoseResult]:
        """A :class:`PoseResult` per image and video frame that ``sources`` name (files,
        folders, glob patterns, ``@list.txt`` files, videos: docs/predict.md#sources), then
        per frame of camera ``camera`` (until Ctrl-C); with ``every`` N only every N-th
        frame of a video or camera, with ``max_frames`` at most that many of each. What
        cannot be read goes to ``on_failure`` (default: a warning) and the rest goes on."""
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if every < 1:
            raise DeepPoseError("--every must be at least 1")
        if max_frames is not None and max_frames < 1:
            raise DeepPoseError("--max-frames must be at least 1")
        if camera is not None and camera < 0:
            raise DeepPoseError("--camera must be a camera index: 0, 1, ...")
        if not sources and camera is None:
            raise DeepPoseError("nothing to predict: give a SOURCE or --camera N")
        items, failures = expand_sources(sources, recursive)
        if camera is not None:
            items.append(camera_source(camera))
        report = on_failure or (lambda f: warnings.warn(str(f), stacklevel=3))
        for failure in failures:
            report(failure)
        names = self.boxes.source_names([i.path for i in items]) if self.boxes else None
        yield from self.predict_frames(read_frames(items, every, max_frames), keep_images,
                                       report, names)

    def predict_image(self, image: np.ndarray | str | os.PathLike,
                      boxes: Sequence[Sequence[float]] | None = None) -> PoseResult:
        """The result of one image (BGR uint8 array, or a file), its people found as the
        model was set up to, or given as person boxes (x, y, w, h) each enlarged into a
        crop as a boxes file's are."""
        from .detectors import CROP_SCALE, clip_box, crop_box

        if not isinstance(image, np.ndarray):
            path = Path(image)
            image = read_bgr(path)
        else:
            path = Path("<array>")
        frame = Frame(path, None, np.ascontiguousarray(image))
        if boxes is None:
            detections = self.people_of(frame, 1)
        else:
            h, w = image.shape[:2]
            detections = [Detection(b, 1.0, crop_box(b, CROP_SCALE["boxes"]))
                          for b in (clip_box(b, w, h) for b in boxes) if b is not None]
        return self._pose([(frame, 1, detections)], keep_images=True)[0]


def predict(sources, model: str | os.PathLike | None = None, **options) -> list[PoseResult]:
    """``PoseModel(model, **options).predict(sources)`` as a list: the one-call form."""
    split = {k: options.pop(k) for k in ("recursive", "every", "keep_images", "on_failure",
                                         "camera", "max_frames") if k in options}
    return list(PoseModel(model, **options).predict(sources, **split))


# ----------------------------------------------------------------------------- outputs


def coco_entry(result: PoseResult, index: int, person: Person) -> dict:
    """One COCO keypoint result: ``image_id``, ``category_id`` 1, ``keypoints`` [x, y, v]
    per joint in the model's joint order (v: the joint's confidence, or 1 without one, as
    the COCO results format asks for a number there), ``score`` and ``bbox``; plus the
    ``file_name``, ``frame`` and ``person`` it came from."""
    keypoints = []
    for j, (x, y) in enumerate(person.joints):
        v = 1.0 if person.confidence is None else float(person.confidence[j])
        keypoints += [round(float(x), 2), round(float(y), 2), round(v, 4)]
    return {"image_id": result.image_id, "category_id": 1, "keypoints": keypoints,
            "score": round(person.score, 4), "bbox": [round(v, 2) for v in person.box],
            "file_name": printable(result.source), "frame": result.frame, "person": index}


def write_coco_json(path: Path, results: Iterable[PoseResult]) -> Path:
    """The COCO keypoint results file (a JSON list, as pycocotools' ``loadRes`` reads)."""
    return write_json(path, [entry for r in results for entry in r.to_coco()])


# The CSV's columns, the same for every model: a joint is named in a column.
CSV_HEADER = ("source", "frame", "image_id", "person", "score", "box_x", "box_y", "box_w",
              "box_h", "joint", "x", "y", "confidence")


def csv_text(results: Iterable[PoseResult], joint_names: Sequence[str]) -> str:
    """One row per image or frame, person and joint (:data:`CSV_HEADER`), joints in the
    model's order; ``frame`` is empty for an image, ``confidence`` empty without one."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in results:
        for k, p in enumerate(r.people):
            head = [printable(r.source), "" if r.frame is None else r.frame, r.image_id, k,
                    f"{p.score:.4f}", *(f"{v:.2f}" for v in p.box)]
            for j, (name, (x, y)) in enumerate(zip(joint_names, p.joints)):
                c = "" if p.confidence is None or not math.isfinite(p.confidence[j]) \
                    else f"{p.confidence[j]:.4f}"
                writer.writerow([*head, name, f"{x:.2f}", f"{y:.2f}", c])
    return out.getvalue()


def write_csv(path: Path, results: Sequence[PoseResult], joint_names: Sequence[str]) -> Path:
    atomic_write_text(Path(path), csv_text(results, joint_names))
    return Path(path)


class DrawnOutputs:
    """``--draw``: each image as ``OUT/STEM_pose.png`` and each video as ``OUT/STEM_pose.mp4``
    (mp4v, the source's frame rate divided by ``every``, its frame size); a name taken by an
    earlier input of the same call gets ``-2``, ``-3``, ... . Videos are written under a
    temporary name and renamed when complete."""

    def __init__(self, out_dir: Path, every: int = 1):
        check_writable(out_dir)  # before any work: a read-only --out fails in one line
        self.out_dir, self.every = Path(out_dir), every
        self.used: set[str] = set()
        self.video = None  # (source, writer, temp path, target)
        self.written: list[Path] = []

    def _target(self, source: Path, suffix: str) -> Path:
        stem = os.fsencode(source.stem)
        name, n = stem + b"_pose" + suffix.encode(), 1
        while name in self.used:
            n += 1
            name = stem + f"_pose-{n}".encode() + suffix.encode()
        self.used.add(name)
        return self.out_dir / os.fsdecode(name)

    def add(self, result: PoseResult, image: np.ndarray, fps: float | None) -> Path | None:
        drawn = result.plot(image)
        if result.frame is None:
            self.finish()
            target = self._target(result.source, ".png")
            atomic_write(target, lambda tmp: _write_png(tmp, drawn))
            self.written.append(target)
            return target
        if self.video is None or self.video[0] != result.source:
            self.finish()
            self._open_video(result.source, drawn, fps)
        self.video[1].write(drawn)
        return None

    def _open_video(self, source: Path, first: np.ndarray, fps: float | None) -> None:
        import tempfile

        import cv2

        target = self._target(source, ".mp4")
        # OpenCV takes a str path it can encode: write under a plain name, rename at the end.
        folder = self.out_dir if _encodable(self.out_dir) else Path(tempfile.gettempdir())
        fd, tmp = tempfile.mkstemp(prefix=".drawn-video.tmp-", suffix=".mp4", dir=folder)
        os.close(fd)
        rate = (fps or 25.0) / self.every
        h, w = first.shape[:2]
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), rate, (w, h))
        if not writer.isOpened():
            os.unlink(tmp)
            raise DeepPoseError(f"cannot write {printable(target)}: OpenCV's video writer "
                                "has no mp4v encoder here")
        self.video = (source, writer, Path(tmp), target)

    def finish(self) -> None:
        """Close the video being written and move it into place."""
        if self.video is None:
            return
        _, writer, tmp, target = self.video
        self.video = None
        writer.release()
        try:
            if tmp.parent == target.parent:
                os.replace(tmp, target)
            else:
                import shutil

                atomic_write(target, lambda t: shutil.copyfile(tmp, t))
        finally:
            tmp.unlink(missing_ok=True)
        self.written.append(target)

    def abandon(self) -> None:
        if self.video is not None:
            self.video[1].release()
            self.video[2].unlink(missing_ok=True)
            self.video = None


def _encodable(path: Path) -> bool:
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise DeepPoseError(f"could not encode {path}")
    Path(path).write_bytes(data.tobytes())


# ----------------------------------------------------------------------------- the command


@dataclass
class PredictSummary:
    results: list[PoseResult]
    failures: list[SourceFailure]
    drawn: list[Path]
    seconds: float
    frames_without_people: int


def run_predict(model: PoseModel, sources: Sequence[str], *, recursive: bool = False,
                every: int = 1, draw_dir: Path | None = None, save_json: Path | None = None,
                save_csv: Path | None = None, progress: bool = False,
                camera: int | None = None, max_frames: int | None = None) -> PredictSummary:
    """What `deeppose predict` does after parsing: predict every source, draw, and write the
    JSON and CSV files at the end (atomically: an interrupted call leaves none)."""
    import time

    for target in (save_json, save_csv):
        if target is not None:
            check_writable(Path(target).parent if str(Path(target).parent) else Path("."))
    drawn = DrawnOutputs(draw_dir, every) if draw_dir is not None else None
    failures: list[SourceFailure] = []
    results: list[PoseResult] = []
    start = time.perf_counter()
    bar = _ProgressBar() if progress else None
    try:
        for result in model.predict(sources, recursive=recursive, every=every,
                                    keep_images=drawn is not None,
                                    on_failure=failures.append, camera=camera,
                                    max_frames=max_frames):
            if drawn is not None:
                try:
                    drawn.add(result, result.image, result.fps)
                except DeepPoseError as e:  # a full disk: the prediction itself stands
                    failures.append(SourceFailure(os.fspath(result.source),
                                                  f"predicted, but the drawing was not "
                                                  f"written ({e})"))
            result.image = None  # the pixels are not kept for the whole collection
            results.append(result)
            if bar is not None:
                bar.update(len(results), result)
        if drawn is not None:
            drawn.finish()
    except BaseException:
        if drawn is not None:
            drawn.abandon()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if not results:  # nothing was read: an earlier file of that name is left as it was
        for target in (save_json, save_csv):
            if target is not None:
                failures.append(SourceFailure(os.fspath(target), "not written: no image or "
                                                                 "frame could be read"))
        save_json = save_csv = None
    if save_json is not None:
        write_coco_json(Path(save_json), results)
    if save_csv is not None:
        write_csv(Path(save_csv), results, model.joint_names)
    return PredictSummary(results, failures, drawn.written if drawn is not None else [],
                          seconds, sum(1 for r in results if not r.people))


class _ProgressBar:
    """images/s (or frames/s) on stderr while a collection is predicted."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task("predicting", total=None)
        self.progress.start()
        import time

        self.start, self.clock = time.perf_counter(), time.perf_counter

    def update(self, count: int, result: PoseResult) -> None:
        rate = count / max(self.clock() - self.start, 1e-9)
        unit = "images" if result.frame is None else "frames"
        self.progress.update(self.task, description=f"predicting: {count} {unit}, "
                                                    f"{rate:.1f}/s")

    def close(self) -> None:
        self.progress.stop()


def legacy_json(result: PoseResult) -> list[dict]:
    """`predict --json`'s entries of one result: one per person."""
    out = []
    for k, p in enumerate(result.people):
        entry = {"image": str(result.source), "bbox": [round(v, 2) for v in p.box],
                 "keypoints": [{"name": n, "x": round(float(x), 2), "y": round(float(y), 2)}
                               for n, (x, y) in zip(result.joint_names, p.joints)]}
        if result.frame is not None:
            entry["frame"] = result.frame
        if len(result.people) > 1 or p.score != 1.0:
            entry.update(person=k, score=round(p.score, 4))
        out.append(entry)
    return out


__all__ = ["PoseModel", "PoseResult", "Person", "predict", "write_coco_json", "write_csv",
           "CSV_HEADER", "run_predict", "ImageError"]
