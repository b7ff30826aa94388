"""Shared fixtures: small LSP/LSPET-format datasets made on the fly, and the shared real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LSPET_MINI = SHARED_DATA / "lspet_mini.zip"
LSPET_DEV = SHARED_DATA / "lspet_dataset_dev.zip"

needs_lspet_mini = pytest.mark.skipif(
    not LSPET_MINI.is_file(),
    reason=f"real LSPET sample not available ({LSPET_MINI} missing; it sits beside the clone in CI)")


def random_pose(rng: np.random.Generator, size: int) -> np.ndarray:
    """A loosely human 14-joint pose (LSP order) inside a ``size`` square image, front-facing."""
    cx, top = size / 2 + rng.uniform(-5, 5), size * 0.15
    h = size * 0.7
    x = np.array([-0.1, -0.1, -0.08, 0.08, 0.1, 0.1, -0.3, -0.22, -0.12, 0.12, 0.22, 0.3, 0, 0])
    y = np.array([1.0, 0.78, 0.55, 0.55, 0.78, 1.0, 0.5, 0.38, 0.2, 0.2, 0.38, 0.5, 0.15, 0.0])
    joints = np.stack([cx + x * h, top + y * h], axis=1)
    return joints + rng.normal(0, 2, joints.shape)


def write_lsp_like(root: Path, fmt: str, n: int, seed: int = 0, size: int = 64,
                   corrupt: tuple[int, ...] = (), invisible: tuple[int, ...] = ()) -> Path:
    """Write an LSP- ('lsp', 3x14xN, 0 = visible) or LSPET-format ('lspet', 14x3xN, 1 = visible)
    dataset with ``n`` images; images numbered in ``corrupt`` hold garbage bytes and images in
    ``invisible`` have only two visible joints."""
    import cv2
    import scipy.io

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    digits = 4 if fmt == "lsp" else 5
    poses, flags = [], []
    for i in range(1, n + 1):
        joints = random_pose(rng, size)
        vis = np.ones(14, dtype=bool)
        vis[5] = i % 3 != 0
        if i in invisible:
            vis[2:] = False
        path = root / "images" / f"im{i:0{digits}d}.jpg"
        if i in corrupt:
            path.write_bytes(b"not a jpeg")
        else:
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            cv2.imwrite(str(path), image)
        poses.append(joints + 1.0)  # 1-based, as MATLAB stores them
        flags.append(vis)
    poses, flags = np.array(poses), np.array(flags)
    if fmt == "lsp":
        arr = np.concatenate([poses, (~flags)[..., None].astype(float)], axis=2).transpose(2, 1, 0)
    else:
        arr = np.concatenate([poses, flags[..., None].astype(float)], axis=2).transpose(1, 2, 0)
    scipy.io.savemat(str(root / "joints.mat"), {"joints": arr})
    (root / "README.txt").write_text("test dataset\n")
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """The synthetic dataset (the manifest's 600 images), fetched and indexed once per session.

    Returns ``(root, index_dir)``; index files: train.jsonl (480) and val.jsonl (120).
    """
    from deeppose_cli.data.annotations import build_index
    from deeppose_cli.data.fetch import fetch_dataset
    from deeppose_cli.core.manifests import load_dataset_manifest

    root = tmp_path_factory.mktemp("data")
    manifest = load_dataset_manifest("synthetic")
    result = fetch_dataset(manifest, root, progress=False)
    report = build_index(manifest, result.dataset_dir)
    return root, report.index_dir


# The training tests were calibrated with the first recipes (constant learning rate, light
# augmentation, L2 loss, the paper's network and refinement); they pin those so a change of
# the stage recipes' defaults does not change what they measure.
CALIBRATED = dict(lr_schedule="constant", lr_warmup=0, jitter_translation=0.05,
                  jitter_scale=0.1, colour_noise=0.1, flip=True, rotation=0.0, occlusion=0.0,
                  outside_joints="keep", jitter_off_fraction=0.0, loss="l2", batch_norm=False, dropout=0.5, init=None,
                  displacement_sampling="normal", refine_joints="own")


def tiny_config(framework: str, index_dir: Path, out: Path, **overrides):
    """A stage-1 TrainConfig small enough to train in seconds on two CPU cores."""
    from deeppose_cli.core.manifests import load_stage_recipe
    from deeppose_cli.core.config import TrainConfig

    recipe = load_stage_recipe(1)
    recipe.update(input_size=67, width=0.25, batch_size=16, epochs=1, optimizer="Adam",
                  lr=1e-3, checkpoint_every=10, **CALIBRATED)
    recipe.update(overrides)
    return TrainConfig.from_recipe(recipe, framework=framework, dataset="synthetic",
                                   train_index=str(index_dir / "train.jsonl"),
                                   val_index=str(index_dir / "val.jsonl"), out=str(out))


def subset_index(index_dir: Path, out: Path, n_train: int, n_val: int) -> Path:
    """The first records of the fixture's index files, with absolute image paths."""
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("val.jsonl", n_val)):
        lines = (index_dir / name).read_text().splitlines()[:n]
        records = [json.loads(line) for line in lines]
        for r in records:
            r["image"] = str((index_dir / r["image"]).resolve())
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def assert_no_escaped_exception(result) -> None:
    """A CliRunner result whose command ended through click (an exit code), not through an
    exception escaping it: CliRunner keeps such an exception in ``result.exception`` and never
    prints its traceback, so looking for "Traceback" in the output cannot fail."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)


def _openblas_threads():
    """NumPy's bundled OpenBLAS (get, set) functions, or None where it is not found."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas*.so"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", "_64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get and set_:
                return get, set_
    return None


@pytest.fixture(scope="session", autouse=True)
def one_compute_thread():
    """Every test computes on one thread: torch intra-op and NumPy's OpenBLAS (Chainer's CPU
    convolutions). On a small shared machine a second thread mostly spins against the other
    processes (one thread trained the calibration runs up to 10x faster under load), and the
    calibrated training results then do not depend on how many cores the machine has."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = _openblas_threads()
    blas_before = blas[0]() if blas else None
    if blas:
        blas[1](1)
    yield
    torch.set_num_threads(before)
    if blas:
        blas[1](blas_before)


class FunctionPredictor:
    """A :class:`~deeppose_cli.core.predictor.Predictor` from functions of the network
    inputs: ``coords`` -> (N, J, 2), and optionally ``scales`` -> (N, J, 2) log scales (the
    framework-free cascade's tests)."""

    def __init__(self, coords, input_size: int = 67, num_joints: int = 14, scales=None):
        self.coords, self.scales = coords, scales
        self.input_size, self.num_joints = input_size, num_joints
        self.has_scales = scales is not None
        self.cuts_crops = False

    def __call__(self, images):
        from deeppose_cli.core.predictor import Prediction

        return Prediction(np.asarray(self.coords(images), dtype=np.float64),
                          None if self.scales is None
                          else np.asarray(self.scales(images), dtype=np.float64))
