"""Drawing a predicted skeleton on an image (OpenCV), limbs coloured by body side."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.manifests import Limb

# BGR: the person's left in blue, right in red/orange, centre (head, hips, shoulders) green.
SIDE_COLOURS = {"left": (255, 128, 0), "right": (0, 64, 255), "center": (0, 200, 0)}


def draw_pose(image_bgr: np.ndarray, joints: np.ndarray, skeleton: Sequence[Limb]) -> np.ndarray:
    """A copy of ``image_bgr`` with limbs as lines and joints as dots, scaled to the image."""
    import cv2

    out = image_bgr.copy()
    scale = max(out.shape[:2]) / 300.0
    thickness = max(1, int(round(2 * scale)))
    radius = max(2, int(round(3 * scale)))
    pts = [(int(round(x)), int(round(y))) for x, y in np.asarray(joints)]
    for limb in skeleton:
        a, b = limb.joints
        cv2.line(out, pts[a], pts[b], SIDE_COLOURS.get(limb.side, (0, 200, 0)), thickness,
                 cv2.LINE_AA)
    for p in pts:
        cv2.circle(out, p, radius, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(out, p, radius, (0, 0, 0), 1, cv2.LINE_AA)
    return out


BOX_COLOUR = (0, 220, 255)  # BGR yellow


def draw_people(image_bgr: np.ndarray, people: Sequence[tuple[Sequence[float], np.ndarray]],
                skeleton: Sequence[Limb]) -> np.ndarray:
    """A copy of ``image_bgr`` with each person's box (x, y, w, h) outlined and skeleton drawn."""
    import cv2

    out = image_bgr.copy()
    thickness = max(1, int(round(max(out.shape[:2]) / 300.0)))
    for box, joints in people:
        x, y, w, h = (float(v) for v in box)
        cv2.rectangle(out, (int(round(x)), int(round(y))),
                      (int(round(x + w - 1)), int(round(y + h - 1))), BOX_COLOUR, thickness,
                      cv2.LINE_AA)
        out = draw_pose(out, joints, skeleton)
    return out


def sample_picture(image_chw: np.ndarray, normalized: np.ndarray, visible: np.ndarray,
                   skeleton: Sequence[Limb]) -> np.ndarray:
    """A network input as a BGR uint8 picture with its target joints drawn where the loss
    expects them: limbs between visible joints, a filled dot per visible joint and a hollow
    grey ring for a labelled joint the sample does not train on (e.g. pushed out of the crop)."""
    import cv2

    from ..core.geometry import normalized_to_crop_pixels
    from ..core.images import IMAGE_MEAN, IMAGE_STD

    rgb = np.asarray(image_chw, dtype=np.float32).transpose(1, 2, 0) * IMAGE_STD + IMAGE_MEAN
    picture = cv2.cvtColor(np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8),
                           cv2.COLOR_RGB2BGR)
    size = picture.shape[0]
    pts = normalized_to_crop_pixels(normalized, size)
    shown = np.asarray(visible) > 0
    for limb in skeleton:
        a, b = limb.joints
        if shown[a] and shown[b]:
            cv2.line(picture, tuple(int(round(v)) for v in pts[a]),
                     tuple(int(round(v)) for v in pts[b]),
                     SIDE_COLOURS.get(limb.side, (0, 200, 0)), 1, cv2.LINE_AA)
    for p, on in zip(pts, shown):
        centre = tuple(int(round(v)) for v in p)
        if on:
            cv2.circle(picture, centre, 2, (255, 255, 255), -1, cv2.LINE_AA)
        else:
            cv2.circle(picture, centre, 3, (160, 160, 160), 1, cv2.LINE_AA)
    return picture


def picture_grid(pictures: Sequence[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """Equal-size pictures tiled row by row on a white background."""
    size_y, size_x = pictures[0].shape[:2]
    rows = -(-len(pictures) // columns)
    grid = np.full((rows * (size_y + gap) - gap, columns * (size_x + gap) - gap, 3), 255,
                   dtype=np.uint8)
    for k, picture in enumerate(pictures):
        r, c = divmod(k, columns)
        grid[r * (size_y + gap):r * (size_y + gap) + size_y,
             c * (size_x + gap):c * (size_x + gap) + size_x] = picture
    return grid


def augmentation_grid(dataset, indices: Sequence[int], epoch: int, skeleton: Sequence[Limb],
                      columns: int = 8) -> np.ndarray:
    """Training samples ``indices`` of ``dataset`` exactly as epoch ``epoch`` draws them,
    tiled with their target joints: what the network is trained on, for checking a recipe's
    augmentation by eye."""
    pictures = [sample_picture(*dataset.get(int(i), epoch), skeleton) for i in indices]
    return picture_grid(pictures, min(columns, len(pictures)))
