"""What `deeppose predict` reads: image files, folders, glob patterns, ``@list`` files and
videos, expanded into a list of inputs and then read one image or frame at a time.

Every image goes through :func:`core.images.read_bgr` (the bounded, truncation-aware decoder
that takes any path). Videos are read frame by frame with ``cv2.VideoCapture``, which only
takes a ``str`` that OpenCV can encode: a video whose path is not valid UTF-8 is opened
through a symbolic link with a plain name. A source that cannot be used is a
:class:`SourceFailure` (one line) and the others go on.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core.images import ImageError, missing_file_reason, read_bgr

# Suffixes a folder or glob is searched for (a file named on the command line is read
# whatever its suffix: as a video with one of VIDEO_SUFFIXES, else as an image).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff",
                            ".webp", ".jp2", ".pbm", ".pgm", ".ppm", ".pnm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".3gp", ".ts"})
_GLOB_CHARS = set("*?[")
# A video that stops decoding before the frame count of its header is reported (truncated,
# or a broken frame that ends it); containers that store no count get one estimated from
# their duration and frame rate, which may be a frame too many, hence the slack.
STOPPED_EARLY_SLACK = 1
# FFmpeg's own log lines (``[mjpeg @ 0x...] overread 8``) on stderr are silenced: what cannot
# be read is reported in one line. A value the user set is left alone.
FFMPEG_LOGLEVEL_ENV, FFMPEG_QUIET = "OPENCV_FFMPEG_LOGLEVEL", "-8"


@dataclass(frozen=True)
class SourceItem:
    """One input: an image file or a video file."""

    path: Path
    kind: str  # "image", "video" or "camera"
    camera: int | None = None  # a camera's index (kind "camera")


@dataclass(frozen=True)
class SourceFailure:
    """An input, or part of one, that gave nothing: ``where`` (a path, pattern, or
    ``path frame N``) and the reason in a few words."""

    where: str
    reason: str

    def __str__(self) -> str:
        from ..core.files import printable

        return f"{printable(self.where)}: {self.reason}"


@dataclass
class Frame:
    """One decoded picture: an image file (``frame`` None) or frame ``frame`` (0-based) of a
    video, as BGR uint8; ``fps`` is the video's frame rate (None for images)."""

    source: Path
    frame: int | None
    image: np.ndarray
    fps: float | None = None


