"""Training and model files of the DeepPose regressor in Chainer.

Training is a plain Chainer ``Trainer`` (laid out like Chainer's
``examples/imagenet/train_imagenet.py``): an iterator, a ``StandardUpdater`` subclass for the
pose loss, and extensions for validation and snapshots. Progress bars, the JSONL log and the
NaN guard come from :class:`deeppose_cli.training.TrainingReporter`, so both frameworks write
identical run directories.

A model file is an ``.npz`` holding the parameters under Chainer's own names (``conv1/W``,
..., ``fc8/b``, as ``chainer.serializers.save_npz`` writes them) and a few small metadata
arrays, so it stays loadable with plain NumPy.
"""

from __future__ import annotations

import functools
import math
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DeepPoseError
from ..files import atomic_write
from ..losses import predicts_uncertainty, split_prediction
from ..pipeline import RunBatches, RunSampler
from ..schedules import schedule_from_config
from ..config import TrainConfig, apply_init_parameters, parse_device
from ..reporting import IterationPlan, TrainingReporter, validation_metrics
from ..rundir import RunDirectory
from ..weights import (ARCHITECTURE_KEYS, PARAMETER_NAMES, SCALE_NAMES, architecture,
                       check_parameters, parameter_names, parameter_shapes)
from . import framework_of_model_file
from .chainer_compat import import_chainer

chainer = import_chainer()
from chainer import backend  # noqa: E402
from chainer.backends import cuda  # noqa: E402
from chainer.training import extensions  # noqa: E402

from .chainer_model import (AlexNetRegressor, load_numpy_params, pose_loss,  # noqa: E402
                            pose_loss_explicit, to_numpy_params)

MODEL_FORMAT = "deeppose-model"
FRAMEWORK = "chainer"
META_KEYS = ("num_joints", "input_size", "width")  # required; batch_norm defaults to False
PREDICT_BATCH = 64


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


def _predictor(model: AlexNetRegressor, device,
               batch_size: int = PREDICT_BATCH) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW NumPy images -> (N, J, 2) float64 normalized joints, in test mode
    (no dropout, no graph), ``batch_size`` images at a time so large inputs fit in memory."""
    cpu = backend.CpuDevice()

    def predict(images: np.ndarray, with_scales: bool = False) -> Any:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise DeepPoseError(f"expected images of shape (N, 3, H, W), got {images.shape}")
        outputs = []
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            for start in range(0, len(images), batch_size):
                x = device.send(np.ascontiguousarray(images[start:start + batch_size],
                                                     dtype=model.input_dtype))
                outputs.append(np.asarray(cpu.send(model(x, with_scales=with_scales).array),
                                          dtype=np.float64))
        pred = np.concatenate(outputs) if outputs else np.zeros((0, 2 * model.num_joints))
        return split_prediction(pred, model.num_joints, (len(images),), with_scales)

    predict.has_scales = model.uncertainty
    return predict


def crop_predictor(model: AlexNetRegressor, device, batch_size: int = PREDICT_BATCH
                   ) -> Callable[[Sequence[np.ndarray], np.ndarray, bool], np.ndarray]:
    """(images HxWx3 uint8 RGB, boxes (N, K, 4), flip) -> (N, K, J, 2) normalized predictions,
    with every crop cut on ``device`` by ``F.spatial_transformer_sampler`` (bilinear, zeros
    outside the image, -1 and 1 at the centres of the first and last pixels): the geometry of
    ``geometry.crop_matrix``, as ``torch_backend.crop_predictor`` does it in PyTorch."""
    from ..geometry import crop_sampling_grid
    from ..pipeline import input_scale_bias

    xp = device.xp
    scale, bias = (device.send(a.reshape(1, 3, 1, 1)) for a in input_scale_bias())
    size = model.input_size
    cpu = backend.CpuDevice()

    def regress(images: Sequence[np.ndarray], boxes: np.ndarray, flip: bool = False,
                with_scales: bool = False) -> Any:
        boxes = np.asarray(boxes, dtype=np.float64)
        outputs = []
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            crops = []
            for image, image_boxes in zip(images, boxes):
                height, width = image.shape[:2]
                k = len(image_boxes)
                pixels = device.send(np.ascontiguousarray(image))  # uint8 travels, not floats
                pixels = xp.ascontiguousarray(pixels.transpose(2, 0, 1)[None].astype(np.float32))
                gx, gy = (device.send(a) for a in
                          crop_sampling_grid(image_boxes, width, height, size, flip))
                grid = xp.stack(xp.broadcast_arrays(gx[:, None, :], gy[:, :, None]), axis=1)
                source = xp.ascontiguousarray(xp.broadcast_to(pixels, (k,) + pixels.shape[1:]))
                crops.append(chainer.functions.spatial_transformer_sampler(
                    source, xp.ascontiguousarray(grid)).array)
            if crops:
                x = (xp.concatenate(crops) * scale + bias).astype(model.input_dtype)
                for start in range(0, len(x), batch_size):
                    out = model(x[start:start + batch_size], with_scales=with_scales)
                    outputs.append(np.asarray(cpu.send(out.array), dtype=np.float64))
        pred = np.concatenate(outputs) if outputs else np.zeros((0, 2 * model.num_joints))
        return split_prediction(pred, model.num_joints, boxes.shape[:2], with_scales)

    regress.has_scales = model.uncertainty
    return regress


# ----------------------------------------------------------------------------- training


def train_step(model: AlexNetRegressor, loss_fn: Callable, optimizer: "chainer.Optimizer",
               images, joints, visible, use_visibility: bool):
    """One optimizer step; returns the loss array, still on the device: reading it would make
    the host wait for the device every step, so the updater reads its losses in batches
    (``TrainingReporter.must_read_loss``). The benchmark times this same function.

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


