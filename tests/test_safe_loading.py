"""Files a user is handed are data, never code: no .npz read path unpickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeppose_cli.core.errors import DeepPoseError

from conftest import tiny_config


class WritesMarker:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def poison(npz_path: Path, marker: Path, key: str) -> None:
    """Rewrite ``npz_path`` with the array ``key`` (one that loading reads) replaced by a
    pickled object array."""
    with np.load(npz_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert key in arrays
    arrays[key] = np.array([WritesMarker(marker)], dtype=object)
    with open(npz_path, "wb") as f:
        np.savez(f, **arrays)


def test_resume_from_a_checkpoint_holding_pickles_refuses_without_running_it(
        synthetic_dataset, tmp_path):
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    config = tiny_config("chainer", index_dir, tmp_path / "run", input_size=67, width=0.0625,
                         max_iterations=2, checkpoint_every=1, epochs=2)
    run, _ = train_stage1(config, show_progress=False)
    marker = tmp_path / "code-ran"
    poison(run.checkpoint_path, marker, "updater/iteration")
    longer = tiny_config("chainer", index_dir, tmp_path / "run", input_size=67, width=0.0625,
                         max_iterations=4, checkpoint_every=1, epochs=2)
    with pytest.raises(DeepPoseError, match="holds Python objects"):
        train_stage1(longer, resume=True, show_progress=False)
    assert not marker.exists()


def test_model_files_holding_pickles_are_refused_everywhere(synthetic_dataset, tmp_path):
    """predict/evaluate/convert/--previous/--init all read models through these two."""
    from deeppose_cli.engines import chainer_engine
    from deeppose_cli.training.runs import initial_parameters
    from deeppose_cli.training.stages import train_stage1

    _, index_dir = synthetic_dataset
    config = tiny_config("chainer", index_dir, tmp_path / "run", input_size=67, width=0.0625,
                         max_iterations=1)
    run, _ = train_stage1(config, show_progress=False)
    marker = tmp_path / "code-ran"
    poison(run.model_path, marker, "conv1/W")
    meta = run.meta()
    with pytest.raises(DeepPoseError):
        chainer_engine.load_predictor(run.model_path, meta)
    with pytest.raises(DeepPoseError):
        chainer_engine.read_params(run.model_path)
    with pytest.raises(DeepPoseError):
        initial_parameters(run.model_path)
    assert not marker.exists()