def kind_of(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _wanted(path: Path) -> bool:
    suffix = path.suffix.lower()
    return (suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES) \
        and not path.name.startswith(".")


def _folder(path: Path, recursive: bool) -> list[Path]:
    found = path.rglob("*") if recursive else path.iterdir()
    return sorted((p for p in found if _wanted(p) and p.is_file()),
                  key=lambda p: os.fsencode(p))


def _list_file(spec: str) -> tuple[list[str], list[SourceFailure]]:
    """The entries of an ``@list.txt`` file: one path, folder or pattern a line; blank lines
    and lines starting with ``#`` are skipped; relative entries are relative to the list
    file's folder. Lines are read as bytes, so any file name can be listed."""
    path = Path(spec[1:])
    try:
        data = path.read_bytes()
    except OSError as e:
        reason = missing_file_reason(path) if not path.is_file() else (e.strerror or str(e))
        return [], [SourceFailure(spec, reason)]
    entries = []
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        entry = os.fsdecode(line)
        if not os.path.isabs(entry):
            entry = os.path.join(os.fsdecode(path.parent), entry)
        entries.append(entry)
    if not entries:
        return [], [SourceFailure(spec, "the list names no file")]
    return entries, []


def expand_sources(specs: Sequence[str | os.PathLike], recursive: bool = False
                   ) -> tuple[list[SourceItem], list[SourceFailure]]:
    """The image and video files that ``specs`` name, in order, and a failure for each spec
    that names none.

    A spec is a file (any suffix), a folder (its images and videos, sorted by name, with
    ``recursive`` those of its subfolders too), a glob pattern (``photos/*.jpg``,
    ``**`` with ``recursive``), or ``@FILE``: a text file listing such specs, one a line.
    """
    items: list[SourceItem] = []
    failures: list[SourceFailure] = []

    def add(spec: str, from_list: bool) -> None:
        path = Path(spec)
        if spec.startswith("@") and not from_list and not path.exists():
            entries, problems = _list_file(spec)
            failures.extend(problems)
            for entry in entries:
                add(entry, True)
        elif path.is_dir():
            found = _folder(path, recursive)
            if not found:
                failures.append(SourceFailure(spec, "no images or videos in this folder"
                                              + ("" if recursive else
                                                 " (--recursive searches its subfolders)")))
            items.extend(SourceItem(p, kind_of(p)) for p in found)
        elif path.is_file() or not (_GLOB_CHARS & set(spec)):
            items.append(SourceItem(path, kind_of(path)))  # a missing file: reported on read
        else:
            matched = sorted((Path(p) for p in glob.glob(spec, recursive=recursive)),
                             key=lambda p: os.fsencode(p))
            files = [p for p in matched if p.is_file()]
            if not files:
                failures.append(SourceFailure(spec, "the pattern matches no file"))
            items.extend(SourceItem(p, kind_of(p)) for p in files)

    for spec in specs:
        add(os.fspath(spec), False)
    return items, failures


# ----------------------------------------------------------------------------- reading


def camera_source(index: int) -> SourceItem:
    """Camera ``index`` (as ``cv2.VideoCapture(index)`` opens it) as an input; its frames'
    ``source`` is ``camera<index>``."""
    return SourceItem(Path(f"camera{index}"), "camera", index)


def read_frames(items: Sequence[SourceItem], every: int = 1, max_frames: int | None = None
                ) -> Iterator[Frame | SourceFailure]:
    """Each image of ``items`` and every ``every``-th frame of each video and camera (at
    most ``max_frames`` of each), in order, as a :class:`Frame`; an image or video that
    cannot be read as one :class:`SourceFailure`."""
    for item in items:
        if item.kind == "video":
            yield from read_video(item.path, every, max_frames)
            continue
        if item.kind == "camera":
            yield from read_camera(item.camera, every, max_frames)
            continue
        try:
            yield Frame(item.path, None, read_bgr(item.path))
        except ImageError as e:
            yield SourceFailure(os.fspath(item.path), e.reason)


def _opencv_name(path: Path) -> str | None:
    """``path`` as OpenCV can take it (a str that encodes as UTF-8), or None."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


class _VideoPath:
    """A path to give ``cv2.VideoCapture``: the video's own, or when that is not valid
    UTF-8, a symbolic link to it with a plain name in a temporary folder (removed on exit)."""

    def __init__(self, path: Path):
        self.path, self.link_dir = path, None

    def __enter__(self) -> str | None:
        name = _opencv_name(self.path)
        if name is not None:
            return name
        try:
            self.link_dir = tempfile.mkdtemp(prefix="deeppose-video-")
            suffix = self.path.suffix if _opencv_name(Path(self.path.suffix)) else ""
            link = os.path.join(self.link_dir, "video" + suffix)
            os.symlink(os.path.abspath(self.path), link)
            return link
        except OSError:
            return None

    def __exit__(self, *exc) -> None:
        if self.link_dir is not None:
            import shutil

            shutil.rmtree(self.link_dir, ignore_errors=True)


def prepare_capture() -> None:
    """What must hold before OpenCV opens its first capture (it reads both then): decoded
    frames bounded like images, and FFmpeg's own log lines silenced."""
    from ..core.image_headers import bound_opencv_decoding

    bound_opencv_decoding()
    os.environ.setdefault(FFMPEG_LOGLEVEL_ENV, FFMPEG_QUIET)


def read_video(path: Path, every: int = 1, max_frames: int | None = None
               ) -> Iterator[Frame | SourceFailure]:
    """Frames 0, every, 2*every, ... of the video at ``path`` (decoded ones only: the others
    are grabbed and skipped), or one :class:`SourceFailure` when it cannot be opened or has
    frames larger than the image bound; the frames read and then one failure when it stops
    decoding before the end its header gives (a truncated file, a broken frame)."""
    from ..core.image_headers import max_image_pixels

    where = os.fspath(path)
    if not path.is_file():
        yield SourceFailure(where, missing_file_reason(path))
        return
    prepare_capture()
    import cv2

    with _VideoPath(path) as name:
        if name is None:
            yield SourceFailure(where, "cannot be opened: OpenCV's video reader takes only "
                                       "UTF-8 file names (rename it)")
            return
        capture = cv2.VideoCapture(name)
        try:
            if not capture.isOpened():
                yield SourceFailure(where, "not a video OpenCV can read")
                return
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            limit = max_image_pixels()
            if width * height > limit:
                yield SourceFailure(where, f"{width} x {height} frames are more than the "
                                           f"{limit:,} pixels this reads")
                return
            fps = float(capture.get(cv2.CAP_PROP_FPS)) or None
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            read = _Frames(capture, path, where, every, max_frames, limit, fps)
            yield from read
            if read.produced == 0 and not read.refused:
                yield SourceFailure(where, "no frame could be read (not a video OpenCV can "
                                           "read, or an empty one)")
            elif not read.refused and not read.bounded and \
                    read.index < total - STOPPED_EARLY_SLACK:
                yield SourceFailure(f"{where} frame {read.index}",
                                    f"could not be decoded: the video stops there "
                                    f"({read.index} of the {total} frames its header counts "
                                    f"were read)")
        finally:
            capture.release()


class _Frames:
    """Frames 0, every, 2*every, ... of an open ``cv2.VideoCapture`` until it gives no more,
    ``max_frames`` were produced, or ``stopped()`` says so; afterwards ``index`` is the
    number of frames read or grabbed, ``produced`` those yielded, ``refused`` whether one
    was over the pixel bound (one failure yielded) and ``bounded`` whether ``max_frames``
    ended it."""

    def __init__(self, capture, path: Path, where: str, every: int, max_frames: int | None,
                 limit: int, fps: float | None, stopped=lambda: False):
        self.capture, self.path, self.where, self.every = capture, path, where, every
        self.max_frames, self.limit, self.fps, self.stopped = max_frames, limit, fps, stopped
        self.index = self.produced = 0
        self.refused = self.bounded = False

    def __iter__(self) -> Iterator[Frame | SourceFailure]:
        capture = self.capture
        while not self.stopped():
            if self.max_frames is not None and self.produced >= self.max_frames:
                self.bounded = True
                return
            if self.index % self.every == 0:
                ok, image = capture.read()
                if not ok or image is None:
                    return
                if image.shape[0] * image.shape[1] > self.limit:
                    self.refused = True
                    yield SourceFailure(f"{self.where} frame {self.index}",
                                        "larger than the pixel bound")
                    return
                self.produced += 1
                yield Frame(self.path, self.index, image, self.fps)
            elif not capture.grab():
                return
            self.index += 1


class _StopOnInterrupt:
    """While a camera is read, Ctrl-C (SIGINT) ends its stream instead of the program: the
    frames read so far are still predicted and written. A second Ctrl-C interrupts as
    usual. Outside the main thread (no signal handler can be set) Ctrl-C is left as is."""

    def __init__(self):
        self.interrupted, self.previous = False, None

    def __enter__(self) -> "_StopOnInterrupt":
        import signal

        def handler(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, self.previous)

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def read_camera(index: int, every: int = 1, max_frames: int | None = None
                ) -> Iterator[Frame | SourceFailure]:
    """Frames 0, every, 2*every, ... of camera ``index`` until it gives no more, Ctrl-C,
    or ``max_frames`` were produced; their ``source`` is ``camera<index>``. A camera that
    cannot be opened or gives no frame is one :class:`SourceFailure`."""
    from ..core.image_headers import max_image_pixels

    item = camera_source(index)
    where = f"camera {index}"
    prepare_capture()
    import cv2

    capture = cv2.VideoCapture(index)
    try:
        if not capture.isOpened():
            yield SourceFailure(where, "cannot be opened (no such camera, or it is in use)")
            return
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or None
        with _StopOnInterrupt() as interrupt:
            read = _Frames(capture, item.path, where, every, max_frames, max_image_pixels(),
                           fps, lambda: interrupt.interrupted)
            yield from read
        if read.produced == 0 and not read.refused and not interrupt.interrupted:
            yield SourceFailure(where, "gave no frame")
    finally:
        capture.release()
