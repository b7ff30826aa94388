"""Reading images a user gives us: bounded in size, and truncated files recognised.

Every decode in the toolkit goes through :func:`read_bgr`, so a 30000 x 30000 PNG (a
decompression bomb: a small file that decodes to gigabytes) is refused from its header,
before any pixel is decoded.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .errors import DeepPoseError

# 100 megapixels (300 MB decoded): above any camera photo of a person, far below a bomb.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "DEEPPOSE_MAX_IMAGE_PIXELS"


class ImageError(DeepPoseError):
    """An image file that cannot be used; ``reason`` is the message without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def max_image_pixels() -> int:
    """The pixel bound: ``$DEEPPOSE_MAX_IMAGE_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise DeepPoseError(f"${MAX_PIXELS_ENV} must be a positive integer, got {text!r}")
    return value


def _jpeg_size(f) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first start-of-frame marker."""
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            f.seek(-1, os.SEEK_CUR)
            continue
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:  # markers without a length
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                    0xCF):
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        if kind == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        f.seek(length - 2, os.SEEK_CUR)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG, BMP, GIF or WebP header without decoding, or
    None for a format this does not parse (OpenCV's own pixel limit still applies then)."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(f)
        if head.startswith(b"BM") and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            if head[12:16] == b"VP8X":
                return (int.from_bytes(head[24:27], "little") + 1,
                        int.from_bytes(head[27:30], "little") + 1)
            if head[12:16] == b"VP8 ":
                return (int.from_bytes(head[26:28], "little") & 0x3FFF,
                        int.from_bytes(head[28:30], "little") & 0x3FFF)
            if head[12:16] == b"VP8L" and head[20] == 0x2F:
                bits = int.from_bytes(head[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def truncation_reason(path: Path) -> str | None:
    """Why a JPEG or PNG file is cut short, or None. OpenCV decodes a truncated JPEG with a
    warning and grey pixels, which would silently train on a grey half-image."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read()
    if head.startswith(b"\xff\xd8"):
        # Entropy-coded data never holds FF D9 (an FF there is followed by 00 or a restart
        # marker), so a file cut inside the scan has no end-of-image marker in its last KiB.
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail[-16:]:
            return "truncated PNG (no IEND chunk)"
    return None


def read_bgr(path: Path | str) -> np.ndarray:
    """Decode an image file as BGR uint8 HWC, refusing missing, unreadable and oversized ones
    with a one-line :class:`DeepPoseError`."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such file")
    limit = max_image_pixels()
    try:
        size = header_size(path)
    except OSError as e:
        raise ImageError(path, f"cannot read ({e.strerror or e})") from None
    if size is None or size[0] * size[1] <= limit:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ImageError(path, "not an image OpenCV can read")
        size = image.shape[1], image.shape[0]
    if size[0] * size[1] > limit:
        raise ImageError(path, f"{size[0]} x {size[1]} pixels is more than the {limit:,} "
                               f"this reads (set ${MAX_PIXELS_ENV} to allow more)")
    return image


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
