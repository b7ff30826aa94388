"""What the predictors of exported graphs (``onnx_runtime``, ``torchscript``) share."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.cascade import host_network_inputs
from ..core.errors import DeepPoseError
from ..core.exports import ExportedStage
from ..core.predictor import Prediction


class ExportedPredictor:
    """What the predictors of exported graphs (``engines.onnx_runtime``,
    ``engines.torchscript``) share: inputs sent ``batch_size`` at a time, float64
    predictions, and crops cut on the host as the cascade cuts them. A subclass provides
    :meth:`run`, one forward pass of its graph."""

    cuts_crops = False
    batch_size = 64

    def __init__(self, stage: ExportedStage, num_joints: int):
        self.stage = stage
        self.num_joints, self.input_size = num_joints, stage.input_size
        self.has_scales = stage.has_log_scales

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs, ``coords`` (and ``log_scales``), for (n, 3, S, S) float32."""
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> Prediction:
        images = np.asarray(images, dtype=np.float32)
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise DeepPoseError(f"stage {self.stage.stage} takes inputs of shape (N, 3, {size}, "
                                f"{size}), got {images.shape}")
        parts = []
        for s in range(0, len(images), self.batch_size):
            outputs = self.run(np.ascontiguousarray(images[s:s + self.batch_size]))
            parts.append(Prediction(np.asarray(outputs[0], dtype=np.float64),
                                    np.asarray(outputs[1], dtype=np.float64)
                                    if self.has_scales else None))
        return Prediction.concatenate(parts, self.num_joints)

    def crops(self, images: Sequence[np.ndarray], boxes: np.ndarray,
              flip: bool = False) -> Prediction:
        boxes = np.asarray(boxes, dtype=np.float64)
        inputs = host_network_inputs(images, boxes, self.input_size, flip)
        stacked = (np.stack(inputs) if inputs
                   else np.zeros((0, 3, self.input_size, self.input_size), np.float32))
        return self(stacked).reshape(*boxes.shape[:2])
