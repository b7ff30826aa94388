"""The pixel size of an image read from its header, for every format OpenCV decodes here.

OpenCV picks its decoder from the file's first bytes, so a file whose signature is none of
these is one it cannot read either. For a recognised signature whose header does not parse,
:func:`header_size` says so (``None``) instead of guessing: the caller refuses to decode it,
because OpenCV would otherwise allocate whatever the damaged header claims. Each parser
reads the header the way the format's decoder does (the JPEG one skips stray bytes before a
marker as libjpeg does), so the size found is the size the decoder will allocate.

The pixel bound lives here too, so the command line can hand it to OpenCV before OpenCV is
loaded. Pure Python: no file access, no NumPy.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from typing import Iterator

from .errors import DeepPoseError

# 100 megapixels (300 MB decoded): above any camera photo of a person, far below a bomb.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "DEEPPOSE_MAX_IMAGE_PIXELS"
# OpenCV's own bound (default 2^30 pixels), read once when OpenCV's library loads.
OPENCV_MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


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


def bound_opencv_decoding() -> None:
    """Give OpenCV the same pixel bound, as a second guard behind the header check: it reads
    ``$OPENCV_IO_MAX_IMAGE_PIXELS`` once, when ``cv2`` is first imported, so this only
    takes effect before that (and leaves a value the user set alone)."""
    if "cv2" in sys.modules or os.environ.get(OPENCV_MAX_PIXELS_ENV):
        return
    try:
        limit = max_image_pixels()
    except DeepPoseError:
        return  # reported where the bound is used
    os.environ[OPENCV_MAX_PIXELS_ENV] = str(limit)

# Signature -> format name, in the order OpenCV tries its decoders (first match wins).
_PNG = b"\x89PNG\r\n\x1a\n"
_JP2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K = b"\xff\x4f\xff\x51"
_SUN_RASTER = b"\x59\xa6\x6a\x95"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def image_format(data: bytes) -> str | None:
    """The name of the format whose signature ``data`` starts with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG):
        return "PNG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in _TIFF:
        return "TIFF"
    if data.startswith((_JP2, _J2K)):
        return "JPEG 2000"
    if data.startswith(_SUN_RASTER):
        return "Sun raster"
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"1234567":
        return "PNM"
    if data[:2] in (b"PF", b"Pf"):
        return "PFM"
    if data.startswith((b"#?RGBE", b"#?RADIANCE")):
        return "Radiance HDR"
    if data[4:8] == b"ftyp" and _is_avif(data):
        return "AVIF"
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an image held in ``data``, or None when its format
    is unknown or its header does not parse (truncated, damaged or an unusual variant)."""
    kind = image_format(data)
    parser = _PARSERS.get(kind) if kind else None
    if parser is None:
        return None
    try:
        size = parser(data)
    except (struct.error, IndexError, ValueError):
        return None
    if size is None or size[0] < 0 or size[1] < 0:
        return None
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------- JPEG

# Start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset of its payload, payload length) of each marker segment up to the
    first scan, found as libjpeg's ``next_marker`` finds them: bytes that are not a marker
    are skipped (libjpeg warns "extraneous bytes before marker" and reads on), as are fill
    bytes (FF FF ...) and stuffed zeros (FF 00)."""
    pos, size = 2, len(data)
    while pos < size:
        while pos < size and data[pos] != 0xFF:
            pos += 1
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos >= size:
            return
        kind = data[pos]
        pos += 1
        if kind == 0x00 or kind == 0x01 or 0xD0 <= kind <= 0xD8:  # no length
            continue
        if kind == 0xD9:  # end of image
            return
        if pos + 2 > size:
            return
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            return
        yield kind, pos + 2, length - 2
        if kind == 0xDA:  # start of scan: entropy-coded data follows
            return
        pos += length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for kind, start, length in jpeg_segments(data):
        if kind in _SOF:
            if length < 5 or start + 5 > len(data):
                return None
            height, width = struct.unpack(">HH", data[start + 1:start + 5])
            return width, height
        if kind == 0xDA:  # a scan before any frame header: libjpeg refuses it
            return None
    return None


