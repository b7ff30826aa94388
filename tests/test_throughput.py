"""What keeps an accelerator busy, checked on CPU: one loader (and one set of worker
processes) per run with unchanged determinism, losses read from the device in batches, and
reduced-precision training steps that still learn."""

from __future__ import annotations

import multiprocessing.process

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.engines import get_engine
from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.data.pipeline import RunSampler, epoch_order
from deeppose_cli.training.reporting import IterationPlan, TrainingReporter
from deeppose_cli.training.rundir import RunDirectory
from deeppose_cli.training.stages import train_stage1

from conftest import subset_index, tiny_config

FRAMEWORKS = ("pytorch", "chainer")
SMALL = dict(input_size=67, width=0.125, batch_size=16, checkpoint_every=4)


@pytest.fixture(scope="module")
def small_index(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    return subset_index(index_dir, tmp_path_factory.mktemp("small"), 64, 16)


def config_for(framework, index_dir, out, **overrides):
    return tiny_config(framework, index_dir, out, **{**SMALL, **overrides})


def params_of(framework: str, run_dir) -> dict[str, np.ndarray]:
    return get_engine(framework).read_params(RunDirectory(run_dir).model_path)


# ----------------------------------------------------------------------------- sampler


def test_run_sampler_walks_the_epoch_orders_and_resumes_anywhere():
    sampler = RunSampler(10, 4, seed=3, iterations_per_epoch=3, total_iterations=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7
    for epoch in range(3):
        order = epoch_order(10, 3, epoch)
        expected = [order[0:4], order[4:8], order[8:10]][: 7 - 3 * epoch]
        got = batches[3 * epoch: 3 * epoch + 3]
        assert [[i for _, i in b] for b in got] == [list(e) for e in expected]
        assert all(e == epoch for b in got for e, _ in b)
    for first in range(8):
        resumed = RunSampler(10, 4, 3, 3, 7, first_iteration=first)
        assert list(resumed) == batches[first:]


# ----------------------------------------------------------------------------- workers


@pytest.fixture
def process_starts(monkeypatch):
    """How many processes this test starts (loader workers start through Process.start)."""
    started = []
    real_start = multiprocessing.process.BaseProcess.start

    def counting_start(self):
        started.append(self.name)
        return real_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counting_start)
    return started


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_loader_workers_start_once_per_run(framework, small_index, tmp_path, process_starts):
    # 3 epochs of 4 iterations, each ending with a validation: a loader per epoch started 6
    config = config_for(framework, small_index, tmp_path / "run", epochs=3, workers=2)
    _run, summary = train_stage1(config, show_progress=False)
    assert summary["iterations"] == 12
    assert len(process_starts) == 2


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_workers_and_resume_leave_the_weights_bit_identical(framework, small_index, tmp_path):
    """Samples depend on (seed, epoch, index) only: loading them in worker processes, or
    resuming mid-epoch between checkpoints with workers, gives the very same weights."""
    settings = dict(epochs=3, checkpoint_every=4, dropout=0.5)
    train_stage1(config_for(framework, small_index, tmp_path / "serial", workers=0, **settings),
                 show_progress=False)
    train_stage1(config_for(framework, small_index, tmp_path / "full", workers=2, **settings),
                 show_progress=False)
    part = config_for(framework, small_index, tmp_path / "part", workers=2, max_iterations=6,
                      **settings)
    train_stage1(part, show_progress=False)
    _, summary = train_stage1(config_for(framework, small_index, tmp_path / "part", workers=2,
                                         **settings), resume=True, show_progress=False)
    assert summary["iterations"] == 12
    serial = params_of(framework, tmp_path / "serial")
    for name in ("full", "part"):
        other = params_of(framework, tmp_path / name)
        assert serial.keys() == other.keys()
        assert all(np.array_equal(serial[k], other[k]) for k in serial), name


# ----------------------------------------------------------------------------- loss reads


def test_loss_read_points():
    plan = IterationPlan(iterations_per_epoch=16, total_iterations=40)
    reporter = TrainingReporter(None, plan, 4, log_every=10, checkpoint_every=25)
    due = [i for i in range(1, 41) if reporter.must_read_loss(i)]
    assert due == [10, 16, 20, 25, 30, 32, 40]  # logs, epoch ends, a checkpoint, the end


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_losses_are_read_in_batches_not_every_step(framework, small_index, tmp_path,
                                                   monkeypatch):
    reads: list[tuple[int, int]] = []
    real_losses = TrainingReporter.losses

    def spy(self, iteration, values):
        reads.append((iteration, len(values)))
        return real_losses(self, iteration, values)

    monkeypatch.setattr(TrainingReporter, "losses", spy)
    # 64 images in batches of 4: 16 iterations per epoch; logs every 10
    config = config_for(framework, small_index, tmp_path / "run", batch_size=4, epochs=2,
                        checkpoint_every=500)
    train_stage1(config, show_progress=False)
    assert reads == [(10, 10), (16, 6), (20, 4), (30, 10), (32, 2)]
    logged = [r["iteration"] for r in RunDirectory(tmp_path / "run").read_log() if "loss" in r]
    assert logged == [10, 20, 30, 32]


# ----------------------------------------------------------------------------- precision


@pytest.mark.slow
def test_bf16_steps_learn_like_fp32(synthetic_dataset, tmp_path):
    """A short run in bfloat16 autocast ends within noise of the same run in fp32."""
    from test_train_torch import LEARNING

    _, index_dir = synthetic_dataset
    pdj = {}
    for precision in ("fp32", "bf16"):
        config = tiny_config("pytorch", index_dir, tmp_path / precision, precision=precision,
                             **LEARNING)
        _run, summary = train_stage1(config, show_progress=False)
        pdj[precision] = summary["val"]["pdj@0.2"]
    assert pdj["fp32"] > 0.4  # off the mean pose's plateau (~0.31 PDJ@0.2 on this set)
    assert abs(pdj["bf16"] - pdj["fp32"]) < 0.05, pdj


def test_fp16_keeps_its_loss_scale_across_a_resume(small_index, tmp_path):
    import torch

    settings = dict(input_size=67, width=0.0625, batch_size=8, precision="fp16", epochs=1,
                    checkpoint_every=2)
    config = config_for("pytorch", small_index, tmp_path / "run", max_iterations=2, **settings)
    train_stage1(config, show_progress=False)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["precision"] == "fp16"
    assert checkpoint["grad_scaler"]["scale"] > 0
    _, summary = train_stage1(config_for("pytorch", small_index, tmp_path / "run",
                                         max_iterations=4, **settings),
                              resume=True, show_progress=False)
    assert summary["iterations"] == 4 and np.isfinite(summary["final_loss"])


def test_chainer_fp16_trains_in_mixed16_and_writes_a_float32_model(small_index, tmp_path):
    from deeppose_cli.engines import chainer_engine as cb

    config = config_for("chainer", small_index, tmp_path / "run", width=0.0625, batch_size=8,
                        precision="fp16", max_iterations=3)
    assert cb.build_model(config, 14).input_dtype == np.float16
    _run, summary = train_stage1(config, show_progress=False)
    assert np.isfinite(summary["final_loss"])
    params = params_of("chainer", tmp_path / "run")
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in params.values())


