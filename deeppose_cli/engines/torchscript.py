"""TorchScript exports: stage graphs traced with ``torch.jit.trace``, run with
``torch.jit.load`` (PyTorch alone: no extra to install).

PyTorch marks TorchScript deprecated in favour of ``torch.export``; it still loads in C++
(libtorch) and in any PyTorch without deeppose, which is what this format is for. A
TorchScript file is a program for the TorchScript interpreter (not Python, not pickle):
load exports you trust, as with any model file that holds code.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import DeepPoseError
from ..core.exports import ExportedStage
from .exported import ExportedPredictor
from .torch_engine import resolve_device

FORMAT = "torchscript"


def write_stage(graph: Any, example: Any, path: Path, opset: int | None = None) -> None:
    """Trace a stage graph (``engines.export_graph.StageGraph``) and save it. The trace
    records the batch size as a tensor dimension, so any batch runs (the export's
    self-check runs a batch other than the traced one)."""
    if opset is not None:
        raise DeepPoseError("--opset applies to --format onnx only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        with torch.no_grad():
            traced = torch.jit.trace(graph, (example,))
        torch.jit.save(traced, str(path))


class TorchScriptPredictor(ExportedPredictor):
    """An exported TorchScript stage on a PyTorch device."""

    def __init__(self, path: Path, stage: ExportedStage, num_joints: int, device: str = "cpu"):
        super().__init__(stage, num_joints)
        self.device = resolve_device(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:  # RuntimeError on a damaged or foreign file
            text = str(e).strip()
            raise DeepPoseError(f"torch.jit cannot load {path}: "
                                f"{text.splitlines()[0] if text else type(e).__name__}") from None

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.module(torch.from_numpy(images).to(self.device))
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def load_predictor(path: Path, stage: ExportedStage, num_joints: int,
                   device: str = "cpu") -> TorchScriptPredictor:
    return TorchScriptPredictor(Path(path), stage, num_joints, device)
