"""What ``deeppose benchmark`` times in PyTorch: the training step and data path that
``torch_backend.train`` runs, and the same network written with bare ``torch.nn`` ops.

The harness only wraps the backend's own functions (``train_step``, ``make_loader``,
``device_batches``), so a benchmark figure is the figure of real training.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from ..weights import POOL_KSIZE, POOL_STRIDE, conv_stack, fc_stack
from ..reporting import IterationPlan
from .torch_backend import (StepPrecision, build_optimizer, device_batches, make_loader,
                            resolve_device, train_step)
from .torch_model import AlexNetRegressor, pose_loss, pose_loss_explicit

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def bare_alexnet(num_joints: int, input_size: int, width: float) -> nn.Sequential:
    """The regressor's network (the same spec, ``weights.conv_stack``/``fc_stack``) from stock
    ``torch.nn`` layers and no project code: the baseline that shows our model and step add
    no hidden overhead."""
    layers: list[nn.Module] = []
    for _name, c_in, c_out, ksize, stride, pad, pooled in conv_stack(width):
        layers += [nn.Conv2d(c_in, c_out, ksize, stride=stride, padding=pad), nn.ReLU()]
        if pooled:
            layers.append(nn.MaxPool2d(POOL_KSIZE, POOL_STRIDE))
    layers.append(nn.Flatten())
    for name, f_in, f_out in fc_stack(num_joints, input_size, width):
        layers.append(nn.Linear(f_in, f_out))
        if name != "fc8":
            layers += [nn.ReLU(), nn.Dropout(0.5)]
    return nn.Sequential(*layers)


class Harness:
    """One model + optimizer on one device, with the step and forward pass to time.

    ``bare=True`` swaps in :func:`bare_alexnet`, ``F.mse_loss`` and a hand-written
    zero_grad/backward/step; otherwise the step is ``torch_backend.train_step`` with the
    project's model and loss (``config.explicit_backward`` picks the loss implementation).
    """

    framework = "pytorch"

    def __init__(self, config: TrainConfig, num_joints: int, bare: bool = False):
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.bare = bare
        if bare:
            self.model = bare_alexnet(num_joints, config.input_size, config.width)
        else:
            self.model = AlexNetRegressor(num_joints, config.input_size, config.width)
        self.precision = StepPrecision(config.precision, self.device)
        self.model = self.precision.prepare(self.model.to(self.device)).train()
        self.optimizer = build_optimizer(config, self.model)
        self.loss_fn = pose_loss_explicit if config.explicit_backward else pose_loss

    def batch(self, images: np.ndarray, joints: np.ndarray, visible: np.ndarray) -> Batch:
        x, joints, visible = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)
                                               ).to(self.device)
                              for a in (images, joints, visible))
        return self.precision.input(x), joints, visible

    def step(self, batch: Batch) -> None:
        x, joints, visible = batch
        if self.bare:
            loss = F.mse_loss(self.model(x), joints.reshape(len(x), -1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        else:
            train_step(self.model, self.loss_fn, self.optimizer, x, joints, visible,
                       self.config.use_visibility, self.precision)

    def forward(self, batch: Batch) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(batch[0])
        self.model.train()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pipeline(self, dataset, iterations: int) -> Iterator[Batch]:
        """Device batches through the training loop's own loader: one loader for the whole
        measurement, so its workers start once, as in training."""
        plan = IterationPlan.make(len(dataset), self.config.batch_size, 1, None)
        plan = IterationPlan(plan.iterations_per_epoch, iterations)
        yield from device_batches(make_loader(dataset, self.config, self.device, plan),
                                  self.device, self.precision)
