"""The PyTorch engine: network, optimizer, one training step, checkpoints and model files.

The loop itself lives once in ``training.loop``; this module adds what is PyTorch's own. Two
file formats, both loadable with ``torch.load(..., weights_only=True)``:

* checkpoint (``checkpoint.pt``): ``{"format": "deeppose-checkpoint", "framework": "pytorch",
  "model", "optimizer", "iteration", "torch_rng_state", "config"}``, so ``--resume``
  continues exactly where a run stopped;
* model (``model.pt``): ``{"format": "deeppose-model", "framework": "pytorch", "num_joints",
  "input_size", "width", "batch_norm", "uncertainty", "params": {"conv1/W": tensor, ...}}``,
  the canonical parameter names of ``core.weights``, so ``deeppose convert`` moves it to
  Chainer.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.config import TrainConfig, parse_device
from ..core.distributed import SINGLE, World, loss_weight, process_device
from ..core.errors import DeepPoseError
from ..core.files import ErrorRecordingWriter, atomic_write, os_error_reason
from ..core.losses import predicts_uncertainty
from ..core.predictor import Prediction, split_outputs
from ..core.weights import ARCHITECTURE_KEYS, architecture, check_parameters, parameter_shapes
from ..data.pipeline import RawBatch, RawSamples, RunSampler, collate_raw
from . import framework_of_model_file
from .base import (CHECKPOINT_FORMAT, MODEL_FORMAT, apply_init_parameters,
                   check_checkpoint_recipe, checkpoint_iteration)
from .torch_model import (AlexNetRegressor, load_numpy_params, pose_loss, pose_loss_explicit,
                          to_numpy_params)

FRAMEWORK = "pytorch"
PREDICT_BATCH = 64
LOADER_PREFETCH = 2  # batches each worker keeps ready (as the Chainer iterator)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- setup


def resolve_device(device: str) -> torch.device:
    """``config.device`` as a torch device; a one-line error when CUDA is asked for but absent."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeepPoseError(f"device {device} requested but CUDA is not available to PyTorch"
                            " (use --device cpu)")
    if index >= torch.cuda.device_count():
        raise DeepPoseError(f"device {device} requested but only {torch.cuda.device_count()}"
                            " CUDA device(s) are visible")
    return torch.device("cuda", index)


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "MomentumSGD":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "Adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay)
    raise DeepPoseError(f"optimizer must be MomentumSGD or Adam, got {config.optimizer!r}")


def build_model(config: TrainConfig, num_joints: int,
                init_params: dict[str, np.ndarray] | None = None) -> AlexNetRegressor:
    """The stage's network, freshly initialized or with ``init_params`` (``--init``)."""
    model = AlexNetRegressor(num_joints, config.input_size, config.width, config.batch_norm,
                             config.dropout, predicts_uncertainty(config.loss))
    apply_init_parameters(load_numpy_params, model, config, init_params)
    return model


class StepPrecision:
    """The arithmetic of a training step (``config.precision``): fp32, or autocast to
    bfloat16 / float16 around the forward pass with fp32 weights, optimizer state and loss;
    float16 adds dynamic loss scaling (``torch.amp.GradScaler``) so small gradients survive.
    Channels-last tensors on the CPU (AlexNet's training step at 131 px: 719 against 645
    images/s, 2 threads, batch 32) and for the reduced precisions on CUDA."""

    def __init__(self, precision: str, device: torch.device):
        self.precision = precision
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.channels_last = device.type == "cpu" or self.dtype is not None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)


def collate(samples) -> RawBatch:
    """Raw samples stacked as tensors (module level so worker processes can pickle it; tensors
    so the loader can pin them)."""
    return RawBatch(*(torch.from_numpy(a) for a in collate_raw(samples)))


