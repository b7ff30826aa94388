"""Reading images a user gives us: bounded in size, truncated files recognised, any path.

Every decode in the toolkit goes through :func:`read_bgr`, so a 30000 x 30000 PNG (a
decompression bomb: a small file that decodes to gigabytes) is refused from its header,
before any pixel is decoded, and so is a file whose header does not parse (OpenCV would
allocate whatever it claims). The bytes are read here and handed to ``cv2.imdecode``:
``cv2.imread`` crashes the process on a path that is not valid UTF-8.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import DeepPoseError
from .image_headers import (DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, bound_opencv_decoding,
                            image_format, jpeg_segments, max_image_pixels)
from .image_headers import header_size as size_from_header

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "ImageError", "max_image_pixels",
           "header_size", "truncation_reason", "read_bgr", "read_rgb"]

# "http://host/x.jpg" becomes "http:/host/x.jpg" in a Path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class ImageError(DeepPoseError):
    """An image file that cannot be used; ``reason`` is the message without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def missing_file_reason(path: Path) -> str:
    """Why ``path`` is not a file to read, in a few words."""
    if path.is_dir():
        return "is a directory, not an image file"
    if _URL.match(str(path)):
        return ("no such file (a URL? images are read from local files: download it "
                "first)")
    return "no such file"


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from an image file's header without decoding it, or None when
    the format is unknown or the header does not parse."""
    with open(path, "rb") as f:
        return size_from_header(f.read())


def truncation_of(data: bytes) -> str | None:
    """Why the JPEG or PNG held in ``data`` is cut short, or None. OpenCV decodes a truncated
    JPEG with a warning and grey pixels, which would silently train on a grey half-image."""
    if data.startswith(b"\xff\xd8"):
        # Entropy-coded data never holds FF D9 (an FF there is followed by 00 or a restart
        # marker), so a file cut inside its scans has no end-of-image marker after the
        # first scan begins. (Searched from there: an EXIF thumbnail before it has its own,
        # and data some cameras append after the image is allowed.)
        scan = next((start + length for kind, start, length in jpeg_segments(data)
                     if kind == 0xDA), None)
        if scan is None or data.find(b"\xff\xd9", scan) < 0:
            return "truncated JPEG (no end-of-image marker)"
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        if data.rfind(b"\x00\x00\x00\x00IEND") < 0:
            return "truncated PNG (no IEND chunk)"
    return None


def truncation_reason(path: Path) -> str | None:
    """:func:`truncation_of` the file at ``path``."""
    with open(path, "rb") as f:
        return truncation_of(f.read())


def read_bgr(path: Path | str) -> np.ndarray:
    """Decode an image file as BGR uint8 HWC, refusing missing, unreadable, truncated and
    oversized ones (and those whose size cannot be read from the header) with a one-line
    :class:`ImageError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, missing_file_reason(path))
    limit = max_image_pixels()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(path, f"cannot read ({e.strerror or e})") from None
    kind = image_format(data)
    if kind is None:
        raise ImageError(path, "not an image OpenCV can read")
    size = size_from_header(data)
    if size is None:
        raise ImageError(path, f"damaged {kind} file: its header does not say how large the "
                               "image is, so it is not decoded")
    if size[0] * size[1] > limit:
        raise _too_large(path, size, limit)
    truncated = truncation_of(data)
    if truncated:
        raise ImageError(path, truncated)
    bound_opencv_decoding()
    import cv2

    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else "cv2.error"
        raise ImageError(path, f"not an image OpenCV can read ({detail})") from None
    if image is None:
        raise ImageError(path, "not an image OpenCV can read")
    if image.shape[0] * image.shape[1] > limit:  # a header that understated the size
        raise _too_large(path, (image.shape[1], image.shape[0]), limit)
    return image


def _too_large(path: Path, size: tuple[int, int], limit: int) -> ImageError:
    return ImageError(path, f"{size[0]} x {size[1]} pixels is more than the {limit:,} "
                            f"this reads (set ${MAX_PIXELS_ENV} to allow more)")


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode an image file as RGB uint8 HWC (the networks' channel order), or raise a
    one-line :class:`ImageError`."""
    import cv2

    return cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- network input

IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def input_scale_bias(gain: np.ndarray | None = None, shift: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, bias)`` with ``pixels * scale + bias`` the network input
    of uint8 RGB pixels: ImageNet normalization, then the colour noise ``x * gain + shift``.

    The one definition of the network input: the host path (:func:`to_network_input`) and
    the engines' device path (uint8 crops sent to the device and normalized there) both
    apply it, as one multiply and one add in float32, so the two give identical inputs."""
    gain = np.ones(3) if gain is None else np.asarray(gain, dtype=np.float64)
    shift = np.zeros(3) if shift is None else np.asarray(shift, dtype=np.float64)
    inv_std = 1.0 / IMAGE_STD.astype(np.float64)
    return ((gain * inv_std / 255.0).astype(np.float32),
            (shift - gain * inv_std * IMAGE_MEAN).astype(np.float32))


def to_network_input(crop: np.ndarray, gain: np.ndarray | None = None,
                     shift: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 HWC crop -> float32 CHW normalized the way the networks expect.

    ``gain`` and ``shift`` (three values each) are the training colour noise, applied to the
    normalized values as ``x * gain + shift``.
    """
    return normalize_crop(crop, *input_scale_bias(gain, shift))


def normalize_crop(crop: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``crop * scale + bias`` per channel, uint8 HWC -> float32 CHW, in a single pass
    straight from uint8: data loading shares the CPU with training, and separate float
    passes (divide, subtract, colour noise) cost more than decoding the JPEG."""
    import cv2

    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"the network input needs an HxWx3 crop, got shape {crop.shape}")
    out = np.empty((3,) + crop.shape[:2], dtype=np.float32)
    for c, plane in enumerate(cv2.split(crop)):  # contiguous planes: faster than strided views
        np.multiply(plane, scale[c], out=out[c], dtype=np.float32)
        out[c] += bias[c]
    return out
