"""The Chainer engine: network, optimizer, one training step, checkpoints and model files.

The loop itself lives once in ``training.loop``. Files:

* checkpoint (``checkpoint.npz``): the model and optimizer under the keys a Chainer
  ``Trainer`` snapshot uses (``updater/model:main/...``, ``updater/optimizer:main/...``,
  ``updater/iteration``, NumPy's random state under ``updater/numpy_random/``), plus
  ``deeppose/format``, ``deeppose/framework`` and the resolved recipe; written and read
  without pickle;
* model (``model.npz``): the parameters under Chainer's own names (``conv1/W``, ...,
  ``fc8/b``, as ``chainer.serializers.save_npz`` writes them) and a few small metadata arrays,
  so it stays loadable with plain NumPy.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys
import zipfile
import zlib
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.config import TrainConfig, parse_device
from ..core.distributed import DISTRIBUTED_EXTRA, SINGLE, World, loss_weight, process_device
from ..core.errors import DeepPoseError
from ..core.files import atomic_write
from ..core.losses import predicts_uncertainty
from ..core.predictor import Prediction, split_outputs
from ..core.weights import (ARCHITECTURE_KEYS, PARAMETER_NAMES, SCALE_NAMES, architecture,
                            check_parameters, parameter_names, parameter_shapes)
from ..data.pipeline import RawBatch, RunBatches, RunSampler
from . import framework_of_model_file
from .base import (CHECKPOINT_FORMAT, MODEL_FORMAT, apply_init_parameters,
                   check_checkpoint_recipe, checkpoint_iteration)
from .chainer_compat import import_chainer

chainer = import_chainer()
from chainer import backend  # noqa: E402
from chainer.backends import cuda  # noqa: E402

from .chainer_model import (AlexNetRegressor, load_numpy_params, pose_loss,  # noqa: E402
                            pose_loss_explicit, to_numpy_params)

FRAMEWORK = "chainer"
META_KEYS = ("num_joints", "input_size", "width")  # required; batch_norm defaults to False
PREDICT_BATCH = 64
LOADER_PREFETCH = 2


# ----------------------------------------------------------------------------- devices


def get_device(device: str) -> "chainer.backend.Device":
    """``cpu`` / ``cuda`` / ``cuda:N`` -> a Chainer device (``@numpy`` or ``@cupy:N``)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return chainer.get_device("@numpy")
    if not cuda.available:
        raise DeepPoseError(f"device {device} needs CuPy, which is not installed: "
                            "install the gpu extra with pip install 'deeppose[gpu]'")
    count = cuda.cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        raise DeepPoseError(f"device {device} does not exist: {count} CUDA device(s) found")
    chainer_device = chainer.get_device(f"@cupy:{index}")
    chainer_device.use()
    return chainer_device


# ----------------------------------------------------------------------------- inference


