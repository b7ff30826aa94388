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

from ..core.losses import (LOG_2, LOG_SCALE_MAX, LOG_SCALE_MIN, check_norm,
                      check_uncertainty_outputs)
from ..core.weights import (BN_DECAY, BN_EPS, BN_LAYERS, LOG_SCALE_INIT, POOL_KSIZE, POOL_STRIDE,
                       SCALE_LAYER, check_parameters, conv_stack, fc_stack, parameter_names,
                       parameters_to_load)
from .chainer_compat import import_chainer

chainer = import_chainer()
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
from chainer import backend  # noqa: E402


class AlexNetRegressor(chainer.Chain):
    """AlexNet that regresses ``2 * num_joints`` normalized joint coordinates (DeepPose Sec. 3).

    ``width`` scales every channel count and the fc6/fc7 sizes, so tests and demos can run a
    tiny variant; ``input_size`` is the side of the square crop and fixes fc6's input size.
    Dropout and batch normalization (``batch_norm``: after each convolution, before its ReLU)
    follow ``chainer.config.train``. ``uncertainty`` adds the ``fc8_scale`` layer: in training
    mode the output is then ``(N, 4 * num_joints)``, the coordinates followed by the log of
    each coordinate's Laplace scale, which only the ``laplace`` loss reads; in test mode it is
    the coordinates alone.
    """

    def __init__(self, num_joints: int = 14, input_size: int = 227, width: float = 1.0,
                 batch_norm: bool = False, dropout: float = 0.5, uncertainty: bool = False):
        super().__init__()
        self.dropout = float(dropout)  # fc6/fc7, training only; not part of the weights
        self.num_joints = num_joints
        self.input_size = input_size
        self.width = width
        self.batch_norm = bool(batch_norm)
        self.uncertainty = bool(uncertainty)
        self.convs = conv_stack(width)
        with self.init_scope():
            for name, c_in, c_out, ksize, stride, pad, _pooled in self.convs:
                setattr(self, name, L.Convolution2D(c_in, c_out, ksize=ksize, stride=stride,
                                                    pad=pad))
            if self.batch_norm:
                for name, conv in zip(BN_LAYERS, self.convs):
                    setattr(self, name, L.BatchNormalization(conv[2], decay=BN_DECAY,
                                                             eps=BN_EPS))
            # Sizes given explicitly (no lazy init), so the parameters exist before the first
            # call; fc8 starts every prediction near 0, the box centre, not at a random pose.
            for name, f_in, f_out in fc_stack(num_joints, input_size, width):
                initial = chainer.initializers.Normal(1e-3) if name == "fc8" else None
                setattr(self, name, L.Linear(f_in, f_out, initialW=initial))
            if self.uncertainty:  # every scale starts near exp(LOG_SCALE_INIT)
                setattr(self, SCALE_LAYER, L.Linear(f_in, f_out,
                                                    initialW=chainer.initializers.Normal(1e-3),
                                                    initial_bias=LOG_SCALE_INIT))

    @property
    def input_dtype(self):
        """dtype the network computes in: float32, or float16 when built in mixed16 mode."""
        return self.conv1.W.dtype

    def _conv(self, k: int, h):
        """conv<k>, its batch normalization if any, then ReLU."""
        h = getattr(self, f"conv{k}")(h)
        if self.batch_norm:
            h = getattr(self, f"bn{k}")(h)
        return F.relu(h)

    def forward(self, x, with_scales: bool = False):
        """``x``: (N, 3, input_size, input_size) float32 -> (N, 2 * num_joints), then the
        (N, 2 * num_joints) log scales in training mode or with ``with_scales`` (scale layer
        only)."""
        # cover_all=False floors the pooled size like torch; Chainer's default would round up.
        h = x
        for k, (*_, pooled) in enumerate(self.convs, 1):
            h = self._conv(k, h)
            if pooled:
                h = F.max_pooling_2d(h, POOL_KSIZE, POOL_STRIDE, cover_all=False)
        h = F.dropout(F.relu(self.fc6(h)), self.dropout)  # Linear flattens (N, C, H, W) row-major like torch
        h = F.dropout(F.relu(self.fc7(h)), self.dropout)
        if self.uncertainty and (chainer.config.train or with_scales):
            return F.concat((self.fc8(h), self.fc8_scale(h)), axis=1)
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


