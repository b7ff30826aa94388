"""DeepPose AlexNet regressor and its loss in PyTorch.

The network, parameter names and shapes match ``chainer_model`` exactly (see
``deeppose_cli.weights``), so weights move between the frameworks through
``to_numpy_params`` / ``load_numpy_params`` and give the same predictions.

Coordinates are normalized to the person box: the prediction is ``(N, 2 * num_joints)``
laid out ``x0, y0, x1, y1, ...``, i.e. ``pred.reshape(N, num_joints, 2)``, and 0 is the box
centre.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..core.losses import (LOG_2, LOG_SCALE_MAX, LOG_SCALE_MIN, check_norm,
                      check_uncertainty_outputs)
from ..core.weights import (BN_DECAY, BN_EPS, BN_LAYERS, LOG_SCALE_INIT, POOL_KSIZE, POOL_STRIDE,
                       SCALE_LAYER, check_parameters, conv_stack, fc_stack, parameter_names,
                       parameters_to_load)


class AlexNetRegressor(nn.Module):
    """AlexNet that regresses ``2 * num_joints`` normalized joint coordinates (DeepPose Sec. 3).

    ``width`` scales every channel count and the fc6/fc7 sizes, so tests and demos can run a
    tiny variant; ``input_size`` is the side of the square crop and fixes fc6's input size.
    ``batch_norm`` adds a batch normalization after each convolution (before its ReLU): the
    paper's network trains from scratch only slowly, and normalized activations let it learn
    in far fewer iterations. ``uncertainty`` adds the ``fc8_scale`` layer: in training mode
    the output is then ``(N, 4 * num_joints)``, the coordinates followed by the log of each
    coordinate's Laplace scale, which only the ``laplace`` loss reads; in eval mode it is the
    coordinates alone, like every other variant's.
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
        for name, c_in, c_out, ksize, stride, pad, _pooled in self.convs:
            setattr(self, name, nn.Conv2d(c_in, c_out, kernel_size=ksize, stride=stride,
                                          padding=pad))
        if self.batch_norm:
            for name, conv in zip(BN_LAYERS, self.convs):
                setattr(self, name, nn.BatchNorm2d(conv[2], eps=BN_EPS, momentum=1 - BN_DECAY))
        for name, f_in, f_out in fc_stack(num_joints, input_size, width):
            setattr(self, name, nn.Linear(f_in, f_out))
        # Start every prediction near 0, the box centre, instead of at a random pose.
        nn.init.normal_(self.fc8.weight, std=1e-3)
        nn.init.zeros_(self.fc8.bias)
        if self.uncertainty:  # every scale starts near exp(LOG_SCALE_INIT)
            setattr(self, SCALE_LAYER, nn.Linear(self.fc8.in_features, self.fc8.out_features))
            nn.init.normal_(self.fc8_scale.weight, std=1e-3)
            nn.init.constant_(self.fc8_scale.bias, LOG_SCALE_INIT)

    def _conv(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """conv<k>, its batch normalization if any, then ReLU."""
        h = getattr(self, f"conv{k}")(h)
        if self.batch_norm:
            h = getattr(self, f"bn{k}")(h)
        return F.relu(h)

    def forward(self, x: torch.Tensor, with_scales: bool = False) -> torch.Tensor:
        """``x``: (N, 3, input_size, input_size) float32 -> (N, 2 * num_joints), then the
        (N, 2 * num_joints) log scales in training mode or with ``with_scales`` (scale layer
        only)."""
        h = x
        for k, (*_, pooled) in enumerate(self.convs, 1):
            h = self._conv(k, h)
            if pooled:
                h = F.max_pool2d(h, POOL_KSIZE, POOL_STRIDE)
        h = torch.flatten(h, 1)
        h = F.dropout(F.relu(self.fc6(h)), self.dropout, training=self.training)
        h = F.dropout(F.relu(self.fc7(h)), self.dropout, training=self.training)
        if self.uncertainty and (self.training or with_scales):
            return torch.cat((self.fc8(h), self.fc8_scale(h)), dim=1)
        return self.fc8(h)


# ----------------------------------------------------------------------------- loss


def _masked_diff(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool):
    """(pred - target) per joint with invisible joints zeroed, the mask, and the divisor."""
    n, j = visible.shape
    mask = visible if use_visibility else torch.ones_like(visible)
    diff = pred.reshape(n, j, 2) - target
    # where(), not just mask * diff: an unlabelled joint may carry NaN coordinates.
    diff = torch.where(mask[..., None] > 0, diff, torch.zeros_like(diff))
    denom = mask.sum().clamp(min=1)
    return diff, mask, denom


def pose_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True,
              norm: str = "l2") -> torch.Tensor:
    """Mean over visible joints of the squared 2-D distance (``norm="l2"``, DeepPose's loss)
    or of the sum of absolute coordinate errors (``norm="l1"``) between prediction and target.

    ``pred`` (N, 2J), ``target`` (N, J, 2), ``visible`` (N, J) of 0/1::

        mask = visible if use_visibility else ones
        l2: loss = sum(mask[..., None] * (pred.reshape(N, J, 2) - target) ** 2) / max(sum(mask), 1)
        l1: loss = sum(mask[..., None] * |pred.reshape(N, J, 2) - target|) / max(sum(mask), 1)

    ``norm="laplace"`` takes ``pred`` (N, 4J), coordinates then log scales (``_laplace_nll``).
    Invisible joints contribute exactly 0 to the loss and its gradient whatever their target
    holds (even NaN), so unlabelled joints need no special value.
    """
    check_norm(norm)
    if norm == "laplace":
        return _laplace_nll(pred, target, visible, use_visibility)
    diff, mask, denom = _masked_diff(pred, target.to(pred.dtype), visible.to(pred.dtype), use_visibility)
    if norm == "l1":
        return (mask[..., None] * diff.abs()).sum() / denom
    return (mask[..., None] * diff * diff).sum() / denom