class ChainerPredictor:
    """A Chainer network as a :class:`~deeppose_cli.core.predictor.Predictor`, in test mode
    (no dropout, no graph), ``PREDICT_BATCH`` inputs at a time.

    ``crops`` cuts every crop on the device with ``F.spatial_transformer_sampler`` (bilinear,
    zeros outside the image, -1 and 1 at the centres of the first and last pixels): the
    geometry of ``geometry.crop_matrix``, as ``TorchPredictor.crops`` does it in PyTorch."""

    def __init__(self, model: AlexNetRegressor, device, cuts_crops: bool | None = None):
        self.model, self.device = model, device
        self.num_joints, self.input_size = model.num_joints, model.input_size
        self.has_scales = model.uncertainty
        self.cuts_crops = device.xp is not np if cuts_crops is None else cuts_crops

    def _outputs(self, batches) -> Prediction:
        cpu = backend.CpuDevice()
        out = []
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            for x in batches:
                y = self.model(x.astype(self.model.input_dtype, copy=False), with_scales=True)
                out.append(np.asarray(cpu.send(y.array), dtype=np.float64))
        if not out:
            return Prediction(np.zeros((0, self.num_joints, 2)))
        return split_outputs(np.concatenate(out), self.num_joints)

    def __call__(self, images: np.ndarray) -> Prediction:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise DeepPoseError(f"expected images of shape (N, 3, H, W), got {images.shape}")
        return self._outputs(self.device.send(np.ascontiguousarray(images[s:s + PREDICT_BATCH]))
                             for s in range(0, len(images), PREDICT_BATCH))

    def crops(self, images: Sequence[np.ndarray], boxes: np.ndarray,
              flip: bool = False) -> Prediction:
        from ..core.geometry import crop_sampling_grid
        from ..core.images import input_scale_bias

        xp, device = self.device.xp, self.device
        scale, bias = (device.send(a.reshape(1, 3, 1, 1)) for a in input_scale_bias())
        boxes = np.asarray(boxes, dtype=np.float64)
        size = self.input_size
        cut = []
        with chainer.no_backprop_mode():
            for image, image_boxes in zip(images, boxes):
                height, width = image.shape[:2]
                k = len(image_boxes)
                pixels = device.send(np.ascontiguousarray(image))  # uint8 travels, not floats
                pixels = xp.ascontiguousarray(pixels.transpose(2, 0, 1)[None].astype(np.float32))
                gx, gy = (device.send(a) for a in
                          crop_sampling_grid(image_boxes, width, height, size, flip))
                grid = xp.stack(xp.broadcast_arrays(gx[:, None, :], gy[:, :, None]), axis=1)
                source = xp.ascontiguousarray(xp.broadcast_to(pixels, (k,) + pixels.shape[1:]))
                cut.append(chainer.functions.spatial_transformer_sampler(
                    source, xp.ascontiguousarray(grid)).array)
        x = (xp.concatenate(cut) * scale + bias) if cut else xp.zeros((0, 3, size, size),
                                                                       np.float32)
        prediction = self._outputs(x[s:s + PREDICT_BATCH] for s in range(0, len(x), PREDICT_BATCH))
        return prediction.reshape(*boxes.shape[:2])


# ----------------------------------------------------------------------------- training


def build_model(config: TrainConfig, num_joints: int,
                init_params: dict[str, np.ndarray] | None = None) -> AlexNetRegressor:
    """The stage's network, freshly initialized or with ``init_params`` (``--init``)."""
    # mixed16: float16 parameters and activations (batch norm statistics stay fp32)
    dtype = chainer.mixed16 if config.precision == "fp16" else np.float32
    with chainer.using_config("dtype", dtype):
        model = AlexNetRegressor(num_joints, config.input_size, config.width, config.batch_norm,
                                 config.dropout, predicts_uncertainty(config.loss))
    apply_init_parameters(load_numpy_params, model, config, init_params)
    return model


def make_optimizer(config: TrainConfig, model: "chainer.Link") -> "chainer.Optimizer":
    """The recipe's optimizer set up on ``model``, with its weight decay as a hook."""
    if config.optimizer == "Adam":
        optimizer = chainer.optimizers.Adam(alpha=config.lr)
    elif config.optimizer == "MomentumSGD":
        optimizer = chainer.optimizers.MomentumSGD(lr=config.lr, momentum=config.momentum)
    else:
        raise DeepPoseError(f"optimizer must be MomentumSGD or Adam, got {config.optimizer!r}")
    optimizer.setup(model)
    if config.precision == "fp16":
        optimizer.use_fp32_update()  # fp32 master weights behind the float16 parameters
        optimizer.loss_scaling()     # dynamic: halves on overflow, grows while finite
    if config.weight_decay > 0:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(config.weight_decay))
    return optimizer


def normalize_on_device(batch: RawBatch, device) -> tuple:
    """A raw batch on ``device``: the uint8 crops travel and become network inputs there,
    ``crops * scale + bias`` per channel in float32, exactly the host path's arithmetic."""
    crops, scale, bias, joints, visible = (device.send(np.asarray(a)) for a in batch)
    xp = device.xp
    x = xp.ascontiguousarray(crops.transpose(0, 3, 1, 2)).astype(np.float32)
    x *= scale[:, :, None, None]
    x += bias[:, :, None, None]
    return x, joints, visible