class RunIterator(chainer.dataset.Iterator):
    """The batches of a :class:`~deeppose_cli.pipeline.RunSampler` as stacked
    ``(images, joints, visible)`` arrays, drawn and collated by ``workers`` processes of one
    ``MultiprocessIterator`` that lives for the whole run (shared memory carries the
    batches), or in this process with ``workers=0``.

    The position is the updater's iteration (``start``), not state of its own, so a resumed
    run continues with exactly the batches an uninterrupted one saw, and the keys carry their
    epoch, so prefetching across an epoch boundary cannot mix up the augmentation draws.
    """

    def __init__(self, dataset, sampler_for: Callable[[int], RunSampler], workers: int,
                 iterations_per_epoch: int, prefetch: int = 2):
        self.dataset = dataset
        self.sampler_for = sampler_for
        self.workers = int(workers)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.prefetch = prefetch
        self.iteration = 0
        self._batches: RunBatches | None = None
        self._source = None
        self._position = 0

    def start(self, iteration: int) -> None:
        """Serve the batches after ``iteration`` (0 for a fresh run)."""
        self.finalize()
        self.iteration = int(iteration)
        self._batches = RunBatches(self.dataset, self.sampler_for(self.iteration))
        self._position = 0
        if self.workers > 0:
            self._source = chainer.iterators.MultiprocessIterator(
                self._batches, 1, repeat=False, shuffle=False, n_processes=self.workers,
                n_prefetch=self.prefetch)

    def __next__(self) -> tuple:
        if self._batches is None:
            self.start(self.iteration)
        if self._source is not None:
            (batch,) = self._source.next()
        elif self._position < len(self._batches):
            batch = self._batches[self._position]
            self._position += 1
        else:
            raise StopIteration
        self.iteration += 1
        return batch

    next = __next__

    @property
    def epoch(self) -> int:
        return self.iteration // self.iterations_per_epoch

    @property
    def epoch_detail(self) -> float:
        return self.iteration / self.iterations_per_epoch

    @property
    def previous_epoch_detail(self) -> float:
        return max(0, self.iteration - 1) / self.iterations_per_epoch

    @property
    def is_new_epoch(self) -> bool:
        return self.iteration > 0 and self.iteration % self.iterations_per_epoch == 0

    def serialize(self, serializer) -> None:
        """Nothing to save: the updater's iteration is the position."""

    def finalize(self) -> None:
        if self._source is not None:
            self._source.finalize()
            self._source = None


