"""The framework-free parameter layout of the DeepPose AlexNet regressor.

Both backends exchange weights as a flat dict of NumPy arrays named the way Chainer names
them in an ``.npz`` (``"conv1/W"``, ``"conv1/b"``, ..., ``"fc8/b"``). Convolution weights are
``(out, in, kh, kw)`` and linear weights ``(out, in)`` in both frameworks, so a torch
``weight`` is exactly a Chainer ``W``: converting a model between frameworks is one
backend's ``to_numpy_params`` fed to the other's ``load_numpy_params``.

This module also owns the architecture arithmetic (channel counts for a ``width`` and the
spatial size before fc6) so the two model files cannot disagree about shapes. NumPy only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import DeepPoseError
from .settings import ARCHITECTURES, MIN_INPUT_SIZE

LAYER_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
PARAMETER_NAMES: tuple[str, ...] = tuple(f"{layer}/{p}" for layer in LAYER_NAMES for p in ("W", "b"))
# The batch-normalized variant (``batch_norm=True``) normalizes each convolution's output
# before its ReLU: bn<k> follows conv<k>. Its four arrays per layer use Chainer's names; the
# running statistics are part of the model (inference uses them), so they travel too.
BN_LAYERS: tuple[str, ...] = ("bn1", "bn2", "bn3", "bn4", "bn5")
BN_ARRAYS: tuple[str, ...] = ("gamma", "beta", "avg_mean", "avg_var")
BN_EPS = 1e-5       # both frameworks: Chainer's default is 2e-5, torch's 1e-5
BN_DECAY = 0.9      # running statistics: 0.9 * old + 0.1 * batch (torch momentum 0.1)
# The uncertainty variant (``uncertainty=True``, for the ``laplace`` loss) adds a second
# output layer beside fc8, on fc7 too: the log of each coordinate's Laplace scale. A layer of
# its own, not wider fc8 rows, so fc8 keeps one shape and weights move between the variants
# (``--init``): the one missing layer starts fresh, an extra one is ignored.
SCALE_LAYER = "fc8_scale"
SCALE_NAMES: tuple[str, ...] = (f"{SCALE_LAYER}/W", f"{SCALE_LAYER}/b")
LOG_SCALE_INIT = -3.0  # initial log scale: about 0.05 box sides, a typical early error


def parameter_names(batch_norm: bool = False, uncertainty: bool = False) -> tuple[str, ...]:
    """Canonical names of every array of the model, in order."""
    return tuple(parameter_shapes(1, MIN_INPUT_SIZE, 1.0, batch_norm, uncertainty))

# AlexNet as in DeepPose: (name, output channels at width 1, kernel, stride, pad, max-pool 3/2 after).
CONV_LAYERS: tuple[tuple[str, int, int, int, int, bool], ...] = (
    ("conv1", 96, 11, 4, 0, True),
    ("conv2", 256, 5, 1, 2, True),
    ("conv3", 384, 3, 1, 1, False),
    ("conv4", 384, 3, 1, 1, False),
    ("conv5", 256, 3, 1, 1, True),
)
FC_UNITS = 4096  # fc6 and fc7 at width 1
POOL_KSIZE, POOL_STRIDE = 3, 2


def scale_width(channels: int, width: float) -> int:
    """Channel count of a layer in a network ``width`` times as wide (at least 1)."""
    if not width > 0:
        raise DeepPoseError(f"network width must be positive, got {width}")
    return max(1, int(round(channels * width)))


# A second backbone (core/settings.py ARCHITECTURES) is a second table like CONV_LAYERS plus a
# branch in conv_stack/fc_stack; both frameworks' models and the benchmark's references are
# built from those two functions.


def check_architecture(name: object) -> str:
    if name not in ARCHITECTURES:
        raise DeepPoseError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return str(name)


def conv_stack(width: float, architecture: str = "alexnet"
               ) -> tuple[tuple[str, int, int, int, int, int, bool], ...]:
    """(name, in channels, out channels, kernel, stride, pad, max-pool 3/2 after) of every
    convolution of the network ``width`` times as wide; the one network spec both
    frameworks build from."""
    check_architecture(architecture)
    layers, in_channels = [], 3
    for name, channels, ksize, stride, pad, pooled in CONV_LAYERS:
        out_channels = scale_width(channels, width)
        layers.append((name, in_channels, out_channels, ksize, stride, pad, pooled))
        in_channels = out_channels
    return tuple(layers)


def fc_stack(num_joints: int, input_size: int, width: float, architecture: str = "alexnet"
             ) -> tuple[tuple[str, int, int], ...]:
    """(name, in features, out features) of fc6, fc7 and the fc8 regression output (the
    uncertainty variant's ``SCALE_LAYER`` has fc8's shape)."""
    if num_joints < 1:
        raise DeepPoseError(f"num_joints must be at least 1, got {num_joints}")
    last_conv = conv_stack(width, architecture)[-1]
    fc_units = scale_width(FC_UNITS, width)
    in_features = last_conv[2] * feature_map_size(input_size) ** 2
    return (("fc6", in_features, fc_units), ("fc7", fc_units, fc_units),
            ("fc8", fc_units, 2 * num_joints))


def feature_map_size(input_size: int) -> int:
    """Side of the conv5 feature map after its max-pool, for a square ``input_size`` crop.

    Pooling floors (Chainer ``cover_all=False``, torch ``ceil_mode=False``), so both
    frameworks agree.
    """
    size = int(input_size)
    for _name, _channels, ksize, stride, pad, pooled in CONV_LAYERS:
        size = (size + 2 * pad - ksize) // stride + 1
        if pooled:
            size = (size - POOL_KSIZE) // POOL_STRIDE + 1
        if size < 1:
            raise DeepPoseError(f"input_size {input_size} is too small for the AlexNet regressor (minimum {MIN_INPUT_SIZE})")
    return size


def parameter_shapes(num_joints: int = 14, input_size: int = 227, width: float = 1.0,
                     batch_norm: bool = False, uncertainty: bool = False
                     ) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ``AlexNetRegressor(num_joints, input_size, width,
    batch_norm, uncertainty=uncertainty)``, in order."""
    fcs = fc_stack(num_joints, input_size, width)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, in_channels, out_channels, ksize, _stride, _pad, _pooled in conv_stack(width):
        shapes[f"{name}/W"] = (out_channels, in_channels, ksize, ksize)
        shapes[f"{name}/b"] = (out_channels,)
        if batch_norm:
            bn = "bn" + name[len("conv"):]
            shapes.update({f"{bn}/{array}": (out_channels,) for array in BN_ARRAYS})
    for name, in_features, out_features in fcs:
        shapes[f"{name}/W"] = (out_features, in_features)
        shapes[f"{name}/b"] = (out_features,)
    if uncertainty:
        shapes[SCALE_NAMES[0]], shapes[SCALE_NAMES[1]] = shapes["fc8/W"], shapes["fc8/b"]
    return shapes