def test_chainer_refuses_bf16_in_one_line(small_index, tmp_path):
    from deeppose_cli.engines import check_precision

    with pytest.raises(DeepPoseError, match="chainer has no bf16"):
        check_precision("chainer", "bf16")
    result = CliRunner().invoke(main, ["train-stage", "1", "--framework", "chainer",
                                       "--precision", "bf16", "--train",
                                       str(small_index / "train.jsonl"),
                                       "--out", str(tmp_path / "cli")])
    assert result.exit_code != 0 and result.exception is None or \
        isinstance(result.exception, SystemExit)
    assert "chainer has no bf16" in result.output
    assert not (tmp_path / "cli").exists()


# ----------------------------------------------------------------------------- device crops


def regressor_pair(framework: str, seed: int):
    """(predictor, device-side crop predictor) on CPU of one random network whose outputs
    depend on the pixels by a few box sides (the same weights in both frameworks)."""
    import torch

    from deeppose_cli.engines import torch_engine as tb
    from deeppose_cli.engines.torch_model import AlexNetRegressor, to_numpy_params

    torch.manual_seed(seed)
    model = AlexNetRegressor(14, 67, 0.125, batch_norm=True).eval()
    torch.nn.init.normal_(model.fc8.weight, std=0.2)
    if framework == "pytorch":
        cpu = torch.device("cpu")
        return (tb.TorchPredictor(model, cpu, cuts_crops=False),
                tb.TorchPredictor(model, cpu, cuts_crops=True))
    from deeppose_cli.engines import chainer_engine as cb
    from deeppose_cli.engines.chainer_model import AlexNetRegressor as ChainerRegressor
    from deeppose_cli.engines.chainer_model import load_numpy_params

    converted = ChainerRegressor(14, 67, 0.125, batch_norm=True)
    load_numpy_params(converted, to_numpy_params(model))
    device = cb.get_device("cpu")
    return (cb.ChainerPredictor(converted, device, cuts_crops=False),
            cb.ChainerPredictor(converted, device, cuts_crops=True))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_crops_cut_by_grid_sampling_match_the_opencv_crops(framework):
    """The GPU path (crops cut where the model runs) on CPU against the OpenCV path, through
    a 2-stage cascade with and without test-time flipping, on boxes reaching outside the
    image: the only difference is OpenCV rounding its crops to uint8."""
    from deeppose_cli.core.cascade import StageModel, flip_averaged, run_cascade
    from deeppose_cli.core.geometry import crop_and_resize
    from deeppose_cli.core.images import to_network_input

    pairs = [regressor_pair(framework, seed) for seed in (0, 1)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90 + 13 * n, 120 - 9 * n, 3), dtype=np.uint8)
              for n in range(4)]
    boxes = np.array([[50.0 + 9 * n, 45.0, 80.0 + 10 * n, 80.0 + 10 * n] for n in range(4)])
    perm = load_flip_permutation()

    def stages(device_crops: bool, flip: bool):
        out = []
        for k, (host, cutting) in enumerate(pairs):
            stage = StageModel(k + 1, framework, cutting if device_crops else host,
                               None if k == 0 else 1.0)
            out.append(flip_averaged(stage, perm) if flip else stage)
        return out

    for flip in (False, True):
        opencv = run_cascade(stages(False, flip), images, boxes, (9, 2))
        grid = run_cascade(stages(True, flip), images, boxes, (9, 2))
        for a, b in zip(opencv, grid):
            np.testing.assert_allclose(a, b, atol=0.1)  # pixels; boxes half a pixel off give 1.1
        assert np.abs(opencv[1] - opencv[0]).max() > 2  # refinement moved joints: teeth
    # one crop, directly: within OpenCV's uint8 rounding of the normalized input
    host, cutting = pairs[0]
    direct = host(to_network_input(crop_and_resize(images[0], boxes[0], 67))[None]).coords
    np.testing.assert_allclose(cutting.crops(images[:1], boxes[:1, None], False).coords[:, 0],
                               direct, atol=1e-2)


def load_flip_permutation():
    from deeppose_cli.core.manifests import load_dataset_manifest

    return load_dataset_manifest("lsp").flip_permutation