def train_step(model: AlexNetRegressor, loss_fn: Callable, optimizer: "chainer.Optimizer",
               images, joints, visible, use_visibility: bool):
    """One optimizer step; returns the loss array, still on the device: reading it would make
    the host wait for the device every step, so the loop reads its losses in batches. The
    benchmark times this same function.

    In float16 (mixed16) the loss is scaled for the backward pass (dynamic loss scaling, so
    small gradients survive) and the update is done on fp32 master weights."""
    pred = model(images.astype(model.input_dtype, copy=False))
    if pred.dtype != np.float32:
        pred = chainer.functions.cast(pred, np.float32)
    loss = loss_fn(pred, joints, visible, use_visibility=use_visibility)
    model.cleargrads()
    loss.backward(loss_scale=getattr(optimizer, "_loss_scale", None))
    optimizer.update()
    return loss.array


class ChainerEngine:
    """One stage's Chainer network and optimizer on one device (``engines.base.Engine``)."""

    framework = FRAMEWORK

    def __init__(self, config: TrainConfig, num_joints: int,
                 init_params: dict[str, np.ndarray] | None = None, world: World = SINGLE):
        self.config, self.world = config, world
        self.device = get_device(process_device(world, config.device))
        np.random.seed(config.seed)  # chainer's initializers and dropout draw from it
        self.model = build_model(config, num_joints, init_params)
        self.model.to_device(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.step_optimizer = self.optimizer
        self.loss_fn = functools.partial(
            pose_loss_explicit if config.explicit_backward else pose_loss, norm=config.loss)
        self.comm = None
        if world.distributed:
            self._join(world)

    # ------------------------------------------------------------------ several processes

    def _join(self, world: World) -> None:
        """A ChainerMN communicator over the MPI job (``naive`` on the CPU, ``pure_nccl`` on
        CUDA) and a multi-node optimizer, which averages the gradients of every step over
        the processes before the update; every process starts from process 0's weights."""
        try:
            import_module("mpi4py")  # chainermn imports it lazily, with a vaguer error
            import chainermn
        except ImportError as e:
            raise DeepPoseError(f"training Chainer on several processes needs ChainerMN's MPI "
                                f"binding ({e.name or 'mpi4py'} is not installed): install the "
                                f"distributed extra with {DISTRIBUTED_EXTRA}") from None
        name = "naive" if self.device.xp is np else "pure_nccl"
        self.comm = chainermn.create_communicator(name)
        if self.comm.size != world.size or self.comm.rank != world.rank:
            raise DeepPoseError(f"MPI says rank {self.comm.rank} of {self.comm.size}, the "
                                f"environment {world.describe()}")
        self.comm.bcast_data(self.model)
        self.step_optimizer = chainermn.create_multi_node_optimizer(self.optimizer, self.comm)
        # The multi-node optimizer broadcasts instead of updating the first time it sees a
        # model's parameters; they were broadcast just now, so let it record them here.
        self.step_optimizer.is_changed(self.model)

    def reseed(self, seed: int) -> None:
        """The random state of the coming step (dropout), in a run of several processes."""
        np.random.seed(seed)
        if self.device.xp is not np:
            self.device.xp.random.seed(seed)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.mpi_comm.Barrier()

    def close(self, failed: bool = False) -> None:
        """Nothing to tear down: MPI finalizes when the process exits. A failed process must
        not finalize (MPI_Finalize would wait for the others, which wait in a collective for
        it): it exits with status 1 once its error is printed, without finalizing, and
        mpiexec then stops the others."""
        if failed and self.comm is not None:
            atexit.register(_exit_without_finalizing)

    @contextlib.contextmanager
    def batches(self, dataset, sampler: RunSampler):
        """The sampler's batches, drawn and collated by ``config.workers`` processes of one
        ``MultiprocessIterator`` that lives for the whole run (shared memory carries them),
        or in this process with no workers."""
        run_batches = RunBatches(dataset, sampler)
        source = None
        if self.config.workers > 0:
            source = chainer.iterators.MultiprocessIterator(
                run_batches, 1, repeat=False, shuffle=False, n_processes=self.config.workers,
                n_prefetch=LOADER_PREFETCH)
            host = (batch for (batch,) in source)
        else:
            host = (run_batches[i] for i in range(len(run_batches)))
        try:
            yield (self.to_device(batch) for batch in host)
        finally:
            if source is not None:
                source.finalize()  # stops the worker processes on every path

    def to_device(self, batch: RawBatch) -> tuple:
        return normalize_on_device(batch, self.device)

    def forward(self, batch) -> None:
        """One inference forward pass of the network on a device batch (the benchmark's)."""
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            self.model(batch[0].astype(self.model.input_dtype, copy=False))

    def sync(self) -> None:
        """Wait for the device's queued work (a clock read after it sees finished work)."""
        if self.device.xp is not np:
            self.device.device.synchronize()

    def set_learning_rate(self, lr: float) -> None:
        # Adam's step size is ``alpha`` in Chainer, MomentumSGD's ``lr``
        setattr(self.optimizer, "alpha" if isinstance(self.optimizer, chainer.optimizers.Adam)
                else "lr", lr)

    def step(self, batch) -> Any:
        x, joints, visible = batch
        if self.comm is None:
            return train_step(self.model, self.loss_fn, self.optimizer, x, joints, visible,
                              self.config.use_visibility)
        # this process's share of the batch's visible joints weighs its loss
        count = float(visible.sum()) if self.config.use_visibility else float(visible.size)
        weight = loss_weight(count, self.comm.allreduce_obj(count), self.world.size)
        loss_fn = self.loss_fn

        def weighted(*args, **kwargs):
            loss = loss_fn(*args, **kwargs)
            return loss * loss.dtype.type(weight)

        return train_step(self.model, weighted, self.step_optimizer, x, joints, visible,
                          self.config.use_visibility)

    def read_losses(self, pending: list) -> list[float]:
        if not pending:
            return []
        xp = backend.get_array_module(pending[0])
        losses = np.asarray(backend.CpuDevice().send(xp.stack(pending)))
        if self.comm is not None:  # the mean over the processes: the whole batch's loss
            losses = self.comm.allreduce_obj(losses) / self.world.size
        return losses.tolist()

    def predictor(self) -> ChainerPredictor:
        return ChainerPredictor(self.model, self.device, cuts_crops=False)

    def save_checkpoint(self, path: Path, iteration: int) -> None:
        arrays: dict[str, Any] = {}
        serializer = chainer.serializers.DictionarySerializer(arrays)
        updater = serializer["updater"]
        self.model.serialize(updater["model:main"])
        self.optimizer.serialize(updater["optimizer:main"])
        # (the serializer already copied every array to the host; an object array would
        # need pickle, and the model holds none)
        arrays = {key: np.asarray(value) for key, value in arrays.items()
                  if np.asarray(value).dtype != object}
        name, keys, pos, has_gauss, cached = np.random.get_state()
        arrays.update({
            "updater/iteration": np.asarray(int(iteration)),
            "updater/numpy_random/keys": np.asarray(keys, dtype=np.uint32),
            "updater/numpy_random/pos": np.asarray(int(pos)),
            "updater/numpy_random/has_gauss": np.asarray(int(has_gauss)),
            "updater/numpy_random/cached_gaussian": np.asarray(float(cached)),
            "deeppose/format": np.asarray(CHECKPOINT_FORMAT),
            "deeppose/framework": np.asarray(FRAMEWORK),
            "deeppose/config": np.asarray(json.dumps(self.config.to_json())),
        })

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
                np.savez(f, **arrays)

        atomic_write(Path(path), write)

    def load_checkpoint(self, path: Path) -> int:
        """Restore a checkpoint without ever unpickling (``chainer.serializers.load_npz``
        would open it with ``allow_pickle=True``); also reads the snapshots of the Chainer
        ``Trainer`` that trained runs before the one loop (same keys, no ``deeppose/``)."""
        path = Path(path)
        if not path.is_file():
            raise DeepPoseError(f"checkpoint file {path} does not exist")
        try:
            with np.load(str(path), allow_pickle=False) as npz:
                if "deeppose/format" in npz.files:
                    config = json.loads(str(npz["deeppose/config"]))
                    iteration = checkpoint_iteration(
                        {"format": str(npz["deeppose/format"]),
                         "framework": str(npz["deeppose/framework"]),
                         "iteration": int(npz["updater/iteration"])}, path, FRAMEWORK)
                    check_checkpoint_recipe(config, self.config, path)
                elif "updater/iteration" in npz.files:
                    iteration = int(npz["updater/iteration"])
                else:
                    raise DeepPoseError(f"{path} is not a deeppose training checkpoint")
                updater = chainer.serializers.NpzDeserializer(npz)["updater"]
                self.model.serialize(updater["model:main"])
                self.optimizer.serialize(updater["optimizer:main"])
                state = [npz[f"updater/numpy_random/{k}"]
                         for k in ("keys", "pos", "has_gauss", "cached_gaussian")]
        except ValueError as e:
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise DeepPoseError(f"cannot resume from {path}: it holds Python objects "
                                    "(pickled data), which are never loaded from a file") from None
            raise DeepPoseError(f"cannot resume from {path}: not a checkpoint of this recipe "
                                f"or corrupt ({_first_line(e)})") from None
        except (KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DeepPoseError(f"cannot resume from {path}: not a checkpoint of this recipe "
                                f"or corrupt ({_first_line(e)})") from None
        keys, pos, has_gauss, cached = state
        np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), int(pos),
                             int(has_gauss), float(cached)))
        return iteration

    def write_model(self, path: Path) -> None:
        meta = {"num_joints": self.model.num_joints, "input_size": self.config.input_size,
                "width": self.config.width, "batch_norm": self.config.batch_norm,
                "uncertainty": predicts_uncertainty(self.config.loss)}
        params = to_numpy_params(self.model)
        atomic_write(Path(path), lambda tmp: write_model(params, meta, tmp))