class PoseUpdater(chainer.training.updaters.StandardUpdater):
    """One optimizer step per batch, with the loss checked before the weights change.

    Losses stay on the device and go to the :class:`TrainingReporter` at its read points,
    which come before every snapshot and validation: a NaN/inf loss raises there, so the last
    snapshot on disk never sees it.
    """

    def __init__(self, iterator, optimizer, device, reporter: TrainingReporter,
                 loss_fn: Callable, use_visibility: bool):
        super().__init__(iterator, optimizer, input_device=device)
        self.reporter = reporter
        self._pending: list = []
        self.loss_fn = loss_fn
        self.use_visibility = use_visibility
        self.train_seconds = 0.0
        self.train_images = 0

    def update_core(self) -> None:
        start = time.perf_counter()
        iterator = self.get_iterator("main")
        optimizer = self.get_optimizer("main")
        model = optimizer.target
        if iterator.iteration != self.iteration:  # a fresh or restored run: start there
            iterator.start(self.iteration)
        images, joints, visible = (self.input_device.send(a) for a in iterator.next())
        self._pending.append(train_step(model, self.loss_fn, optimizer, images, joints, visible,
                                        self.use_visibility))
        if self.reporter.must_read_loss(self.iteration + 1):
            xp = backend.get_array_module(self._pending[0])
            values = backend.CpuDevice().send(xp.stack(self._pending)).tolist()
            self._pending.clear()
            self.reporter.losses(self.iteration + 1, values)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)
        self.train_seconds += time.perf_counter() - start
        self.train_images += len(images)

    def serialize(self, serializer) -> None:
        """Also save NumPy's global generator: dropout masks draw from it, so restoring it
        lets a resumed CPU run repeat an uninterrupted one."""
        super().serialize(serializer)
        name, keys, pos, has_gauss, cached = np.random.get_state()
        keys = np.array(keys, dtype=np.uint32)
        s = serializer["numpy_random"]
        s("keys", keys)  # loaded in place when deserializing
        pos = s("pos", int(pos))
        has_gauss = s("has_gauss", int(has_gauss))
        cached = s("cached_gaussian", float(cached))
        if isinstance(serializer, chainer.serializer.Deserializer):
            np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))


class StopAt:
    """Stop trigger: iteration >= ``total``.

    Unlike ``IntervalTrigger((total, 'iteration'))``, whose restored state makes it fire only
    at multiples of ``total``, this holds no state, so a resumed run stops at the *current*
    recipe's total whatever budget the snapshot was taken under.
    """

    def __init__(self, total: int):
        self.total = int(total)

    def __call__(self, trainer) -> bool:
        return trainer.updater.iteration >= self.total

    def get_training_length(self) -> tuple[int, str]:
        return self.total, "iteration"


class EveryOrAt:
    """Extension trigger: every ``period`` iterations and at iteration ``last`` (the end)."""

    def __init__(self, period: int, last: int):
        self.period, self.last = int(period), int(last)

    def __call__(self, trainer) -> bool:
        iteration = trainer.updater.iteration
        return iteration % self.period == 0 or iteration == self.last


