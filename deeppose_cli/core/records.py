"""One annotated person of an index file, as every layer sees it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import box_to_xywh


@dataclass
class PoseRecord:
    """One annotated image of an index file."""

    id: str
    image: Path
    joints: np.ndarray   # (J, 2) float64, image pixels
    visible: np.ndarray  # (J,) bool
    box: np.ndarray      # (4,) cx, cy, w, h
    width: int = 0
    height: int = 0
    #: The PCKh normalizer in pixels where the dataset gives one per person (MPII: 0.6 x
    #: its head box diagonal); None: the skeleton's head segment is used.
    head_size: float | None = None

    def to_json(self, index_dir: Path) -> dict:
        try:
            image = os.path.relpath(self.image, index_dir)
        except ValueError:  # another drive on Windows
            image = str(self.image)
        out = {
            "id": self.id,
            "image": image,
            "width": self.width,
            "height": self.height,
            "joints": [[round(float(x), 3), round(float(y), 3)] for x, y in self.joints],
            "visible": [int(v) for v in self.visible],
            "box": [round(v, 3) for v in box_to_xywh(self.box)],
        }
        if self.head_size is not None:
            out["head_size"] = round(float(self.head_size), 3)
        return out