def _exit_without_finalizing() -> None:
    """(atexit, which runs before mpi4py's MPI_Finalize)"""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ----------------------------------------------------------------------------- model files


def write_model(params: dict[str, np.ndarray], meta: dict, path: Path,
                dtype: np.dtype = np.float32) -> None:
    """Write ``params`` (canonical names) and the architecture of ``meta`` as a model .npz,
    in ``dtype`` (float32, or float16 for a model shipped small).

    Checked against the architecture first, so a model file always loads into the network
    its metadata describes.
    """
    spec = _architecture(meta, Path(path))
    check_parameters(params, parameter_shapes(**spec))
    arrays = {name: np.asarray(params[name], dtype=dtype)
              for name in parameter_names(spec["batch_norm"], spec["uncertainty"])}
    arrays["deeppose_format"] = np.array(MODEL_FORMAT)
    arrays["deeppose_framework"] = np.array(FRAMEWORK)
    arrays["num_joints"] = np.array(spec["num_joints"], dtype=np.int64)
    arrays["input_size"] = np.array(spec["input_size"], dtype=np.int64)
    arrays["width"] = np.array(spec["width"], dtype=np.float64)
    arrays["batch_norm"] = np.array(spec["batch_norm"])
    arrays["uncertainty"] = np.array(spec["uncertainty"])
    # A file object: np.savez would append ".npz" to a path that lacks it.
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_params(model_path: Path) -> dict[str, np.ndarray]:
    """The parameters of a Chainer model file as ``{"conv1/W": array, ...}``."""
    params, _meta = _read_model(Path(model_path))
    return params


