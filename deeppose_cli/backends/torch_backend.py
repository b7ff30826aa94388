"""PyTorch backend: the training loop, checkpoints and model files of one cascade stage.

Everything framework-free (run directory, log, NaN guard, validation metrics) comes from
``deeppose_cli.training``; this module adds the model, optimizer, data loader and the
``.pt`` formats. The loop is stage-agnostic: any dataset whose samples are
``(image CHW, joints (J, 2), visible (J,))`` trains the same way.

Two file formats, both loadable with ``torch.load(..., weights_only=True)``:

* checkpoint (``checkpoint.pt``): ``{"format": "deeppose-checkpoint", "framework": "pytorch",
  "model", "optimizer", "iteration", "torch_rng_state", "config"}``, rewritten atomically
  every ``checkpoint_every`` iterations so ``--resume`` continues exactly where it stopped;
* model (``model.pt``): ``{"format": "deeppose-model", "framework": "pytorch", "num_joints",
  "input_size", "width", "batch_norm", "uncertainty", "params": {"conv1/W": tensor, ...}}``, the canonical parameter
  names of ``deeppose_cli.weights`` so ``deeppose convert`` can move it to Chainer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DeepPoseError
from ..files import atomic_write
from ..losses import predicts_uncertainty, split_prediction
from ..schedules import LearningRateSchedule, schedule_from_config
from ..config import TrainConfig, apply_init_parameters, parse_device
from ..reporting import IterationPlan, TrainingReporter, validation_metrics
from ..rundir import RunDirectory
from ..weights import ARCHITECTURE_KEYS, architecture, check_parameters, parameter_shapes
from . import framework_of_model_file
from .torch_model import (AlexNetRegressor, load_numpy_params, pose_loss, pose_loss_explicit,
                          to_numpy_params)

CHECKPOINT_FORMAT = "deeppose-checkpoint"
MODEL_FORMAT = "deeppose-model"
FRAMEWORK = "pytorch"
PREDICT_BATCH = 64

LOADER_PREFETCH = 2  # batches each worker keeps ready (as the Chainer iterator)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


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


def collate(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ``(image, joints, visible)`` samples into float32 tensors (module level so
    worker processes can pickle it)."""
    images, joints, visible = zip(*samples)
    return tuple(torch.from_numpy(np.stack(a).astype(np.float32, copy=False))
                 for a in (images, joints, visible))


