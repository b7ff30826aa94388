"""The benchmark's reference in PyTorch: the stage's network, loss and update written plainly
with stock ``torch.nn`` layers and no project code.

Timed beside the engine's own step on the same device batches, it shows that the project's
model, loss and step add no hidden overhead. It follows the resolved recipe: the same
layers (batch norm, dropout, the scale layer of the ``laplace`` loss), the same loss, the
same optimizer and the same arithmetic (autocast and channels-last where the engine uses
them), so the two differ only in how they are written.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.config import TrainConfig
from ..core.weights import POOL_KSIZE, POOL_STRIDE, conv_stack, fc_stack

LOG_SCALE_RANGE = (-7.0, 4.0)  # the clip of core.losses, written out


class Reference:
    """The recipe's network as ``nn.Sequential`` blocks, with its loss and update."""

    framework = "pytorch"

    def __init__(self, config: TrainConfig, num_joints: int):
        from .torch_engine import resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        layers: list[nn.Module] = []
        for _name, c_in, c_out, ksize, stride, pad, pooled in conv_stack(config.width):
            layers.append(nn.Conv2d(c_in, c_out, ksize, stride=stride, padding=pad))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1))
            layers.append(nn.ReLU())
            if pooled:
                layers.append(nn.MaxPool2d(POOL_KSIZE, POOL_STRIDE))
        layers.append(nn.Flatten())
        (_, f6_in, f6_out), (_, f7_in, f7_out), (_, f8_in, f8_out) = fc_stack(
            num_joints, config.input_size, config.width)
        layers += [nn.Linear(f6_in, f6_out), nn.ReLU(), nn.Dropout(config.dropout),
                   nn.Linear(f7_in, f7_out), nn.ReLU(), nn.Dropout(config.dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(f8_in, f8_out)
        self.scale_head = nn.Linear(f8_in, f8_out) if config.loss == "laplace" else None
        self.model = nn.ModuleList([m for m in (self.body, self.head, self.scale_head) if m])
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.autocast_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        channels_last = self.device.type == "cpu" or dtype is not None
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        if config.optimizer == "Adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                              weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                             momentum=config.momentum,
                                             weight_decay=config.weight_decay)

    def loss(self, h: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        n, j = visible.shape
        mask = visible.float()[..., None]
        diff = self.head(h).float().reshape(n, j, 2) - joints
        diff = torch.where(mask > 0, diff, torch.zeros_like(diff))
        denominator = visible.float().sum().clamp(min=1)
        if self.config.loss == "l2":
            return (mask * diff * diff).sum() / denominator
        if self.config.loss == "l1":
            return (mask * diff.abs()).sum() / denominator
        log_b = self.scale_head(h).float().reshape(n, j, 2).clamp(*LOG_SCALE_RANGE)
        return (mask * (diff.abs() * torch.exp(-log_b) + log_b + math.log(2.0))).sum() \
            / denominator

    def step(self, batch) -> None:
        x, joints, visible = batch
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            h = self.body(x)
            loss = self.loss(h, joints, visible)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
