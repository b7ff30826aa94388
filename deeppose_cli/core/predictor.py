"""What a trained network gives inference, whatever framework runs it.

A :class:`Predictor` maps network inputs (or images and crop boxes) to a :class:`Prediction`:
normalized joint coordinates and, for networks trained with the ``laplace`` loss, the log of
each coordinate's predicted Laplace scale. Engines (PyTorch, Chainer), exported models (ONNX,
TorchScript) and the test-time flip all implement the same small protocol, so the cascade
never asks which one it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass
class Prediction:
    """Joints (..., J, 2) in a box's normalized coordinates (0: the box centre, +-0.5: its
    edges) and the log of each coordinate's Laplace scale in the same units, or None for a
    network without the scale layer."""

    coords: np.ndarray
    log_scales: np.ndarray | None = None

    def reshape(self, *shape: int) -> "Prediction":
        return Prediction(self.coords.reshape(*shape, *self.coords.shape[-2:]),
                          None if self.log_scales is None
                          else self.log_scales.reshape(*shape, *self.log_scales.shape[-2:]))

    @classmethod
    def concatenate(cls, parts: Sequence["Prediction"], num_joints: int) -> "Prediction":
        if not parts:
            return cls(np.zeros((0, num_joints, 2)))
        scales = [p.log_scales for p in parts]
        return cls(np.concatenate([p.coords for p in parts]),
                   None if any(s is None for s in scales) else np.concatenate(scales))


def split_outputs(out: np.ndarray, num_joints: int) -> Prediction:
    """A network's raw outputs, (N, 2J) or (N, 4J) with the ``laplace`` scale layer, as a
    float64 :class:`Prediction` of shape (N, J, 2)."""
    out = np.asarray(out, dtype=np.float64).reshape(-1, np.shape(out)[-1])
    coords = out[:, :2 * num_joints].reshape(-1, num_joints, 2)
    scales = (out[:, 2 * num_joints:].reshape(-1, num_joints, 2)
              if out.shape[1] == 4 * num_joints else None)
    return Prediction(coords, scales)


class Predictor(Protocol):
    """One trained stage network, ready for inference (eval mode, no gradients)."""

    num_joints: int
    input_size: int
    has_scales: bool   # its predictions carry log scales
    cuts_crops: bool   # ``crops`` cuts on its device: use it instead of host crops

    def __call__(self, images: np.ndarray) -> Prediction:
        """(N, 3, S, S) float32 network inputs -> a (N, J, 2) prediction."""

    def crops(self, images: Sequence[np.ndarray], boxes: np.ndarray,
              flip: bool = False) -> Prediction:
        """HxWx3 uint8 RGB images and their boxes (N, K, 4) -> a (N, K, J, 2) prediction of
        the crops of those boxes (mirrored with ``flip``), cut where the network runs."""
