"""DeepPose AlexNet regressor and its loss in Chainer.

The network, parameter names and shapes match ``torch_model`` exactly (see
``deeppose_cli.weights``), so weights move between the frameworks through
``to_numpy_params`` / ``load_numpy_params`` and give the same predictions.

Coordinates are normalized to the person box: the prediction is ``(N, 2 * num_joints)``
laid out ``x0, y0, x1, y1, ...``, i.e. ``pred.reshape(N, num_joints, 2)``, and 0 is the box
centre. Everything here works on NumPy and CuPy arrays alike.
"""

from __future__ import annotations

import numpy as np

from ..weights import LAYER_NAMES, check_parameters, feature_map_size, layer_sizes
from .chainer_compat import import_chainer

chainer = import_chainer()
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
from chainer import backend  # noqa: E402


class AlexNetRegressor(chainer.Chain):
    """AlexNet that regresses ``2 * num_joints`` normalized joint coordinates (DeepPose Sec. 3).

    ``width`` scales every channel count and the fc6/fc7 sizes, so tests and demos can run a
    tiny variant; ``input_size`` is the side of the square crop and fixes fc6's input size.
    Dropout follows ``chainer.config.train``.
    """

    def __init__(self, num_joints: int = 14, input_size: int = 227, width: float = 1.0):
        super().__init__()
        self.num_joints = num_joints
        self.input_size = input_size
        self.width = width
        (c1, c2, c3, c4, c5), fc_units = layer_sizes(width)
        side = feature_map_size(input_size)
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, c1, ksize=11, stride=4)
            self.conv2 = L.Convolution2D(c1, c2, ksize=5, pad=2)
            self.conv3 = L.Convolution2D(c2, c3, ksize=3, pad=1)
            self.conv4 = L.Convolution2D(c3, c4, ksize=3, pad=1)
            self.conv5 = L.Convolution2D(c4, c5, ksize=3, pad=1)
            # Sizes given explicitly (no lazy init), so the parameters exist before the first call.
            self.fc6 = L.Linear(c5 * side * side, fc_units)
            self.fc7 = L.Linear(fc_units, fc_units)
            # Start every prediction near 0, the box centre, instead of at a random pose.
            self.fc8 = L.Linear(fc_units, 2 * num_joints, initialW=chainer.initializers.Normal(1e-3))

    def forward(self, x):
        """``x``: (N, 3, input_size, input_size) float32 -> (N, 2 * num_joints)."""
        # cover_all=False floors the pooled size like torch; Chainer's default would round up.
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 3, 2, cover_all=False)
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 3, 2, cover_all=False)
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        h = F.max_pooling_2d(F.relu(self.conv5(h)), 3, 2, cover_all=False)
        h = F.dropout(F.relu(self.fc6(h)), 0.5)  # Linear flattens (N, C, H, W) row-major like torch
        h = F.dropout(F.relu(self.fc7(h)), 0.5)
        return self.fc8(h)


# ----------------------------------------------------------------------------- loss


def _as_array(x):
    return x.array if isinstance(x, chainer.Variable) else x


def _mask_and_denominator(visible, dtype, use_visibility: bool):
    """The per-joint weights (visibility, or all ones) and the divisor max(sum(mask), 1)."""
    xp = backend.get_array_module(visible)
    visible = visible.astype(dtype, copy=False)
    mask = visible if use_visibility else xp.ones_like(visible)
    denom = max(float(mask.sum()), 1.0)
    return mask, denom


def pose_loss(pred, target, visible, use_visibility: bool = True) -> chainer.Variable:
    """Mean over visible joints of the squared 2-D distance between prediction and target.

    ``pred`` (N, 2J), ``target`` (N, J, 2) (arrays or Variables), ``visible`` (N, J) of 0/1::

        mask = visible if use_visibility else ones
        loss = sum(mask[..., None] * (pred.reshape(N, J, 2) - target) ** 2) / max(sum(mask), 1)

    Invisible joints contribute exactly 0 to the loss and its gradient whatever their target
    holds (even NaN), so unlabelled joints need no special value.
    """
    pred = chainer.as_variable(pred)
    xp = backend.get_array_module(pred)
    mask, denom = _mask_and_denominator(_as_array(visible), pred.dtype, use_visibility)
    n, j = mask.shape
    diff = F.reshape(pred, (n, j, 2)) - F.cast(chainer.as_variable(target), pred.dtype)
    counts = xp.broadcast_to(mask[..., None] > 0, diff.shape)
    # where(), not just mask * diff: an unlabelled joint may carry NaN coordinates.
    diff = F.where(counts, diff, xp.zeros(diff.shape, diff.dtype))
    weights = xp.broadcast_to(mask[..., None], diff.shape)
    return F.sum(diff * diff * weights) / denom


