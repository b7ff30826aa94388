"""The benchmark's reference in Chainer: the stage's network, loss and update written
plainly with stock Chainer links and functions and no project code.

Timed beside the engine's own step on the same device batches, it shows that the project's
model, loss and step add no hidden overhead. It follows the resolved recipe: the same layers
(batch norm, dropout, the scale layer of the ``laplace`` loss), loss and optimizer.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.config import TrainConfig
from ..core.weights import POOL_KSIZE, POOL_STRIDE, conv_stack, fc_stack
from .chainer_compat import import_chainer

chainer = import_chainer()
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402

LOG_SCALE_RANGE = (-7.0, 4.0)  # the clip of core.losses, written out


class Reference:
    """The recipe's network as a ``chainer.Sequential`` body and two heads."""

    framework = "chainer"

    def __init__(self, config: TrainConfig, num_joints: int):
        from .chainer_engine import get_device

        self.config = config
        self.device = get_device(config.device)
        np.random.seed(config.seed)
        layers: list = []
        for _name, c_in, c_out, ksize, stride, pad, pooled in conv_stack(config.width):
            layers.append(L.Convolution2D(c_in, c_out, ksize, stride=stride, pad=pad))
            if config.batch_norm:
                layers.append(L.BatchNormalization(c_out, decay=0.9, eps=1e-5))
            layers.append(F.relu)
            if pooled:
                layers.append(lambda h: F.max_pooling_2d(h, POOL_KSIZE, POOL_STRIDE,
                                                         cover_all=False))
        (_, f6_in, f6_out), (_, f7_in, f7_out), (_, f8_in, f8_out) = fc_stack(
            num_joints, config.input_size, config.width)
        ratio = config.dropout
        layers += [L.Linear(f6_in, f6_out), F.relu, lambda h: F.dropout(h, ratio),
                   L.Linear(f7_in, f7_out), F.relu, lambda h: F.dropout(h, ratio)]
        self.model = chainer.Chain()
        with self.model.init_scope():
            self.model.body = chainer.Sequential(*layers)
            self.model.head = L.Linear(f8_in, f8_out)
            if config.loss == "laplace":
                self.model.scale_head = L.Linear(f8_in, f8_out)
        self.model.to_device(self.device)
        if config.optimizer == "Adam":
            self.optimizer = chainer.optimizers.Adam(alpha=config.lr)
        else:
            self.optimizer = chainer.optimizers.MomentumSGD(lr=config.lr,
                                                            momentum=config.momentum)
        self.optimizer.setup(self.model)
        if config.weight_decay > 0:
            self.optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(config.weight_decay))

    def step(self, batch) -> None:
        x, joints, visible = batch
        n, j = visible.shape
        h = self.model.body(x)
        mask = visible[..., None]
        diff = F.reshape(self.model.head(h), (n, j, 2)) - joints
        diff = F.where(self.device.xp.broadcast_to(mask > 0, diff.shape), diff,
                       self.device.xp.zeros(diff.shape, diff.dtype))
        denominator = max(float(visible.sum()), 1.0)
        if self.config.loss == "l2":
            loss = F.sum(mask * diff * diff) / denominator
        elif self.config.loss == "l1":
            loss = F.sum(mask * F.absolute(diff)) / denominator
        else:
            log_b = F.clip(F.reshape(self.model.scale_head(h), (n, j, 2)), *LOG_SCALE_RANGE)
            loss = F.sum(mask * (F.absolute(diff) * F.exp(-log_b) + log_b + math.log(2.0))) \
                / denominator
        self.model.cleargrads()
        loss.backward()
        self.optimizer.update()

    def sync(self) -> None:
        if self.device.xp is not np:
            self.device.device.synchronize()