class Validation(chainer.training.Extension):
    """Validation loss (and PDJ@0.2) through the shared ``training.validate``, in test mode."""

    priority = chainer.training.PRIORITY_WRITER

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], dataset, batch_size: int,
                 torso_pair: Sequence[int] | None, reporter: TrainingReporter):
        self.predict = predict
        self.dataset = dataset
        self.batch_size = batch_size
        self.torso_pair = torso_pair
        self.reporter = reporter
        self.last: dict[str, float] = {}

    def __call__(self, trainer) -> None:
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            metrics = validation_metrics(self.predict, self.dataset, self.batch_size, self.torso_pair)
        self.reporter.validation(trainer.updater.iteration, metrics)
        self.last = metrics


class LearningRateSchedule(chainer.training.Extension):
    """Sets the optimizer's step size from the framework-free schedule before every update.

    Called after each update (and once when training starts or resumes) with the *next*
    iteration's value, so the step of iteration i uses ``schedule(i)`` exactly as in PyTorch.
    Adam's step size is ``alpha`` in Chainer, MomentumSGD's ``lr``.
    """

    trigger = 1, "iteration"
    priority = chainer.training.PRIORITY_WRITER + 1  # before the validation and snapshot

    def __init__(self, schedule: Callable[[int], float]):
        self.schedule = schedule

    def _apply(self, trainer) -> None:
        optimizer = trainer.updater.get_optimizer("main")
        value = self.schedule(trainer.updater.iteration + 1)
        setattr(optimizer, "alpha" if isinstance(optimizer, chainer.optimizers.Adam) else "lr",
                value)

    def initialize(self, trainer) -> None:
        self._apply(trainer)

    def __call__(self, trainer) -> None:
        self._apply(trainer)


def make_optimizer(config: TrainConfig, model: "chainer.Link") -> "chainer.Optimizer":
    """The recipe's optimizer set up on ``model``, with its weight decay as a hook."""
    if config.optimizer == "Adam":
        optimizer = chainer.optimizers.Adam(alpha=config.lr)
    else:
        optimizer = chainer.optimizers.MomentumSGD(lr=config.lr, momentum=config.momentum)
    optimizer.setup(model)
    if config.precision == "fp16":
        optimizer.use_fp32_update()  # fp32 master weights behind the float16 parameters
        optimizer.loss_scaling()     # dynamic: halves on overflow, grows while finite
    if config.weight_decay > 0:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(config.weight_decay))
    return optimizer


def make_iterator(config: TrainConfig, dataset, plan: IterationPlan) -> RunIterator:
    """The run's batches (``pipeline.RunSampler``, the sampler PyTorch uses too), loaded by
    ``config.workers`` processes started once for the run."""
    return RunIterator(dataset, functools.partial(plan.sampler, len(dataset), config.batch_size,
                                                  config.seed),
                       config.workers, plan.iterations_per_epoch)


