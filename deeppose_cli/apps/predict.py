"""`deeppose predict`: run a cascade on image files, optionally drawing the skeleton."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import DeepPoseError
from ..core.files import atomic_write, check_writable
from ..core.images import ImageError, read_bgr


@dataclass
class ImagePrediction:
    image: Path
    bbox: list[float]            # x, y, w, h used for the stage-1 crop
    joint_names: Sequence[str]
    joints: np.ndarray           # (J, 2) image pixels, final stage
    drawn: Path | None = None

    def to_json(self) -> dict:
        return {
            "image": str(self.image),
            "bbox": [round(v, 2) for v in self.bbox],
            "keypoints": [{"name": n, "x": round(float(x), 2), "y": round(float(y), 2)}
                          for n, (x, y) in zip(self.joint_names, self.joints)],
        }


def predict_images(run_dir: Path, paths: Sequence[Path], bbox: Sequence[float] | None,
                   draw_dir: Path | None, stages: int | None = None, device: str = "cpu",
                   flip_test: bool | None = None, chunk: int = 32, flip_weights: str = "scales"
                   ) -> tuple[list[ImagePrediction], list[tuple[Path, str]]]:
    """Predictions for every readable image, and (path, reason) for the others.

    Without ``bbox`` the whole image is the person box (square, centred), as for a photo
    already framed around one person. ``flip_test`` and ``flip_weights``: as ``cascade.with_flip_test``.
    """
    import cv2

    from ..core.cascade import run_cascade, with_flip_test
    from .drawing import draw_pose
    from ..core.geometry import box_from_xywh, box_to_xywh
    from ..core.manifests import run_manifest
    from ..training.runs import load_cascade

    if draw_dir is not None:
        check_writable(draw_dir)  # before any work: a read-only --out fails in one line
    cascade, meta = load_cascade(run_dir, device, stages)
    manifest = run_manifest(meta)
    cascade = with_flip_test(cascade, manifest.flip_permutation, flip_test, flip_weights)
    results, failures = [], []
    for start in range(0, len(paths), chunk):
        readable = []  # (path, bgr, box) of this chunk's images that decode
        for path in paths[start:start + chunk]:
            try:
                bgr = read_bgr(path)
            except ImageError as e:
                failures.append((path, e.reason))
                continue
            h, w = bgr.shape[:2]
            if bbox is not None:
                box = box_from_xywh(*bbox)
            else:
                side = float(max(w, h))
                box = np.array([(w - 1) / 2.0, (h - 1) / 2.0, side, side])
            readable.append((path, bgr, box))
        if not readable:
            continue
        # The same batched cascade as `evaluate`: one forward pass per stage per chunk.
        rgb = [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) for _, bgr, _ in readable]
        boxes = np.stack([box for *_, box in readable])
        predicted = run_cascade(cascade, rgb, boxes, manifest.torso_diameter)[-1]
        for (path, bgr, box), joints in zip(readable, predicted):
            result = ImagePrediction(path, box_to_xywh(box), manifest.joint_names, joints)
            if draw_dir is not None:
                target = draw_dir / f"{path.stem}_pose.png"
                drawn = draw_pose(bgr, joints, manifest.skeleton)
                try:
                    atomic_write(target, lambda tmp: _write_png(tmp, drawn))
                    result.drawn = target
                except DeepPoseError as e:  # a full disk: the prediction itself stands
                    failures.append((path, f"predicted, but the drawing was not written ({e})"))
            results.append(result)
    return results, failures


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise DeepPoseError(f"could not encode {path}")
    Path(path).write_bytes(data.tobytes())
