"""The one training loop, driven by each framework's engine: the same tiny run in both,
interrupted after every checkpoint and resumed bit-identically, an empty training set and a
checkpoint past the plan refused, a run resumed at its end still validated."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import subset_index, tiny_config
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.engines import get_engine
from deeppose_cli.training.rundir import RunDirectory
from deeppose_cli.training.stages import train_stage1

FRAMEWORKS = ("pytorch", "chainer")
# 16 training images in batches of 4: 4 iterations per epoch; 3 epochs, a checkpoint every 3
# iterations (so some fall mid-epoch), a cosine schedule with warm-up (the lr of every step
# depends on the plan), dropout (the random state must be restored too).
RUN = dict(input_size=67, width=0.0625, batch_size=4, epochs=3, checkpoint_every=3,
           lr_schedule="cosine", lr_warmup=2, dropout=0.5)


@pytest.fixture(scope="module")
def small_index(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    return subset_index(index_dir, tmp_path_factory.mktemp("loop"), 16, 8)


def params(framework: str, run_dir) -> dict[str, np.ndarray]:
    return get_engine(framework).read_params(RunDirectory(run_dir).model_path)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_after_every_checkpoint_is_bit_identical(framework, small_index, tmp_path,
                                                        monkeypatch):
    train_stage1(tiny_config(framework, small_index, tmp_path / "full", **RUN),
                 show_progress=False)
    expected = params(framework, tmp_path / "full")
    engine_class = get_engine(framework).Engine
    real_save = engine_class.save_checkpoint
    for stop in (3, 6, 9):
        def save_then_stop(self, path, iteration, stop=stop):
            real_save(self, path, iteration)
            if iteration == stop:
                raise KeyboardInterrupt

        out = tmp_path / f"stopped{stop}"
        monkeypatch.setattr(engine_class, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_stage1(tiny_config(framework, small_index, out, **RUN), show_progress=False)
        monkeypatch.setattr(engine_class, "save_checkpoint", real_save)
        _, summary = train_stage1(tiny_config(framework, small_index, out, **RUN), resume=True,
                                  show_progress=False)
        assert summary["iterations"] == 12
        got = params(framework, out)
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in expected), stop
        logged = [r["iteration"] for r in RunDirectory(out).read_log() if "loss" in r]
        assert logged == sorted(set(logged))  # redone iterations are not logged twice


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_loop_refuses_an_empty_set_and_a_checkpoint_past_the_plan(framework, small_index,
                                                                       tmp_path):
    from deeppose_cli.data.pipeline import PoseDataset
    from deeppose_cli.training.loop import train

    config = tiny_config(framework, small_index, tmp_path / "empty", **RUN)
    empty = PoseDataset([], 67, list(range(14)))
    with pytest.raises(DeepPoseError, match="the training set is empty"):
        train(config, empty, None, RunDirectory(tmp_path / "empty", framework),
              torso_pair=(9, 2), show_progress=False)

    out = tmp_path / "run"
    train_stage1(tiny_config(framework, small_index, out, **RUN), show_progress=False)
    shorter = tiny_config(framework, small_index, out, max_iterations=8, **RUN)
    with pytest.raises(DeepPoseError, match="at iteration 12, beyond this run's 8 iterations"):
        train_stage1(shorter, resume=True, show_progress=False)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_run_resumed_at_its_end_is_still_validated(framework, small_index, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(framework, small_index, out, **RUN)
    train_stage1(config, show_progress=False)
    validations = [r for r in RunDirectory(out).read_log() if "val_loss" in r]
    _, summary = train_stage1(config, resume=True, show_progress=False)
    assert summary["iterations"] == 12 and set(summary["val"]) >= {"loss", "pdj@0.2"}
    after = [r for r in RunDirectory(out).read_log() if "val_loss" in r]
    assert after[-1]["iteration"] == 12
    assert after[-1]["val_loss"] == pytest.approx(validations[-1]["val_loss"])
    assert dataclasses.asdict(config)["framework"] == framework