def normalize_on_device(batch: RawBatch, device: torch.device,
                        precision: StepPrecision | None = None) -> Batch:
    """A raw batch on ``device``: the uint8 crops travel (a quarter of the float bytes) and
    become network inputs there, ``crops * scale + bias`` per channel in float32, exactly
    the host path's arithmetic (``core.images.normalize_crop``)."""
    crops, scale, bias, joints, visible = (torch.as_tensor(a).to(device, non_blocking=True)
                                           for a in batch)
    n = crops.shape[0]
    # (N, S, S, 3) -> an NCHW view with channels-last strides: no copy
    x = crops.permute(0, 3, 1, 2).float() * scale.view(n, 3, 1, 1) + bias.view(n, 3, 1, 1)
    return (precision.input(x) if precision else x.contiguous()), joints, visible


def train_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor,
               use_visibility: bool, precision: StepPrecision | None = None) -> torch.Tensor:
    """One optimizer step; returns the loss, detached and still on the device: reading it
    would make the host wait for the device every step, so the loop reads its losses in
    batches. The benchmark times this same function."""
    with precision.autocast() if precision else contextlib.nullcontext():
        pred = model(x)
    loss = loss_fn(pred.float(), joints, visible, use_visibility)
    optimizer.zero_grad(set_to_none=True)
    if precision is None:
        loss.backward()
        optimizer.step()
    else:
        precision.backward_and_step(loss, optimizer)
    return loss.detach()


# ----------------------------------------------------------------------------- inference


class TorchPredictor:
    """A PyTorch network as a :class:`~deeppose_cli.core.predictor.Predictor`.

    ``crops`` cuts every crop on the network's device by bilinear grid sampling (each image
    goes there once instead of K crops), on the geometry of ``geometry.crop_matrix`` (pixel
    centres at integers, black outside the image, ``flip`` mirrors the crop), then the
    normalization of ``core.images.input_scale_bias``; the only difference from the OpenCV
    path is that OpenCV rounds its crops to uint8. ``cuts_crops`` (default: on CUDA) tells the
    cascade to use it."""

    def __init__(self, model: AlexNetRegressor, device: torch.device,
                 cuts_crops: bool | None = None):
        self.model, self.device = model, device
        self.num_joints, self.input_size = model.num_joints, model.input_size
        self.has_scales = model.uncertainty
        self.cuts_crops = device.type == "cuda" if cuts_crops is None else cuts_crops

    def _outputs(self, batches: Iterator[torch.Tensor]) -> Prediction:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = [self.model(x, with_scales=True).float().cpu().numpy() for x in batches]
        finally:
            self.model.train(was_training)
        if not out:
            return Prediction(np.zeros((0, self.num_joints, 2)))
        return split_outputs(np.concatenate(out), self.num_joints)

    def __call__(self, images: np.ndarray) -> Prediction:
        images = np.asarray(images)
        return self._outputs(
            torch.from_numpy(np.ascontiguousarray(images[s:s + PREDICT_BATCH],
                                                  dtype=np.float32)).to(self.device)
            for s in range(0, len(images), PREDICT_BATCH))

    def crops(self, images: Sequence[np.ndarray], boxes: np.ndarray,
              flip: bool = False) -> Prediction:
        import torch.nn.functional as F

        from ..core.geometry import crop_sampling_grid
        from ..core.images import input_scale_bias

        boxes = np.asarray(boxes, dtype=np.float64)
        size = self.input_size
        scale, bias = (torch.from_numpy(a).to(self.device).view(1, 3, 1, 1)
                       for a in input_scale_bias())
        cut = []
        with torch.no_grad():
            for image, image_boxes in zip(images, boxes):
                height, width = image.shape[:2]
                pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
                pixels = pixels.permute(2, 0, 1)[None].float()
                gx, gy = (torch.from_numpy(a).to(self.device) for a in
                          crop_sampling_grid(image_boxes, width, height, size, flip))
                k = len(image_boxes)
                grid = torch.stack((gx[:, None, :].expand(k, size, size),
                                    gy[:, :, None].expand(k, size, size)), dim=-1)
                cut.append(F.grid_sample(pixels.expand(k, -1, -1, -1), grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=True))
            x = (torch.cat(cut) * scale + bias if cut
                 else torch.zeros(0, 3, size, size, device=self.device))
        prediction = self._outputs(x[s:s + PREDICT_BATCH] for s in range(0, len(x), PREDICT_BATCH))
        return prediction.reshape(*boxes.shape[:2])