# ----------------------------------------------------------------------------- the others


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":  # libpng refuses a PNG whose first chunk is not IHDR
        return None
    return struct.unpack(">II", data[16:24])


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    if header < 40:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _gif_size(data: bytes) -> tuple[int, int] | None:
    """The larger of the logical screen and the first frame, per side: a frame may claim
    more than the screen it is drawn on."""
    screen_w, screen_h, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x2C:  # image descriptor
            frame_w, frame_h = struct.unpack("<HH", data[pos + 5:pos + 9])
            left, top = struct.unpack("<HH", data[pos + 1:pos + 5])
            return max(screen_w, left + frame_w), max(screen_h, top + frame_h)
        if block != 0x21:  # only extensions may come before the first frame
            return None
        pos += 2
        while True:  # sub-blocks, each led by its length, up to a zero length
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if len(data) < 30:
        return None
    if chunk == b"VP8X":
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":  # the key frame's start code
            return None
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first directory, which is the image
    OpenCV reads (classic and BigTIFF)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        (offset,) = struct.unpack(order + "Q", data[8:16])
        (count,) = struct.unpack(order + "Q", data[offset:offset + 8])
        first, entry_size, value_at = offset + 8, 20, 12
    else:
        (offset,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[offset:offset + 2])
        first, entry_size, value_at = offset + 2, 12, 8
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):
        entry = data[first + k * entry_size:first + (k + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            if kind == 3:  # SHORT
                (found[tag],) = struct.unpack(order + "H", entry[value_at:value_at + 2])
            elif kind in (4, 16):  # LONG, LONG8
                fmt = "Q" if kind == 16 else "I"
                (found[tag],) = struct.unpack(order + fmt, entry[value_at:value_at + struct.calcsize(fmt)])
            else:
                return None
    if 256 not in found or 257 not in found:
        return None
    return found[256], found[257]


def _jp2_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(_J2K):  # a bare codestream: its SIZ segment
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
        return xsiz - xosiz, ysiz - yosiz
    for kind, start, _end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for inner, at, _inner_end in _boxes(data, start, _end):
                if inner == b"ihdr":
                    height, width = struct.unpack(">II", data[at:at + 8])
                    return width, height
            return None
    return None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the ISO base media / JP2 boxes in a range."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8:pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _is_avif(data: bytes) -> bool:
    for kind, start, end in _boxes(data, 0, min(len(data), 4096)):
        if kind == b"ftyp":
            brands = [data[start:start + 4]] + [data[p:p + 4] for p in range(start + 8, end, 4)]
            return any(b in (b"avif", b"avis") for b in brands)
        return False
    return False


def _avif_size(data: bytes) -> tuple[int, int] | None:
    """The largest image spatial extent (``ispe``) among the item properties: a grid image's
    own extent is among them beside its tiles'."""
    sizes = []
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind != b"meta":
            continue
        for inner, at, inner_end in _boxes(data, start + 4, end):  # meta is a full box
            if inner != b"iprp":
                continue
            for container, c_at, c_end in _boxes(data, at, inner_end):
                if container != b"ipco":
                    continue
                for prop, p_at, _p_end in _boxes(data, c_at, c_end):
                    if prop == b"ispe":
                        sizes.append(struct.unpack(">II", data[p_at + 4:p_at + 12]))
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\d+)")


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    head = data[:4096]
    if head[1:2] == b"7":  # PAM: WIDTH and HEIGHT lines before ENDHDR
        end = head.find(b"ENDHDR")
        header = head[:end] if end >= 0 else b""
        width = re.search(rb"^WIDTH\s+(\d+)", header, re.M)
        height = re.search(rb"^HEIGHT\s+(\d+)", header, re.M)
        return (int(width.group(1)), int(height.group(1))) if width and height else None
    first = _PNM_TOKEN.match(head, 2)
    second = _PNM_TOKEN.match(head, first.end()) if first else None
    return (int(first.group(1)), int(second.group(1))) if second else None


def _pfm_size(data: bytes) -> tuple[int, int] | None:
    match = re.match(rb"P[Ff]\s+(\d+)\s+(\d+)", data[:256])
    return (int(match.group(1)), int(match.group(2))) if match else None


def _sun_raster_size(data: bytes) -> tuple[int, int] | None:
    return struct.unpack(">II", data[4:12])


def _hdr_size(data: bytes) -> tuple[int, int] | None:
    """The resolution line after the header's blank line: ``-Y H +X W`` (or another
    orientation of the two axes)."""
    head = data[:65536]
    blank = head.find(b"\n\n")
    if blank < 0:
        return None
    line = head[blank + 2:].split(b"\n", 1)[0]
    match = re.match(rb"([-+])([XY]) (\d+) ([-+])([XY]) (\d+)$", line.strip())
    if not match or match.group(2) == match.group(5):
        return None
    sizes = {match.group(2): int(match.group(3)), match.group(5): int(match.group(6))}
    return sizes[b"X"], sizes[b"Y"]


_PARSERS = {
    "JPEG": _jpeg_size, "PNG": _png_size, "BMP": _bmp_size, "GIF": _gif_size,
    "WebP": _webp_size, "TIFF": _tiff_size, "JPEG 2000": _jp2_size, "AVIF": _avif_size,
    "PNM": _pnm_size, "PFM": _pfm_size, "Sun raster": _sun_raster_size,
    "Radiance HDR": _hdr_size,
}