class PoseLossFunction(chainer.FunctionNode):
    """``pose_loss`` with its gradient written out: d loss / d pred = 2 * mask * diff / max(sum(mask), 1).

    Inputs ``(pred, target, visible)``; gradients flow to ``pred`` and ``target`` (the mask
    gets none). ``backward`` is built from Chainer functions, so it is differentiable again.
    """

    def __init__(self, use_visibility: bool = True):
        self.use_visibility = use_visibility

    def forward(self, inputs):
        pred, target, visible = inputs
        xp = backend.get_array_module(pred)
        mask, denom = _mask_and_denominator(visible, pred.dtype, self.use_visibility)
        n, j = mask.shape
        counts = mask[..., None] > 0
        diff = xp.where(counts, pred.reshape(n, j, 2) - target.astype(pred.dtype, copy=False), pred.dtype.type(0))
        loss = (mask[..., None] * diff * diff).sum() / pred.dtype.type(denom)
        self.retain_inputs((0, 1))
        self._mask, self._denom = mask, denom
        return xp.asarray(loss, dtype=pred.dtype),

    def backward(self, indexes, grad_outputs):
        (grad_loss,) = grad_outputs
        pred, target = self.get_retained_inputs()
        xp = backend.get_array_module(pred)
        mask, denom = self._mask, self._denom
        n, j = mask.shape
        diff = F.reshape(pred, (n, j, 2)) - F.cast(target, pred.dtype)
        counts = xp.broadcast_to(mask[..., None] > 0, diff.shape)
        diff = F.where(counts, diff, xp.zeros(diff.shape, diff.dtype))
        scale = xp.broadcast_to(mask[..., None] * pred.dtype.type(2.0 / denom), diff.shape)
        grad_diff = F.broadcast_to(grad_loss, diff.shape) * diff * scale
        grads = []
        for index in indexes:
            if index == 0:
                grads.append(F.reshape(grad_diff, pred.shape))
            elif index == 1:
                grads.append(F.cast(-grad_diff, target.dtype))
            else:
                grads.append(None)
        return tuple(grads)


def pose_loss_explicit(pred, target, visible, use_visibility: bool = True) -> chainer.Variable:
    """Same value and gradient as ``pose_loss``, through ``PoseLossFunction``'s hand-written backward."""
    (loss,) = PoseLossFunction(use_visibility).apply((pred, target, visible))
    return loss


# ----------------------------------------------------------------------------- weights


def to_numpy_params(model: AlexNetRegressor) -> dict[str, np.ndarray]:
    """The model's parameters as ``{"conv1/W": array, ...}`` float32 NumPy copies (also from a GPU)."""
    params = {}
    for name in LAYER_NAMES:
        layer = getattr(model, name)
        for key in ("W", "b"):
            array = backend.CpuDevice().send(getattr(layer, key).array)
            params[f"{name}/{key}"] = np.array(array, dtype=np.float32, copy=True)
    return params


def load_numpy_params(model: AlexNetRegressor, params: dict[str, np.ndarray]) -> None:
    """Copy ``{"conv1/W": array, ...}`` into the model in place, keeping its device and dtype.

    Raises ``DeepPoseError`` (before changing anything) on a missing key or a wrong shape.
    """
    expected = {f"{name}/{key}": getattr(getattr(model, name), key).shape for name in LAYER_NAMES for key in ("W", "b")}
    check_parameters(params, expected)
    for name in LAYER_NAMES:
        layer = getattr(model, name)
        for key in ("W", "b"):
            param = getattr(layer, key)
            value = np.asarray(params[f"{name}/{key}"], dtype=param.dtype)
            param.array[...] = param.device.send(value)