def load_model(model_path: Path, meta: dict, device: str = "cpu") -> AlexNetRegressor:
    """The network of a model file on ``device``. ``meta`` (a run.json) gives the
    architecture; the file's own metadata fills any gap."""
    model_path = Path(model_path)
    chainer_device = get_device(device)
    params, file_meta = _read_model(model_path)
    spec = _architecture({**file_meta, **{k: meta[k] for k in ARCHITECTURE_KEYS if k in meta}},
                         model_path)
    for key in ("batch_norm", "uncertainty"):  # _read_model always sets them
        if spec[key] != bool(file_meta[key]):
            raise DeepPoseError(f"{model_path} has {key} {bool(file_meta[key])}, "
                                f"but its run.json says {spec[key]}")
    state = np.random.get_state()  # building the model draws initial weights; leave no trace
    try:
        model = AlexNetRegressor(**spec)
    finally:
        np.random.set_state(state)
    try:
        load_numpy_params(model, params)
    except DeepPoseError as e:
        raise DeepPoseError(f"{model_path}: {e}") from None
    model.to_device(chainer_device)
    return model


def load_predictor(model_path: Path, meta: dict, device: str = "cpu") -> ChainerPredictor:
    """A predictor from a model file (see :func:`load_model`)."""
    return ChainerPredictor(load_model(model_path, meta, device), get_device(device))