# ----------------------------------------------------------------------------- engine


class TorchEngine:
    """One stage's PyTorch network and optimizer on one device (``engines.base.Engine``)."""

    framework = FRAMEWORK

    def __init__(self, config: TrainConfig, num_joints: int,
                 init_params: dict[str, np.ndarray] | None = None, world: World = SINGLE):
        self.config, self.world = config, world
        self.device = resolve_device(process_device(world, config.device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        torch.manual_seed(config.seed)
        self.precision = StepPrecision(config.precision, self.device)
        self.model = self.precision.prepare(
            build_model(config, num_joints, init_params).to(self.device))
        self.optimizer = build_optimizer(config, self.model)
        self.loss_fn = functools.partial(
            pose_loss_explicit if config.explicit_backward else pose_loss, norm=config.loss)
        self.train_model: torch.nn.Module = self.model
        if world.distributed:
            self._join(world)

    # ------------------------------------------------------------------ several processes

    def _join(self, world: World) -> None:
        """Join torchrun's process group (gloo on the CPU, NCCL on CUDA) and wrap the model
        in DistributedDataParallel, which starts every process from process 0's weights
        and all-reduces (averages) the gradients of every step."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        with self._collective("joining the process group"):
            if not dist.is_initialized():
                dist.init_process_group(backend, device_id=self.device if backend == "nccl"
                                        else None)
            if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
                raise DeepPoseError(f"torch.distributed says rank {dist.get_rank()} of "
                                    f"{dist.get_world_size()}, the environment "
                                    f"{world.describe()}")
            # broadcast_buffers: batch-norm statistics are process 0's on every process
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if backend == "nccl" else None)

    @contextlib.contextmanager
    def _collective(self, what: str):
        """A failed collective (a process of the run died or hung up) as a one-line error."""
        try:
            yield
        except DeepPoseError:
            raise
        except (RuntimeError, ValueError) as e:  # torch.distributed.DistError is a RuntimeError
            if not self.world.distributed:
                raise
            text = str(e).strip().splitlines()
            raise DeepPoseError(f"{what} failed, another process of the run has probably "
                                f"stopped: {text[0] if text else type(e).__name__}") from None

    def reseed(self, seed: int) -> None:
        """The random state of the coming step (dropout), in a run of several processes."""
        torch.manual_seed(seed)

    def barrier(self) -> None:
        if self.world.distributed:
            import torch.distributed as dist

            with self._collective("waiting for the other processes"):
                dist.barrier()

    def close(self, failed: bool = False) -> None:
        """Leave the process group. A failed process just exits (non-zero): torchrun then
        stops the others."""
        if self.world.distributed and not failed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @contextlib.contextmanager
    def batches(self, dataset, sampler: RunSampler):
        """One loader for the rest of the run, following ``sampler``: its worker processes
        start once and keep loading while the loop validates or saves. It gets its own
        generator so creating it never draws from the global torch RNG, which drives dropout
        and must advance identically in resumed and uninterrupted runs."""
        workers = self.config.workers
        loader = DataLoader(RawSamples(dataset), batch_sampler=sampler, num_workers=workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda",
                            prefetch_factor=LOADER_PREFETCH if workers else None,
                            generator=torch.Generator().manual_seed(self.config.seed))
        device_batches = (self.to_device(batch) for batch in loader)
        with contextlib.closing(device_batches):  # closing it stops the workers
            yield device_batches

    def to_device(self, batch: RawBatch) -> Batch:
        return normalize_on_device(batch, self.device, self.precision)

    def forward(self, batch: Batch) -> None:
        """One inference forward pass of the network on a device batch (the benchmark's)."""
        self.model.eval()
        with torch.no_grad():
            self.model(batch[0])
        self.model.train()

    def sync(self) -> None:
        """Wait for the device's queued work (a clock read after it sees finished work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, batch: Batch) -> torch.Tensor:
        x, joints, visible = batch
        if not self.world.distributed:
            return train_step(self.model, self.loss_fn, self.optimizer, x, joints, visible,
                              self.config.use_visibility, self.precision)
        import torch.distributed as dist

        with self._collective("a training step"):
            # this process's share of the batch's visible joints weighs its loss
            count = (visible.sum() if self.config.use_visibility
                     else torch.tensor(float(visible.numel()), device=self.device))
            total = count.detach().clone().float()
            dist.all_reduce(total)
            weight = loss_weight(count.float(), total, self.world.size)
            loss_fn = self.loss_fn

            def weighted(*args) -> torch.Tensor:
                return loss_fn(*args) * weight

            return train_step(self.train_model, weighted, self.optimizer, x, joints, visible,
                              self.config.use_visibility, self.precision)

    def read_losses(self, pending: list[torch.Tensor]) -> list[float]:
        if not pending:
            return []
        losses = torch.stack(pending)
        if self.world.distributed:  # the mean over the processes: the whole batch's loss
            import torch.distributed as dist

            with self._collective("reading the losses"):
                dist.all_reduce(losses)
            losses = losses / self.world.size
        return losses.tolist()

    def predictor(self) -> TorchPredictor:
        return TorchPredictor(self.model, self.device, cuts_crops=False)

    def save_checkpoint(self, path: Path, iteration: int) -> None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "framework": FRAMEWORK,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": int(iteration),
            "torch_rng_state": torch.get_rng_state(),
            "config": self.config.to_json(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()
        if self.precision.scaler is not None:
            checkpoint["grad_scaler"] = self.precision.scaler.state_dict()
        atomic_write(Path(path), lambda tmp: save_file(checkpoint, tmp))

    def load_checkpoint(self, path: Path) -> int:
        checkpoint = _torch_load(path, "checkpoint")
        iteration = checkpoint_iteration(checkpoint, path, FRAMEWORK)
        check_checkpoint_recipe(checkpoint.get("config"), self.config, path)
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["torch_rng_state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeepPoseError(f"{path} does not match this model: {first_line}") from None
        if self.precision.scaler is not None and "grad_scaler" in checkpoint:
            self.precision.scaler.load_state_dict(checkpoint["grad_scaler"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            states = checkpoint["cuda_rng_state"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        return iteration

    def write_model(self, path: Path) -> None:
        write_model(to_numpy_params(self.model), model_meta(self.model), path)


# ----------------------------------------------------------------------------- model files


def model_meta(model: AlexNetRegressor) -> dict[str, Any]:
    return {"num_joints": model.num_joints, "input_size": model.input_size, "width": model.width,
            "batch_norm": model.batch_norm, "uncertainty": model.uncertainty}


def write_model(params: dict[str, np.ndarray], meta: dict, path: Path,
                dtype: np.dtype = np.float32) -> None:
    """Save canonical parameters as a ``.pt`` model file (atomically), in ``dtype``
    (float32, or float16 for a model shipped small)."""
    spec = architecture(meta)
    shapes = parameter_shapes(**spec)
    check_parameters(params, shapes)
    obj = {
        "format": MODEL_FORMAT,
        "framework": FRAMEWORK,
        "num_joints": int(meta["num_joints"]),
        "input_size": int(meta["input_size"]),
        "width": float(meta["width"]),
        "batch_norm": spec["batch_norm"],
        "uncertainty": spec["uncertainty"],
        "params": {name: torch.from_numpy(np.array(params[name], dtype=dtype))
                   for name in shapes},
    }
    atomic_write(Path(path), lambda tmp: save_file(obj, tmp))


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a path that is not valid UTF-8 works, and a
    failed write (a full disk) raises its ``OSError`` instead of torch's "unexpected pos"."""
    with open(path, "wb") as f:
        writer = ErrorRecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line error."""
    path = Path(path)
    if not path.exists():
        raise DeepPoseError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise DeepPoseError(f"{what} file {path} is not a file")
    if framework_of_model_file(path) == "chainer":
        raise DeepPoseError(f"{path} is a Chainer model (.npz), not a PyTorch one: convert it"
                            " with `deeppose convert` or use --framework chainer")
    try:
        with open(path, "rb") as f:  # torch's own file reader refuses non-UTF-8 paths
            return torch.load(f, map_location="cpu", weights_only=True)
    except OSError as e:
        raise DeepPoseError(f"cannot read {what} file {path}: {os_error_reason(e)}") from None
    except pickle.UnpicklingError:
        raise DeepPoseError(f"{path} is not a deeppose {what} file (it holds objects that"
                            " cannot be loaded safely)") from None
    except Exception:  # torch raises RuntimeError, EOFError, ... on a damaged file
        raise DeepPoseError(f"{what} file {path} is truncated or corrupt") from None


def _load_model_file(path: Path) -> dict[str, Any]:
    obj = _torch_load(path, "model")
    if not isinstance(obj, dict):
        raise DeepPoseError(f"{path} is not a deeppose model file")
    if obj.get("format") == CHECKPOINT_FORMAT:
        raise DeepPoseError(f"{path} is a training checkpoint, not a model: use the run's"
                            " model file (written when training ends), or --resume to finish it")
    if obj.get("format") != MODEL_FORMAT:
        raise DeepPoseError(f"{path} is not a deeppose model file")
    if obj.get("framework") != FRAMEWORK:
        raise DeepPoseError(f"{path} is a {obj.get('framework')} model, not a PyTorch one:"
                            " convert it with `deeppose convert`")
    if not isinstance(obj.get("params"), dict) or not all(
            k in obj for k in ("num_joints", "input_size", "width")):
        raise DeepPoseError(f"model file {path} is truncated or corrupt (missing fields)")
    return obj


def _params_of(obj: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    params = {}
    for name, value in obj["params"].items():
        if not isinstance(value, torch.Tensor):
            raise DeepPoseError(f"model file {path} is truncated or corrupt ({name!r})")
        params[name] = value.detach().cpu().float().numpy().astype(np.float32, copy=True)
    check_parameters(params, parameter_shapes(**architecture(obj)))
    return params


def read_params(model_path: Path) -> dict[str, np.ndarray]:
    """The canonical ``{"conv1/W": array, ...}`` float32 parameters of a ``.pt`` model file."""
    return _params_of(_load_model_file(Path(model_path)), Path(model_path))


def load_model(model_path: Path, meta: dict, device: str = "cpu") -> AlexNetRegressor:
    """The network of a model file on ``device``, in eval mode. ``meta`` is the run's
    ``run.json``; the file must agree with it."""
    torch_device = resolve_device(device)
    obj = _load_model_file(Path(model_path))
    in_file = architecture(obj)
    in_run = architecture({**obj, **meta})  # run.json's values where it has them
    for key in ARCHITECTURE_KEYS:
        if in_file[key] != in_run[key]:
            raise DeepPoseError(f"{model_path} has {key} {in_file[key]}, but its run.json says"
                                f" {in_run[key]}")
    model = AlexNetRegressor(**in_file)
    load_numpy_params(model, _params_of(obj, Path(model_path)))
    return model.to(torch_device).eval()


def load_predictor(model_path: Path, meta: dict, device: str = "cpu") -> TorchPredictor:
    """A predictor from a model file (see :func:`load_model`)."""
    return TorchPredictor(load_model(model_path, meta, device), resolve_device(device))


def devices() -> str:
    """What `deeppose info` lists for this framework."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                  for i in range(torch.cuda.device_count())]
    return ", ".join(found)


def check_device(device: str) -> None:
    """Fail with a one-line error before a run directory is touched if ``device`` is unusable."""
    resolve_device(device)


Engine = TorchEngine
