"""Boxes, the DeepPose pose normalization, crops and flips: NumPy and OpenCV only.

Coordinates are image pixels with pixel centres at integer positions (OpenCV's convention).
A box is ``(cx, cy, w, h)``: centre and size. The DeepPose normalization of Toshev & Szegedy,
N(y; b) = (y - b_center) / b_size, maps a box to [-0.5, 0.5]^2, and a crop of the box to an
S x S image maps normalized coordinates to crop pixels as ``u = n * S + (S - 1) / 2``, so a
joint drawn at ``y`` in the image lands exactly where ``N(y; b)`` says in the crop.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Box = np.ndarray  # shape (4,) or (..., 4): cx, cy, w, h


# Coordinates beyond this many pixels describe no photo; they would only overflow.
MAX_PIXEL_COORDINATE = 1e6
# A person box under one pixel gives a crop of nothing (every joint lands on one point).
MIN_BOX_SIDE = 1.0


def person_box(joints: np.ndarray, visible: np.ndarray, margin: float = 0.2) -> Box:
    """Square box around the visible joints, enlarged by ``margin`` of its side on each side.

    Square because the crop is square: a non-square box would distort the person.
    """
    joints = np.asarray(joints, dtype=np.float64)
    mask = np.asarray(visible, dtype=bool)
    if not mask.any():
        raise ValueError("person_box needs at least one visible joint")
    pts = joints[mask]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2.0
    side = max(float((hi - lo).max()), 1.0) * (1.0 + 2.0 * margin)
    return np.array([centre[0], centre[1], side, side])


def box_from_xywh(x: float, y: float, w: float, h: float) -> Box:
    """Convert a top-left/size box (as in index files and ``--bbox``) to centre/size."""
    return np.array([x + w / 2.0, y + h / 2.0, float(w), float(h)])


def box_to_xywh(box: Box) -> list[float]:
    cx, cy, w, h = (float(v) for v in box)
    return [cx - w / 2.0, cy - h / 2.0, w, h]


def normalize_pose(joints: np.ndarray, box: Box) -> np.ndarray:
    """N(y; b) = (y - b_center) / b_size, for joints of shape (..., J, 2) and box (..., 4)."""
    box = np.asarray(box, dtype=np.float64)
    centre = box[..., None, 0:2]
    size = box[..., None, 2:4]
    return (np.asarray(joints, dtype=np.float64) - centre) / size


def denormalize_pose(normalized: np.ndarray, box: Box) -> np.ndarray:
    """The inverse of :func:`normalize_pose`: back to image pixels."""
    box = np.asarray(box, dtype=np.float64)
    return np.asarray(normalized, dtype=np.float64) * box[..., None, 2:4] + box[..., None, 0:2]


def crop_matrix(box: Box, size: int, flip: bool = False) -> np.ndarray:
    """2x3 affine matrix taking image pixels to pixels of a ``size`` x ``size`` crop of ``box``.

    ``flip`` mirrors the crop about its vertical axis (crop pixel ``u`` -> ``size - 1 - u``),
    so a flipped crop costs one warp instead of a warp plus a copy.
    """
    cx, cy, w, h = (float(v) for v in box)
    sx, sy = size / w, size / h
    half = (size - 1) / 2.0
    if flip:
        return np.array([[-sx, 0.0, half + cx * sx], [0.0, sy, half - cy * sy]])
    return np.array([[sx, 0.0, half - cx * sx], [0.0, sy, half - cy * sy]])


def augmented_crop_matrix(box: Box, size: int, flip: bool = False,
                          rotation: float = 0.0) -> np.ndarray:
    """:func:`crop_matrix` followed by a rotation of ``rotation`` degrees (counter-clockwise
    on screen) about the crop centre, then the optional mirror: still one 2x3 affine map, so
    an augmented crop costs one warp and joints follow exactly the same map."""
    matrix = crop_matrix(box, size, False)
    if rotation:
        half = (size - 1) / 2.0
        theta = np.deg2rad(rotation)
        c, s = np.cos(theta), np.sin(theta)
        # y points down in images: (c, s; -s, c) turns content counter-clockwise on screen.
        rot = np.array([[c, s, half - c * half - s * half], [-s, c, half + s * half - c * half]])
        matrix = compose_affine(rot, matrix)
    if flip:
        mirror = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]])
        matrix = compose_affine(mirror, matrix)
    return matrix


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine map ``outer(inner(p))``."""
    full = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (np.vstack([outer, [0.0, 0.0, 1.0]]) @ full)[:2]


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (..., 2) mapped by a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp_crop(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` crop that ``matrix`` (image -> crop pixels) describes; outside
    the image is black."""
    import cv2

    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_and_resize(image: np.ndarray, box: Box, size: int, flip: bool = False) -> np.ndarray:
    """Crop ``box`` out of ``image`` and resize it to ``size`` x ``size`` with one affine warp.

    Outside the image is filled with zeros (black), as DeepPose's crops near borders are.
    ``flip=True`` gives the mirrored crop, the image counterpart of :func:`flip_normalized`.
    """
    return warp_crop(image, crop_matrix(box, size, flip), size)


def crop_sampling_grid(boxes: np.ndarray, width: int, height: int, size: int,
                       flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of the ``size`` x ``size`` crops of ``boxes`` (K, 4) samples an image
    of ``width`` x ``height``, as (K, size) x and (K, size) y coordinates in the [-1, 1] units
    of grid samplers that put -1 and 1 at the centres of the first and last pixels
    (``align_corners=True``): :func:`crop_matrix`'s geometry, for crops cut on a GPU."""
    boxes = np.asarray(boxes, dtype=np.float64)
    offsets = (np.arange(size) - (size - 1) / 2.0) / size  # crop pixels, in box sides
    across = -offsets if flip else offsets
    xs = boxes[:, 0:1] + across[None] * boxes[:, 2:3]
    ys = boxes[:, 1:2] + offsets[None] * boxes[:, 3:4]
    return (xs * 2.0 / max(width - 1, 1) - 1.0).astype(np.float32), \
        (ys * 2.0 / max(height - 1, 1) - 1.0).astype(np.float32)


def normalized_to_crop_pixels(normalized: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(normalized) * size + (size - 1) / 2.0


def crop_pixels_to_normalized(pixels: np.ndarray, size: int) -> np.ndarray:
    return (np.asarray(pixels, dtype=np.float64) - (size - 1) / 2.0) / size


def flip_normalized(normalized: np.ndarray, visible: np.ndarray,
                    flip_permutation: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mirror normalized joints about the box's vertical axis and swap left/right joints.

    After mirroring, the person's left arm is where the right one was, so its label must change
    too: joint ``i`` of the result is the mirrored joint ``flip_permutation[i]``.
    """
    perm = list(flip_permutation)
    flipped = np.array(normalized, dtype=np.float64)[..., perm, :]
    flipped[..., 0] = -flipped[..., 0]
    return flipped, np.asarray(visible)[..., perm]


def flip_image(image: np.ndarray) -> np.ndarray:
    """Mirror an HWC image left-right (consistent with :func:`flip_normalized` on its crop)."""
    return np.ascontiguousarray(image[:, ::-1])


def torso_diameter(joints: np.ndarray, pair: Sequence[int]) -> np.ndarray:
    """Distance between two opposing torso joints (e.g. left shoulder, right hip), per pose."""
    a, b = pair
    joints = np.asarray(joints, dtype=np.float64)
    return np.linalg.norm(joints[..., a, :] - joints[..., b, :], axis=-1)


def joint_boxes(joints: np.ndarray, diameter: np.ndarray | float, sigma: float) -> Box:
    """Square boxes of side ``sigma * diameter`` centred on each joint: (..., J, 4).

    These are the refinement boxes of DeepPose stages s >= 2 (Sec. 3.2).
    """
    joints = np.asarray(joints, dtype=np.float64)
    side = np.broadcast_to(np.asarray(diameter, dtype=np.float64) * sigma,
                           joints.shape[:-2])[..., None]
    side = np.broadcast_to(side, joints.shape[:-1])
    return np.stack([joints[..., 0], joints[..., 1], side, side], axis=-1)