def _architecture(meta: dict, path: Path) -> dict[str, Any]:
    missing = [k for k in META_KEYS if meta.get(k) is None]
    if missing:
        raise DeepPoseError(f"{path}: architecture unknown (no {', '.join(missing)} in the "
                            "run metadata or the model file)")
    return architecture(meta)


def _read_model(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(parameters, architecture metadata found in the file), or a one-line error saying
    what the file is instead."""
    arrays = _read_npz(path)
    if any(key.startswith("updater/") for key in arrays):
        raise DeepPoseError(f"{path} is a training checkpoint, not a model: use the run's "
                            f"model{path.suffix or '.npz'} (a checkpoint only resumes training, "
                            "with --resume)")
    fmt = _scalar(arrays.get("deeppose_format"))
    if fmt is not None and fmt != MODEL_FORMAT:
        raise DeepPoseError(f"{path} is not a deeppose model file (format {fmt!r})")
    framework = _scalar(arrays.get("deeppose_framework"))
    if framework is not None and framework != FRAMEWORK:
        raise DeepPoseError(f"{path} is a {framework} model, not a Chainer one: "
                            "convert it with `deeppose convert`")
    if not any(name in arrays for name in PARAMETER_NAMES):
        raise DeepPoseError(f"{path} is not a deeppose Chainer model (no conv1/W ... fc8/b "
                            "parameters)")
    file_meta = {k: _scalar(arrays[k]) for k in ARCHITECTURE_KEYS if k in arrays}
    # Files written before batch_norm existed say nothing; their arrays tell.
    file_meta.setdefault("batch_norm", "bn1/gamma" in arrays)
    file_meta.setdefault("uncertainty", SCALE_NAMES[0] in arrays)
    names = parameter_names(bool(file_meta["batch_norm"]), bool(file_meta["uncertainty"]))
    try:
        if all(k in file_meta for k in META_KEYS):
            check_parameters(arrays, parameter_shapes(**_architecture(file_meta, path)))
        else:
            check_parameters(arrays, {name: np.shape(arrays.get(name, ())) for name in names})
    except DeepPoseError as e:
        raise DeepPoseError(f"{path}: {e}") from None
    params = {name: np.asarray(arrays[name], dtype=np.float32) for name in names}
    return params, file_meta


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DeepPoseError(f"model file {path} not found")
    if framework_of_model_file(path) == "pytorch":
        raise DeepPoseError(f"{path} is a PyTorch model (or another pickle), not a Chainer one: "
                            "convert it with `deeppose convert`")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DeepPoseError(f"{path} is a single .npy array, not a model .npz")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except ValueError as e:
        # NumPy blames pickle for any file that is neither .npy nor .npz; an object array
        # inside is the pickle (a bare pickle file was refused above, as PyTorch's format).
        if "Object arrays" in str(e):
            raise DeepPoseError(f"{path} holds Python objects (pickled data), which are never "
                                "loaded from a file: it is not a deeppose model") from None
        raise DeepPoseError(f"{path} is truncated or corrupt (not a readable .npz model)") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError):
        raise DeepPoseError(f"{path} is truncated or corrupt (not a readable .npz model)") from None


def _scalar(value) -> Any:
    if value is None:
        return None
    item = np.asarray(value)
    return item.item() if item.shape == () else item


def devices() -> str:
    """What `deeppose info` lists for this framework."""
    found = ["cpu (@numpy)"]
    if cuda.available:
        found += [f"@cupy:{i}" for i in range(cuda.cupy.cuda.runtime.getDeviceCount())]
    return ", ".join(found)


def check_device(device: str) -> None:
    """Fail with a one-line error before a run directory is touched if ``device`` is unusable."""
    get_device(device)


Engine = ChainerEngine