def pose_loss(pred, target, visible, use_visibility: bool = True,
              norm: str = "l2") -> chainer.Variable:
    """Mean over visible joints of the squared 2-D distance (``norm="l2"``) or of the sum of
    absolute coordinate errors (``norm="l1"``) between prediction and target.

    ``pred`` (N, 2J), ``target`` (N, J, 2) (arrays or Variables), ``visible`` (N, J) of 0/1::

        mask = visible if use_visibility else ones
        loss = sum(mask[..., None] * (pred.reshape(N, J, 2) - target) ** 2) / max(sum(mask), 1)

    ``norm="laplace"`` takes ``pred`` (N, 4J), the coordinates then their log scales ``s``
    (clipped to [LOG_SCALE_MIN, LOG_SCALE_MAX]), and sums ``|d| * exp(-s) + s + log 2``.

    Invisible joints contribute exactly 0 to the loss and its gradient whatever their target
    holds (even NaN), so unlabelled joints need no special value.
    """
    pred = chainer.as_variable(pred)
    xp = backend.get_array_module(pred)
    mask, denom = _mask_and_denominator(_as_array(visible), pred.dtype, use_visibility)
    n, j = mask.shape
    check_norm(norm)
    log_scale = None
    if norm == "laplace":  # pred (N, 4J): the coordinates, then their log scales
        check_uncertainty_outputs(pred.shape[1], j)
        pred, log_scale = pred[:, :2 * j], pred[:, 2 * j:]
    diff = F.reshape(pred, (n, j, 2)) - F.cast(chainer.as_variable(target), pred.dtype)
    counts = xp.broadcast_to(mask[..., None] > 0, diff.shape)
    # where(), not just mask * diff: an unlabelled joint may carry NaN coordinates.
    diff = F.where(counts, diff, xp.zeros(diff.shape, diff.dtype))
    weights = xp.broadcast_to(mask[..., None], diff.shape)
    if log_scale is not None:
        log_scale = F.clip(F.reshape(log_scale, (n, j, 2)), LOG_SCALE_MIN, LOG_SCALE_MAX)
        nll = F.absolute(diff) * F.exp(-log_scale) + log_scale + LOG_2
        return F.sum(nll * weights) / denom
    if norm == "l1":
        return F.sum(F.absolute(diff) * weights) / denom
    return F.sum(diff * diff * weights) / denom


class PoseLossFunction(chainer.FunctionNode):
    """``pose_loss`` with its gradient written out: d loss / d pred = 2 * mask * diff / max(sum(mask), 1).

    Inputs ``(pred, target, visible)``; gradients flow to ``pred`` and ``target`` (the mask
    gets none). ``backward`` is built from Chainer functions, so it is differentiable again.
    """

    def __init__(self, use_visibility: bool = True, norm: str = "l2"):
        check_norm(norm, explicit=True)
        self.use_visibility = use_visibility
        self.norm = norm

    def forward(self, inputs):
        pred, target, visible = inputs
        xp = backend.get_array_module(pred)
        mask, denom = _mask_and_denominator(visible, pred.dtype, self.use_visibility)
        n, j = mask.shape
        counts = mask[..., None] > 0
        diff = xp.where(counts, pred.reshape(n, j, 2) - target.astype(pred.dtype, copy=False), pred.dtype.type(0))
        if self.norm == "l1":
            loss = (mask[..., None] * xp.abs(diff)).sum() / pred.dtype.type(denom)
        else:
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
        if self.norm == "l1":  # d|d|/dd = sign(d), 0 at 0 like F.absolute
            scale = xp.broadcast_to(mask[..., None] * pred.dtype.type(1.0 / denom), diff.shape)
            slope = xp.sign(diff.array).astype(diff.dtype)
            grad_diff = F.broadcast_to(grad_loss, diff.shape) * slope * scale
        else:
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


def pose_loss_explicit(pred, target, visible, use_visibility: bool = True,
                       norm: str = "l2") -> chainer.Variable:
    """Same value and gradient as ``pose_loss``, through ``PoseLossFunction``'s hand-written backward."""
    (loss,) = PoseLossFunction(use_visibility, norm).apply((pred, target, visible))
    return loss


# ----------------------------------------------------------------------------- weights


def _array_of(model: AlexNetRegressor, name: str):
    """The array behind a canonical name: a parameter's ``.array`` or a batch-norm statistic."""
    layer, key = name.split("/")
    value = getattr(getattr(model, layer), key)
    return value.array if isinstance(value, chainer.Variable) else value


def to_numpy_params(model: AlexNetRegressor) -> dict[str, np.ndarray]:
    """The model's parameters (and batch-norm statistics) as ``{"conv1/W": array, ...}``
    float32 NumPy copies (also from a GPU)."""
    cpu = backend.CpuDevice()
    return {name: np.array(cpu.send(_array_of(model, name)), dtype=np.float32, copy=True)
            for name in parameter_names(model.batch_norm, model.uncertainty)}


def load_numpy_params(model: AlexNetRegressor, params: dict[str, np.ndarray],
                      optional: tuple[str, ...] = ()) -> None:
    """Copy ``{"conv1/W": array, ...}`` into the model in place, keeping its device and dtype;
    the ``optional`` names ``params`` lacks keep the model's values.

    Raises ``DeepPoseError`` (before changing anything) on a missing key or a wrong shape.
    """
    names = parameters_to_load(params, model.batch_norm, model.uncertainty, optional)
    check_parameters(params, {name: _array_of(model, name).shape for name in names})
    for name in names:
        target = _array_of(model, name)
        xp = backend.get_array_module(target)
        target[...] = xp.asarray(np.asarray(params[name], dtype=target.dtype))