def parameters_to_load(params: Mapping[str, object], batch_norm: bool, uncertainty: bool,
                       optional: tuple[str, ...] = ()) -> list[str]:
    """The model's parameter names a load copies: every one, except the ``optional`` names
    that ``params`` lacks (they keep the model's values)."""
    return [name for name in parameter_names(batch_norm, uncertainty)
            if name in params or name not in optional]


def check_parameters(params: Mapping[str, object], expected_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ``DeepPoseError`` unless ``params`` has every expected key with the expected shape.

    Checked before any weight is copied, so a bad file never leaves a half-loaded model.
    Extra keys are ignored (an ``.npz`` may carry more than the model's parameters).
    """
    missing = [name for name in expected_shapes if name not in params]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise DeepPoseError(f"parameters do not match the model: missing {shown}")
    for name, expected in expected_shapes.items():
        value = params[name]
        shape = tuple(getattr(value, "shape", None) or np.shape(value))
        if shape != tuple(expected):
            raise DeepPoseError(
                f"parameters do not match the model: {name!r} has shape {shape}, expected {tuple(expected)} "
                "(built with a different num_joints, input_size or width?)"
            )
        kind = getattr(getattr(value, "dtype", None), "kind", None) or np.asarray(value).dtype.kind
        if kind not in "fiu":
            raise DeepPoseError(f"parameters do not match the model: {name!r} holds dtype kind {kind!r}, not real numbers")


ARCHITECTURE_KEYS = ("num_joints", "input_size", "width", "batch_norm", "uncertainty")


def architecture(meta: Mapping[str, object]) -> dict[str, object]:
    """The constructor arguments of the regressor described by ``meta`` (a run.json, a model
    file's metadata): ``batch_norm`` and ``uncertainty`` default to False, as in models written
    before they existed; ``architecture`` (absent before it existed) must be a known one."""
    check_architecture(meta.get("architecture", "alexnet"))
    return {"num_joints": int(meta["num_joints"]), "input_size": int(meta["input_size"]),
            "width": float(meta["width"]), "batch_norm": bool(meta.get("batch_norm", False)),
            "uncertainty": bool(meta.get("uncertainty", False))}
