"""Drawing a predicted skeleton on an image (OpenCV), limbs coloured by body side."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .manifests import Limb

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