def _laplace_nll(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor,
                 use_visibility: bool) -> torch.Tensor:
    """``laplace``: ``pred`` (N, 4J) holds the coordinates, then their log scales ``s``::

        loss = sum(mask[..., None] * (|d| * exp(-s) + s + log 2)) / max(sum(mask), 1)

    with ``s`` clipped to [LOG_SCALE_MIN, LOG_SCALE_MAX] (see ``deeppose_cli.losses``).
    """
    n, j = visible.shape
    check_uncertainty_outputs(pred.shape[1], j)
    diff, mask, denom = _masked_diff(pred[:, :2 * j], target.to(pred.dtype), visible.to(pred.dtype),
                                     use_visibility)
    log_scale = pred[:, 2 * j:].reshape(n, j, 2).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    nll = diff.abs() * torch.exp(-log_scale) + log_scale + LOG_2
    return (mask[..., None] * nll).sum() / denom


class PoseLossFunction(torch.autograd.Function):
    """``pose_loss`` with its gradient written out: d loss / d pred = 2 * mask * diff / max(sum(mask), 1).

    Inputs ``(pred, target, visible, use_visibility)``; gradients flow to ``pred`` and
    ``target``. Once differentiable: use ``pose_loss`` where second derivatives are needed.
    """

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True,
                norm: str = "l2") -> torch.Tensor:
        check_norm(norm, explicit=True)
        diff, mask, denom = _masked_diff(pred, target.to(pred.dtype), visible.to(pred.dtype), use_visibility)
        ctx.save_for_backward(diff, mask, denom)
        ctx.pred_shape = pred.shape
        ctx.target_dtype = target.dtype
        ctx.norm = norm
        if norm == "l1":
            return (mask[..., None] * diff.abs()).sum() / denom
        return (mask[..., None] * diff * diff).sum() / denom

    @staticmethod
    @once_differentiable  # the saved diff carries no graph; double backward would be silently wrong
    def backward(ctx, grad_loss: torch.Tensor):
        diff, mask, denom = ctx.saved_tensors
        if ctx.norm == "l1":  # d|d|/dd = sign(d), 0 at 0 like torch.abs
            grad_diff = grad_loss * mask[..., None] * torch.sign(diff) / denom
        else:
            grad_diff = grad_loss * 2.0 * mask[..., None] * diff / denom
        grad_pred = grad_diff.reshape(ctx.pred_shape) if ctx.needs_input_grad[0] else None
        grad_target = -grad_diff.to(ctx.target_dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None


def pose_loss_explicit(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True,
                       norm: str = "l2") -> torch.Tensor:
    """Same value and gradient as ``pose_loss``, through ``PoseLossFunction``'s hand-written backward."""
    return PoseLossFunction.apply(pred, target, visible, use_visibility, norm)


# ----------------------------------------------------------------------------- weights


# Canonical array name suffix -> attribute of the torch layer that holds it.
TORCH_ARRAYS = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias",
                "avg_mean": "running_mean", "avg_var": "running_var"}


def _tensor_of(model: AlexNetRegressor, name: str) -> torch.Tensor:
    layer, array = name.split("/")
    return getattr(getattr(model, layer), TORCH_ARRAYS[array])


def to_numpy_params(model: AlexNetRegressor) -> dict[str, np.ndarray]:
    """The model's parameters (and batch-norm statistics) as ``{"conv1/W": array, ...}``
    float32 copies (see ``deeppose_cli.weights``)."""
    return {name: _tensor_of(model, name).detach().contiguous().cpu().numpy().astype(np.float32, copy=True)
            for name in parameter_names(model.batch_norm, model.uncertainty)}


def load_numpy_params(model: AlexNetRegressor, params: dict[str, np.ndarray],
                      optional: tuple[str, ...] = ()) -> None:
    """Copy ``{"conv1/W": array, ...}`` into the model in place, keeping its device and dtype;
    the ``optional`` names ``params`` lacks keep the model's values.

    Raises ``DeepPoseError`` (before changing anything) on a missing key or a wrong shape.
    """
    names = parameters_to_load(params, model.batch_norm, model.uncertainty, optional)
    check_parameters(params, {name: tuple(_tensor_of(model, name).shape) for name in names})
    with torch.no_grad():
        for name in names:
            tensor = _tensor_of(model, name)
            tensor.copy_(torch.as_tensor(np.asarray(params[name])).to(tensor.dtype))