def make_loader(dataset, config: TrainConfig, device: torch.device, plan: IterationPlan,
                first_iteration: int = 0) -> DataLoader:
    """One loader for the rest of the run: the batches of iterations ``first_iteration + 1``
    to ``plan.total_iterations`` (a resumed run has done the others), keyed by
    ``(epoch, index)`` so every sample is the one an uninterrupted run draws.

    Spanning the run, it starts its worker processes once; they keep loading ahead while the
    main process validates or saves. It gets its own generator so creating it never draws
    from the global torch RNG: that RNG drives dropout and must advance identically in
    resumed and uninterrupted runs.
    """
    sampler = plan.sampler(len(dataset), config.batch_size, config.seed, first_iteration)
    workers = config.workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda",
                      prefetch_factor=LOADER_PREFETCH if workers else None,
                      generator=torch.Generator().manual_seed(config.seed))


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
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: RunDirectory, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    iteration: int, config: TrainConfig,
                    precision: StepPrecision | None = None) -> None:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "framework": FRAMEWORK,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": int(iteration),
        "torch_rng_state": torch.get_rng_state(),
        "config": config.to_json(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()
    if precision is not None and precision.scaler is not None:
        checkpoint["grad_scaler"] = precision.scaler.state_dict()
    atomic_write(run.checkpoint_path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(run: RunDirectory, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, config: TrainConfig,
                    precision: StepPrecision | None = None) -> int:
    """Restore model, optimizer and RNG state from the run's checkpoint; returns its iteration."""
    path = run.checkpoint_path
    checkpoint = _torch_load(path, "checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DeepPoseError(f"{path} is not a deeppose training checkpoint")
    if checkpoint.get("framework") != FRAMEWORK:
        raise DeepPoseError(f"{path} is a {checkpoint.get('framework')} checkpoint; "
                            f"resume it with --framework {checkpoint.get('framework')}")
    # Checkpoints from before batch norm had none.
    saved = {"batch_norm": False, **(checkpoint.get("config") or {})}
    for key in ("input_size", "width", "batch_norm"):
        if key in saved and saved[key] != getattr(config, key):
            raise DeepPoseError(f"{path} was trained with {key} {saved[key]}, but this run "
                                f"has {key} {getattr(config, key)}: resume with the same recipe")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepPoseError(f"{path} does not match this model: {first_line}") from None
    if precision is not None and precision.scaler is not None and "grad_scaler" in checkpoint:
        precision.scaler.load_state_dict(checkpoint["grad_scaler"])
    torch.set_rng_state(checkpoint["torch_rng_state"])
    if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
        states = checkpoint["cuda_rng_state"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return int(checkpoint["iteration"])


# ----------------------------------------------------------------------------- train / evaluate


def predictor(model: AlexNetRegressor, device: torch.device
              ) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW numpy -> (N, J, 2) float64 normalized predictions, in eval mode."""

    def predict(images: np.ndarray, with_scales: bool = False) -> Any:
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(images), PREDICT_BATCH):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + PREDICT_BATCH],
                                                          dtype=np.float32))
                out.append(model(x.to(device), with_scales=with_scales).cpu().numpy())
        model.train(was_training)
        pred = np.concatenate(out) if out else np.zeros((0, 2 * model.num_joints), np.float32)
        return split_prediction(pred, model.num_joints, (len(pred),), with_scales)

    predict.has_scales = model.uncertainty
    return predict


def crop_predictor(model: AlexNetRegressor, device: torch.device
                   ) -> Callable[[Sequence[np.ndarray], np.ndarray, bool], np.ndarray]:
    """(images HxWx3 uint8 RGB, boxes (N, K, 4), flip) -> (N, K, J, 2) normalized predictions,
    with every crop cut on ``device`` by bilinear grid sampling: each image goes to the
    device once instead of K crops going there.

    The geometry is ``geometry.crop_matrix``'s (pixel centres at integers, black outside the
    image, ``flip`` mirrors the crop), then ``pipeline.to_network_input``'s normalization;
    the only difference from the OpenCV path is that OpenCV rounds its crops to uint8.
    """
    import torch.nn.functional as F

    from ..geometry import crop_sampling_grid
    from ..pipeline import input_scale_bias

    scale, bias = (torch.from_numpy(a).to(device).view(1, 3, 1, 1) for a in input_scale_bias())
    size = model.input_size

    def regress(images: Sequence[np.ndarray], boxes: np.ndarray, flip: bool = False,
                with_scales: bool = False) -> Any:
        boxes = np.asarray(boxes, dtype=np.float64)
        was_training = model.training
        model.eval()
        crops = []
        with torch.no_grad():
            for image, image_boxes in zip(images, boxes):
                height, width = image.shape[:2]
                pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device)
                pixels = pixels.permute(2, 0, 1)[None].float()
                gx, gy = (torch.from_numpy(a).to(device) for a in
                          crop_sampling_grid(image_boxes, width, height, size, flip))
                k = len(image_boxes)
                grid = torch.stack((gx[:, None, :].expand(k, size, size),
                                    gy[:, :, None].expand(k, size, size)), dim=-1)
                crops.append(F.grid_sample(pixels.expand(k, -1, -1, -1), grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=True))
            x = torch.cat(crops) * scale + bias if crops else torch.zeros(0, 3, size, size)
            out = [model(x[s:s + PREDICT_BATCH], with_scales=with_scales)
                   for s in range(0, len(x), PREDICT_BATCH)]
            pred = torch.cat(out).cpu().numpy() if out else np.zeros((0, 2 * model.num_joints))
        model.train(was_training)
        return split_prediction(pred, model.num_joints, boxes.shape[:2], with_scales)

    regress.has_scales = model.uncertainty
    return regress


def device_batches(loader: DataLoader, device: torch.device,
                   precision: StepPrecision | None = None):
    """The loader's batches moved to ``device`` (asynchronously from pinned memory on CUDA)."""
    for x, joints, visible in loader:
        x = x.to(device, non_blocking=True)
        yield (precision.input(x) if precision else x, joints.to(device, non_blocking=True),
               visible.to(device, non_blocking=True))


def train_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor,
               use_visibility: bool, precision: StepPrecision | None = None) -> torch.Tensor:
    """One optimizer step; returns the loss, detached and still on the device: reading it
    would make the host wait for the device every step, so the loop reads its losses in
    batches (``TrainingReporter.must_read_loss``). The benchmark times this same function."""
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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the framework-free schedule's value for the coming step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_one_epoch(model: AlexNetRegressor, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    batches, config: TrainConfig, reporter: TrainingReporter, run: RunDirectory,
                    first_iteration: int, last_iteration: int, schedule: LearningRateSchedule,
                    precision: StepPrecision) -> tuple[int, int]:
    """Train on the next batches of the run's loader, iterations ``first_iteration + 1`` to
    ``last_iteration``; returns (iteration, images).

    Losses are read at the reporter's read points, which include every checkpoint: a NaN
    stops training before any file sees the weights it reached.
    """
    model.train()
    iteration, images, pending = first_iteration, 0, []
    for x, joints, visible in itertools.islice(batches, last_iteration - first_iteration):
        iteration += 1
        set_learning_rate(optimizer, schedule(iteration))
        pending.append(train_step(model, loss_fn, optimizer, x, joints, visible,
                                  config.use_visibility, precision))
        images += len(x)
        if reporter.must_read_loss(iteration):
            reporter.losses(iteration, torch.stack(pending).tolist())
            pending.clear()
        if iteration % config.checkpoint_every == 0:
            save_checkpoint(run, model, optimizer, iteration, config, precision)
    return iteration, images


def build_model(config: TrainConfig, num_joints: int,
                init_params: dict[str, np.ndarray] | None = None) -> AlexNetRegressor:
    """The stage's network, freshly initialized or with ``init_params`` (``--init``)."""
    model = AlexNetRegressor(num_joints, config.input_size, config.width, config.batch_norm,
                             config.dropout, predicts_uncertainty(config.loss))
    apply_init_parameters(load_numpy_params, model, config, init_params)
    return model


def train(config: TrainConfig, train_set, val_set, run: RunDirectory, *,
          torso_pair, resume: bool = False, show_progress: bool = True,
          init_params: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train one stage and write ``run.model_path``; returns a summary of the run.

    With a fixed seed on CPU, a run interrupted at any iteration and resumed ends with exactly
    the weights of an uninterrupted one, with or without loader workers: the sample order
    depends only on (seed, epoch), augmentation on (seed, epoch, index) and dropout on the
    torch RNG state saved in the checkpoint.
    """
    device = resolve_device(config.device)
    if len(train_set) == 0:
        raise DeepPoseError("the training set is empty")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
    torch.manual_seed(config.seed)
    precision = StepPrecision(config.precision, device)
    model = precision.prepare(build_model(config, train_set.num_joints, init_params).to(device))
    optimizer = build_optimizer(config, model)
    loss_fn = functools.partial(pose_loss_explicit if config.explicit_backward else pose_loss,
                                norm=config.loss)
    plan = IterationPlan.make(len(train_set), config.batch_size, config.epochs,
                              config.max_iterations)
    schedule = schedule_from_config(config, plan.total_iterations)

    iteration = 0
    if resume:
        iteration = load_checkpoint(run, model, optimizer, config, precision)
        if iteration > plan.total_iterations:
            raise DeepPoseError(f"{run.checkpoint_path} is at iteration {iteration}, beyond this"
                                f" run's {plan.total_iterations} iterations")
        run.truncate_log(iteration)

    metrics: dict[str, float] = {}
    train_seconds, train_images = 0.0, 0
    with TrainingReporter(run, plan, config.batch_size, show_progress=show_progress,
                          schedule=schedule, checkpoint_every=config.checkpoint_every) as reporter:
        reporter.start(iteration)
        loader = make_loader(train_set, config, device, plan, iteration)
        with contextlib.closing(device_batches(loader, device, precision)) as batches:
            while iteration < plan.total_iterations:
                epoch = plan.epoch_of(iteration + 1)
                last = min((epoch + 1) * plan.iterations_per_epoch, plan.total_iterations)
                start = time.perf_counter()
                iteration, images = train_one_epoch(model, loss_fn, optimizer, batches, config,
                                                    reporter, run, iteration, last, schedule,
                                                    precision)
                train_seconds += time.perf_counter() - start
                train_images += images
                if images == 0:  # RunSampler yields every planned batch; never spin
                    raise DeepPoseError("the data loader ended before the run did")
                if val_set is not None and plan.validates_at(iteration, config.val_every):
                    metrics = validation_metrics(predictor(model, device), val_set,
                                                 config.batch_size, torso_pair)
                    reporter.validation(iteration, metrics)
        if val_set is not None and not metrics:  # resumed at the end: still report the model
            metrics = validation_metrics(predictor(model, device), val_set, config.batch_size,
                                         torso_pair)
            reporter.validation(iteration, metrics)
    save_checkpoint(run, model, optimizer, iteration, config, precision)
    write_model(to_numpy_params(model), model_meta(model), run.model_path)

    return {
        "iterations": iteration,
        "images_per_second": train_images / train_seconds if train_seconds > 0 else float("nan"),
        "val": metrics,
    }


# ----------------------------------------------------------------------------- model files


def model_meta(model: AlexNetRegressor) -> dict[str, Any]:
    return {"num_joints": model.num_joints, "input_size": model.input_size, "width": model.width,
            "batch_norm": model.batch_norm, "uncertainty": model.uncertainty}


def write_model(params: dict[str, np.ndarray], meta: dict, path: Path) -> None:
    """Save canonical parameters as a ``.pt`` model file (atomically)."""
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
        "params": {name: torch.from_numpy(np.array(params[name], dtype=np.float32))
                   for name in shapes},
    }
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


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
        return torch.load(path, map_location="cpu", weights_only=True)
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
        params[name] = value.detach().cpu().numpy().astype(np.float32, copy=True)
    check_parameters(params, parameter_shapes(**architecture(obj)))
    return params


def read_params(model_path: Path) -> dict[str, np.ndarray]:
    """The canonical ``{"conv1/W": array, ...}`` float32 parameters of a ``.pt`` model file."""
    return _params_of(_load_model_file(Path(model_path)), Path(model_path))


def load_regressor(model_path: Path, meta: dict, device: str = "cpu"
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """A predictor from a model file: float32 NCHW images -> (N, J, 2) float64 normalized
    joints. ``meta`` is the run's ``run.json``; the file must agree with it."""
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
    model = model.to(torch_device).eval()
    predict = predictor(model, torch_device)
    if torch_device.type == "cuda":  # cascade.run_cascade cuts this stage's crops there
        predict.regress_crops = crop_predictor(model, torch_device)
    return predict


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
