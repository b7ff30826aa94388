"""ONNX exports: stage graphs written with torch's ONNX exporter, run with onnxruntime.

Writing needs onnx and onnxscript (torch's exporter since 2.9 builds on it), running needs
onnxruntime: the ``export`` extra. The registry (``engines.get_export_runtime``) checks
they are installed before this module is imported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from ..core.config import parse_device
from ..core.errors import DeepPoseError
from ..core.exports import COORDS_OUTPUT, INPUT_NAME, LOG_SCALES_OUTPUT, ExportedStage
from .exported import ExportedPredictor

FORMAT = "onnx"
DEFAULT_OPSET = 20  # an AlexNet with batch norm and a dynamic batch matched onnxruntime to 3e-7
MIN_OPSET = 18      # torch's ONNX exporter writes opset 18 and converts up from it


def write_stage(graph: Any, example: Any, path: Path, opset: int | None = None) -> None:
    """Write a stage graph (``engines.export_graph.StageGraph``) as one ONNX file (weights
    inside, batch dimension dynamic), then check it with ``onnx.checker``."""
    import onnx
    import torch
    from torch.export import Dim

    outputs = [COORDS_OUTPUT] + ([LOG_SCALES_OUTPUT] if graph.network.uncertainty else [])
    opset = DEFAULT_OPSET if opset is None else opset
    try:
        # the exporter reports its progress on stdout, warns about things it handles and
        # logs how it converts between opsets
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_loggers("onnxscript", "torch.onnx"):
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_shapes={"x": {0: Dim("batch")}}, external_data=False,
                              verbose=False)
    except Exception as e:  # the exporter raises many kinds; one line says which
        raise DeepPoseError(f"torch could not export the stage to ONNX opset {opset}: "
                            f"{_first_line(e)}") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, onnx.shape_inference errors
        raise DeepPoseError(f"the exported ONNX file fails onnx.checker: {_first_line(e)}") from None
    written = written_opset(path)
    if written != opset:  # the exporter falls back to its own opset when it cannot convert
        raise DeepPoseError(f"torch's ONNX exporter wrote opset {written} when asked for "
                            f"opset {opset}: choose another --opset (default {DEFAULT_OPSET})")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Errors only from these loggers, for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def written_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import
                 if entry.domain in ("", "ai.onnx")), None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def providers(device: str) -> list[Any]:
    """onnxruntime's execution providers for ``--device``: the CPU, or CUDA (with the CPU
    for what CUDA lacks) where this onnxruntime build has the CUDA provider."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise DeepPoseError(f"device {device}: this onnxruntime has no CUDA provider (install "
                            "onnxruntime-gpu instead of onnxruntime), or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


class OnnxRuntimePredictor(ExportedPredictor):
    """An exported ONNX stage run by an onnxruntime session."""

    def __init__(self, path: Path, stage: ExportedStage, num_joints: int, device: str = "cpu",
                 threads: int | None = None):
        super().__init__(stage, num_joints)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about provider choice
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=providers(device))
        except DeepPoseError:
            raise
        except Exception as e:  # onnxruntime's Fail, InvalidGraph, ...
            raise DeepPoseError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
        names = [o.name for o in self.session.get_outputs()]
        expected = [COORDS_OUTPUT] + ([LOG_SCALES_OUTPUT] if stage.has_log_scales else [])
        if names != expected:
            raise DeepPoseError(f"{path} has outputs {names}, but its cascade.json says "
                                f"{expected}")
        self.output_names = names

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {INPUT_NAME: images})


def load_predictor(path: Path, stage: ExportedStage, num_joints: int,
                   device: str = "cpu") -> OnnxRuntimePredictor:
    return OnnxRuntimePredictor(Path(path), stage, num_joints, device)
