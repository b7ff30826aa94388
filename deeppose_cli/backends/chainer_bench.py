"""What ``deeppose benchmark`` times in Chainer: the training step and data path that
``chainer_backend.train`` runs, and the same network written with bare Chainer links.

The harness only wraps the backend's own functions (``train_step``, ``make_iterator``,
``RunIterator`` onto the device), so a benchmark figure is the figure of real training.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..config import TrainConfig
from ..weights import POOL_KSIZE, POOL_STRIDE, conv_stack, fc_stack
from ..reporting import IterationPlan
from .chainer_backend import get_device, make_iterator, make_optimizer, train_step
from .chainer_compat import import_chainer
from .chainer_model import AlexNetRegressor, pose_loss, pose_loss_explicit

chainer = import_chainer()
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402


def bare_alexnet(num_joints: int, input_size: int, width: float) -> "chainer.Sequential":
    """The regressor's network (the same spec, ``weights.conv_stack``/``fc_stack``) from stock
    Chainer links and functions and no project code: the baseline that shows our model and
    step add no hidden overhead."""
    def pool(h):
        return F.max_pooling_2d(h, POOL_KSIZE, POOL_STRIDE, cover_all=False)

    layers: list = []
    for _name, c_in, c_out, ksize, stride, pad, pooled in conv_stack(width):
        layers += [L.Convolution2D(c_in, c_out, ksize, stride=stride, pad=pad), F.relu]
        if pooled:
            layers.append(pool)
    for name, f_in, f_out in fc_stack(num_joints, input_size, width):
        layers.append(L.Linear(f_in, f_out))
        if name != "fc8":
            layers += [F.relu, F.dropout]
    return chainer.Sequential(*layers)


class Harness:
    """One model + optimizer on one device, with the step and forward pass to time.

    ``bare=True`` swaps in :func:`bare_alexnet`, ``F.mean_squared_error`` and a hand-written
    cleargrads/backward/update; otherwise the step is ``chainer_backend.train_step`` with the
    project's model and loss (``config.explicit_backward`` picks the loss implementation).
    """

    framework = "chainer"

    def __init__(self, config: TrainConfig, num_joints: int, bare: bool = False):
        self.config = config
        self.device = get_device(config.device)
        np.random.seed(config.seed)
        self.bare = bare
        if bare:
            self.model = bare_alexnet(num_joints, config.input_size, config.width)
        else:
            dtype = chainer.mixed16 if config.precision == "fp16" else np.float32
            with chainer.using_config("dtype", dtype):
                self.model = AlexNetRegressor(num_joints, config.input_size, config.width)
        self.model.to_device(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.loss_fn = pose_loss_explicit if config.explicit_backward else pose_loss

    def batch(self, images: np.ndarray, joints: np.ndarray, visible: np.ndarray):
        return tuple(self.device.send(np.ascontiguousarray(a, dtype=np.float32))
                     for a in (images, joints, visible))

    def step(self, batch) -> None:
        x, joints, visible = batch
        if self.bare:
            loss = F.mean_squared_error(self.model(x), joints.reshape(len(x), -1))
            self.model.cleargrads()
            loss.backward()
            self.optimizer.update()
        else:
            train_step(self.model, self.loss_fn, self.optimizer, x, joints, visible,
                       self.config.use_visibility)

    def forward(self, batch) -> None:
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            self.model(batch[0])

    def sync(self) -> None:
        if self.device.xp is not np:
            self.device.device.synchronize()

    def pipeline(self, dataset, iterations: int) -> Iterator[tuple]:
        """Device batches through the training loop's own iterator (as ``PoseUpdater`` reads
        it): one for the whole measurement, so its workers start once, as in training."""
        plan = IterationPlan.make(len(dataset), self.config.batch_size, 1, None)
        iterator = make_iterator(self.config, dataset,
                                 IterationPlan(plan.iterations_per_epoch, iterations))
        try:
            for batch in iterator:
                yield tuple(self.device.send(a) for a in batch)
        finally:
            iterator.finalize()
