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

from ..weights import LAYER_NAMES, check_parameters, feature_map_size, layer_sizes


class AlexNetRegressor(nn.Module):
    """AlexNet that regresses ``2 * num_joints`` normalized joint coordinates (DeepPose Sec. 3).

    ``width`` scales every channel count and the fc6/fc7 sizes, so tests and demos can run a
    tiny variant; ``input_size`` is the side of the square crop and fixes fc6's input size.
    """

    def __init__(self, num_joints: int = 14, input_size: int = 227, width: float = 1.0):
        super().__init__()
        self.num_joints = num_joints
        self.input_size = input_size
        self.width = width
        (c1, c2, c3, c4, c5), fc_units = layer_sizes(width)
        side = feature_map_size(input_size)
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1)
        self.fc6 = nn.Linear(c5 * side * side, fc_units)
        self.fc7 = nn.Linear(fc_units, fc_units)
        self.fc8 = nn.Linear(fc_units, 2 * num_joints)
        # Start every prediction near 0, the box centre, instead of at a random pose.
        nn.init.normal_(self.fc8.weight, std=1e-3)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 3, input_size, input_size) float32 -> (N, 2 * num_joints)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 3, 2)
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        h = F.max_pool2d(F.relu(self.conv5(h)), 3, 2)
        h = torch.flatten(h, 1)
        h = F.dropout(F.relu(self.fc6(h)), 0.5, training=self.training)
        h = F.dropout(F.relu(self.fc7(h)), 0.5, training=self.training)
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


def pose_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True) -> torch.Tensor:
    """Mean over visible joints of the squared 2-D distance between prediction and target.

    ``pred`` (N, 2J), ``target`` (N, J, 2), ``visible`` (N, J) of 0/1::

        mask = visible if use_visibility else ones
        loss = sum(mask[..., None] * (pred.reshape(N, J, 2) - target) ** 2) / max(sum(mask), 1)

    Invisible joints contribute exactly 0 to the loss and its gradient whatever their target
    holds (even NaN), so unlabelled joints need no special value.
    """
    diff, mask, denom = _masked_diff(pred, target.to(pred.dtype), visible.to(pred.dtype), use_visibility)
    return (mask[..., None] * diff * diff).sum() / denom


class PoseLossFunction(torch.autograd.Function):
    """``pose_loss`` with its gradient written out: d loss / d pred = 2 * mask * diff / max(sum(mask), 1).

    Inputs ``(pred, target, visible, use_visibility)``; gradients flow to ``pred`` and
    ``target``. Once differentiable: use ``pose_loss`` where second derivatives are needed.
    """

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True) -> torch.Tensor:
        diff, mask, denom = _masked_diff(pred, target.to(pred.dtype), visible.to(pred.dtype), use_visibility)
        ctx.save_for_backward(diff, mask, denom)
        ctx.pred_shape = pred.shape
        ctx.target_dtype = target.dtype
        return (mask[..., None] * diff * diff).sum() / denom

    @staticmethod
    @once_differentiable  # the saved diff carries no graph; double backward would be silently wrong
    def backward(ctx, grad_loss: torch.Tensor):
        diff, mask, denom = ctx.saved_tensors
        grad_diff = grad_loss * 2.0 * mask[..., None] * diff / denom
        grad_pred = grad_diff.reshape(ctx.pred_shape) if ctx.needs_input_grad[0] else None
        grad_target = -grad_diff.to(ctx.target_dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None


def pose_loss_explicit(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, use_visibility: bool = True) -> torch.Tensor:
    """Same value and gradient as ``pose_loss``, through ``PoseLossFunction``'s hand-written backward."""
    return PoseLossFunction.apply(pred, target, visible, use_visibility)


# ----------------------------------------------------------------------------- weights


def to_numpy_params(model: AlexNetRegressor) -> dict[str, np.ndarray]:
    """The model's parameters as ``{"conv1/W": array, ...}`` float32 copies (see ``deeppose_cli.weights``)."""
    params = {}
    for name in LAYER_NAMES:
        layer = getattr(model, name)
        params[f"{name}/W"] = layer.weight.detach().cpu().numpy().astype(np.float32, copy=True)
        params[f"{name}/b"] = layer.bias.detach().cpu().numpy().astype(np.float32, copy=True)
    return params


def load_numpy_params(model: AlexNetRegressor, params: dict[str, np.ndarray]) -> None:
    """Copy ``{"conv1/W": array, ...}`` into the model in place, keeping its device and dtype.

    Raises ``DeepPoseError`` (before changing anything) on a missing key or a wrong shape.
    """
    expected = {}
    for name in LAYER_NAMES:
        layer = getattr(model, name)
        expected[f"{name}/W"] = tuple(layer.weight.shape)
        expected[f"{name}/b"] = tuple(layer.bias.shape)
    check_parameters(params, expected)
    with torch.no_grad():
        for name in LAYER_NAMES:
            layer = getattr(model, name)
            layer.weight.copy_(torch.as_tensor(np.asarray(params[f"{name}/W"])))
            layer.bias.copy_(torch.as_tensor(np.asarray(params[f"{name}/b"])))