def _load_snapshot(path: Path, trainer) -> None:
    """Restore a training snapshot without ever unpickling: ``chainer.serializers.load_npz``
    opens files with ``allow_pickle=True``, so an object array in a shared run directory
    would run code. Snapshots hold only numeric arrays; one that needs pickle is refused."""
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            chainer.serializers.NpzDeserializer(npz).load(trainer)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DeepPoseError(f"cannot resume from {path}: it holds Python objects (pickled "
                                "data), which are never loaded from a file") from None
        raise DeepPoseError(f"cannot resume from {path}: not a checkpoint of this recipe or "
                            f"corrupt ({str(e).splitlines()[0] if str(e) else 'ValueError'})"
                            ) from None
    except (KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile,
            zlib.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeepPoseError(f"cannot resume from {path}: not a checkpoint of this recipe or "
                            f"corrupt ({reason})") from None


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


def train(config: TrainConfig, train_set, val_set, run: RunDirectory, *,
          torso_pair: Sequence[int] | None, resume: bool = False,
          show_progress: bool = True,
          init_params: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train an ``AlexNetRegressor`` on samples ``(image CHW, joints (J, 2), visible (J,))``.

    Writes snapshots to ``run.checkpoint_path`` and the final model to ``run.model_path``;
    returns ``{"iterations", "final_loss", "images_per_second", "val"}``.
    """
    device = get_device(config.device)
    np.random.seed(config.seed)  # chainer's initializers, dropout and shuffling use it
    num_joints = train_set.num_joints
    model = build_model(config, num_joints, init_params)
    model.to_device(device)
    optimizer = make_optimizer(config, model)

    plan = IterationPlan.make(len(train_set), config.batch_size, config.epochs,
                              config.max_iterations)
    loss_fn = functools.partial(pose_loss_explicit if config.explicit_backward else pose_loss,
                                norm=config.loss)
    schedule = schedule_from_config(config, plan.total_iterations)
    with TrainingReporter(run, plan, config.batch_size, show_progress=show_progress,
                          schedule=schedule, checkpoint_every=config.checkpoint_every) as reporter:
        iterator = make_iterator(config, train_set, plan)
        updater = PoseUpdater(iterator, optimizer, device, reporter, loss_fn,
                              config.use_visibility)
        trainer = chainer.training.Trainer(updater, StopAt(plan.total_iterations),
                                           out=str(run.path))
        trainer.extend(LearningRateSchedule(schedule), name="lr_schedule")
        validation = None
        if val_set is not None and len(val_set) > 0:
            validation = Validation(_predictor(model, device), val_set, config.batch_size,
                                    torso_pair, reporter)
            trainer.extend(validation, name="validation",
                           trigger=lambda t: plan.validates_at(t.updater.iteration,
                                                               config.val_every))
        # Chainer writes snapshots to a temporary directory beside the target, then moves
        # them into place: an interrupted save leaves the previous checkpoint intact.
        # Uncompressed: trained weights barely compress, and zlib would triple the save time.
        # (SimpleWriter drops its keyword arguments, hence the partial.)
        writer = extensions.snapshot_writers.SimpleWriter(
            savefun=functools.partial(chainer.serializers.save_npz, compression=False))
        trainer.extend(extensions.snapshot(filename=run.checkpoint_path.name, writer=writer),
                       name="snapshot",
                       trigger=EveryOrAt(config.checkpoint_every, plan.total_iterations))
        try:
            if resume:
                _load_snapshot(run.checkpoint_path, trainer)
                run.truncate_log(updater.iteration)
            reporter.start(updater.iteration)
            trainer.run(show_loop_exception_msg=False)
        finally:
            iterator.finalize()  # stops MultiprocessIterator's workers on every path

    meta = {"num_joints": num_joints, "input_size": config.input_size, "width": config.width,
            "batch_norm": config.batch_norm, "uncertainty": predicts_uncertainty(config.loss)}
    params = to_numpy_params(model)
    atomic_write(run.model_path, lambda tmp: write_model(params, meta, tmp))
    seconds = updater.train_seconds
    return {
        "iterations": int(updater.iteration),
        "images_per_second": updater.train_images / seconds if seconds > 0 else math.nan,
        "val": dict(validation.last) if validation is not None else {},
    }


# ----------------------------------------------------------------------------- model files


def write_model(params: dict[str, np.ndarray], meta: dict, path: Path) -> None:
    """Write ``params`` (canonical names) and the architecture of ``meta`` as a model .npz.

    Checked against the architecture first, so a model file always loads into the network
    its metadata describes.
    """
    spec = _architecture(meta, Path(path))
    check_parameters(params, parameter_shapes(**spec))
    arrays = {name: np.asarray(params[name], dtype=np.float32)
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


def load_regressor(model_path: Path, meta: dict,
                   device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 NCHW images to (N, J, 2) float64 normalized predictions.

    ``meta`` (a run.json) gives the architecture; the file's own metadata fills any gap.
    """
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
    predict = _predictor(model, chainer_device)
    if chainer_device.xp is not np:  # cascade.run_cascade cuts this stage's crops on the GPU
        predict.regress_crops = crop_predictor(model, chainer_device)
    return predict


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
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError):
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
