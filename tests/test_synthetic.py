"""The synthetic LSPET stand-in: layout, determinism and whether its labels are sensible."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeppose_cli.data.synthetic import JOINT_NAMES, generate_dataset, render_sample

cv2 = pytest.importorskip("cv2")
sio = pytest.importorskip("scipy.io")

N = 100


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("synth") / "nested" / "synthetic"  # does not exist yet
    generate_dataset(target, num_images=N, seed=0, image_size=160)
    return target


@pytest.fixture(scope="module")
def joints(dataset: Path) -> np.ndarray:
    return sio.loadmat(str(dataset / "joints.mat"))["joints"]


@pytest.fixture(scope="module")
def images(dataset: Path) -> list[np.ndarray]:
    return [cv2.imread(str(dataset / "images" / f"im{i:05d}.jpg")) for i in range(1, N + 1)]


def test_layout_and_shapes(dataset: Path, joints: np.ndarray, images: list[np.ndarray]) -> None:
    names = sorted(p.name for p in (dataset / "images").iterdir())
    assert names == [f"im{i:05d}.jpg" for i in range(1, N + 1)]
    assert joints.shape == (14, 3, N)
    assert joints.dtype == np.float64
    assert set(np.unique(joints[:, 2, :])) <= {0.0, 1.0}
    for img in images:
        assert img is not None and img.ndim == 3 and img.shape[2] == 3
        assert 140 <= img.shape[0] <= 180 and 140 <= img.shape[1] <= 180
    assert not np.allclose(images[0][..., 0], images[0][..., 2])  # colour, not grey
    readme = (dataset / "README.txt").read_text()
    assert "seed=0" in readme and "num_images=100" in readme
    assert all(name in readme for name in JOINT_NAMES)


def test_deterministic(tmp_path: Path, dataset: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, num_images=N, seed=0, image_size=160)
    assert (again / "joints.mat").read_bytes() == (dataset / "joints.mat").read_bytes()
    for i in range(1, N + 1):
        name = f"images/im{i:05d}.jpg"
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name


def test_prefix_does_not_depend_on_count(tmp_path: Path, dataset: Path, joints: np.ndarray) -> None:
    small = tmp_path / "small"
    generate_dataset(small, num_images=5, seed=0, image_size=160)
    np.testing.assert_array_equal(sio.loadmat(str(small / "joints.mat"))["joints"],
                                  joints[:, :, :5])
    assert (small / "images/im00005.jpg").read_bytes() == \
        (dataset / "images/im00005.jpg").read_bytes()


def test_different_seed_differs(joints: np.ndarray) -> None:
    other = np.stack([render_sample(1, i, 160)[1] for i in range(5)], axis=-1)
    assert not np.allclose(other, joints[:, :, :5])
    img0, _ = render_sample(0, 0, 160)
    img1, _ = render_sample(1, 0, 160)
    assert img0.shape != img1.shape or not np.array_equal(img0, img1)


def test_render_sample_matches_files(joints: np.ndarray) -> None:
    _, sample = render_sample(0, 3, 160)
    np.testing.assert_array_equal(sample, joints[:, :, 3])


def test_visible_joints_inside_image(joints: np.ndarray, images: list[np.ndarray]) -> None:
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        vis = joints[:, 2, i] == 1
        x, y = joints[vis, 0, i], joints[vis, 1, i]
        assert np.all((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)), i
    assert np.isfinite(joints).all()  # invisible joints keep real coordinates


def test_some_but_few_invisible(joints: np.ndarray) -> None:
    invisible = 1.0 - joints[:, 2, :].mean()
    assert 0.01 <= invisible <= 0.15
    per_image = (joints[:, 2, :] == 0).any(axis=0).mean()
    assert 0.08 <= per_image <= 0.4


def test_mostly_front_facing(joints: np.ndarray) -> None:
    # The person's right on the image's left: right hip (2) at smaller x than left hip (3).
    assert (joints[2, 0] < joints[3, 0]).mean() >= 0.75
    assert (joints[8, 0] < joints[9, 0]).mean() >= 0.75
    # Head above the ankles in (nearly) every image.
    assert (joints[13, 1] < joints[[0, 5], 1].min(axis=0)).mean() >= 0.95


def test_pose_variety(joints: np.ndarray) -> None:
    xy = joints[:, :2, :].transpose(2, 0, 1)                  # N x 14 x 2
    centred = xy - xy.mean(axis=1, keepdims=True)
    scale = np.sqrt((centred ** 2).sum(axis=(1, 2)) / 14)[:, None, None]
    normalised = centred / scale
    assert normalised.std(axis=0).mean() > 0.2
    # Wrists (6, 11) move the most: arms raised and lowered.
    assert normalised[:, [6, 11], 1].std() > 0.4
    # Scale and position vary too.
    assert scale.std() / scale.mean() > 0.1
    assert xy[:, 12, 0].std() > 8 and xy[:, 12, 1].std() > 5


def test_figure_drawn_at_visible_joints(joints: np.ndarray, images: list[np.ndarray]) -> None:
    diffs = []
    for i, img in enumerate(images):
        mean = img.reshape(-1, 3).astype(float).mean(axis=0)
        for x, y, v in joints[:, :, i]:
            if not v:
                continue
            xi, yi = int(round(x)), int(round(y))
            patch = img[max(yi - 1, 0):yi + 2, max(xi - 1, 0):xi + 2].reshape(-1, 3).astype(float)
            diffs.append(np.abs(patch.mean(axis=0) - mean).max())
    diffs = np.array(diffs)
    assert (diffs > 20).mean() >= 0.95


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", num_images=0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "y", num_images=1, image_size=8)


def test_module_import_does_not_need_cv2() -> None:
    import subprocess
    import sys

    code = ("import sys; import deeppose_cli.data.synthetic; "
            "sys.exit(1 if 'cv2' in sys.modules or 'scipy' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
