"""The pretrained cascade shipped in the package (docs/model-card.md): its files, that it
loads in both frameworks, and that it still predicts what it predicted when it was packed."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.training.runs import DEFAULT_MODEL, PACKAGED_MODELS, packaged_models

from conftest import LSPET_MINI, needs_lspet_mini

MODEL = PACKAGED_MODELS / DEFAULT_MODEL
MAX_PACKAGE_BYTES = 16 * 2**20

# The image and what the shipped cascade predicted on it when it was packed
# (examples/pretrained.sh; the whole image as the person box, the default flip test):
# written by `python tests/test_pretrained.py` from the model in the package.
FIXED_IMAGE = "images/im00001.jpg"
JOINTS_FILE = Path(__file__).parent / "data" / "lspet-small-joints.json"


def stage_dirs(run: Path) -> list[Path]:
    meta = json.loads((run / "run.json").read_text())
    return [run / entry["dir"] for entry in meta.get("chain", [])] + [run]


def predict_fixed_image(model: Path, image_path: Path) -> np.ndarray:
    """The cascade's final joints (14, 2) on ``image_path``, whole image as the box."""
    from deeppose_cli.core.cascade import run_cascade, with_flip_test
    from deeppose_cli.core.images import read_rgb
    from deeppose_cli.core.manifests import run_manifest
    from deeppose_cli.training.runs import load_cascade

    cascade, meta = load_cascade(model, "cpu")
    manifest = run_manifest(meta)
    cascade = with_flip_test(cascade, manifest.flip_permutation, None, "scales")
    rgb = read_rgb(image_path)
    h, w = rgb.shape[:2]
    box = np.array([[(w - 1) / 2.0, (h - 1) / 2.0, float(max(w, h)), float(max(w, h))]])
    return run_cascade(cascade, [rgb], box, manifest.torso_diameter)[-1][0]


def fixed_image(tmp_path: Path) -> Path:
    with zipfile.ZipFile(LSPET_MINI) as archive:
        target = tmp_path / Path(FIXED_IMAGE).name
        target.write_bytes(archive.read(FIXED_IMAGE))
    return target


def test_the_package_ships_lspet_small_with_its_records():
    assert DEFAULT_MODEL in packaged_models()
    stages = stage_dirs(MODEL)
    assert len(stages) >= 2
    for stage in stages:
        for name in ("run.json", "recipe.json", "log.jsonl", "model.pt"):
            assert (stage / name).is_file(), stage / name
        recipe = json.loads((stage / "recipe.json").read_text())
        assert (recipe["input_size"], recipe["width"], recipe["seed"]) == (131, 0.25, 0)
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= MAX_PACKAGE_BYTES


def test_the_shipped_weights_are_the_trained_float32_ones_and_verified():
    """float32, as trained: float16 moved some val joints by more than 0.5 pixel."""
    import torch

    from deeppose_cli.training.runs import load_cascade

    for stage in stage_dirs(MODEL):
        state = torch.load(stage / "model.pt", weights_only=True, map_location="cpu")
        floats = [t for t in state["params"].values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float32 for t in floats)
    cascade, meta = load_cascade(MODEL, "cpu")  # checks every model file's sha256
    assert len(cascade) == len(stage_dirs(MODEL)) and meta["dataset"] == "lspet"


def test_the_package_carries_no_path_of_the_machine_that_trained_it():
    for path in MODEL.rglob("*.json"):
        text = path.read_text()
        assert '"/' not in text and ':\\\\' not in text, path


def test_it_loads_in_chainer_through_convert(tmp_path):
    from deeppose_cli.apps.convert import convert_run
    from deeppose_cli.training.runs import load_cascade

    converted = convert_run(MODEL, "chainer", tmp_path / "chainer")
    cascade, meta = load_cascade(converted, "cpu")
    assert meta["framework"] == "chainer" and len(cascade) == len(stage_dirs(MODEL))


@needs_lspet_mini
def test_it_predicts_the_packed_joints_in_both_frameworks(tmp_path):
    from deeppose_cli.apps.convert import convert_run

    expected = np.array(json.loads(JOINTS_FILE.read_text())["joints"])
    image = fixed_image(tmp_path)
    torch_joints = predict_fixed_image(MODEL, image)
    np.testing.assert_allclose(torch_joints, expected, atol=0.05)
    chainer_joints = predict_fixed_image(convert_run(MODEL, "chainer", tmp_path / "ch"), image)
    np.testing.assert_allclose(chainer_joints, expected, atol=0.05)


def test_predict_without_a_run_uses_it_and_says_so(tmp_path, monkeypatch):
    import cv2

    monkeypatch.chdir(tmp_path)
    cv2.imwrite("photo.jpg", np.full((200, 120, 3), 127, np.uint8))
    result = CliRunner().invoke(main, ["predict", "photo.jpg"])
    assert result.exit_code == 0, result.output
    assert f"using the pretrained {DEFAULT_MODEL} cascade" in result.output
    named = CliRunner().invoke(main, ["predict", "photo.jpg", "--model", DEFAULT_MODEL])
    assert named.exit_code == 0, named.output
    assert "using the pretrained" not in named.output


def test_convert_and_export_name_it_and_write_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    converted = CliRunner().invoke(main, ["convert", DEFAULT_MODEL, "--to", "chainer"])
    assert converted.exit_code == 0, converted.output
    assert (tmp_path / "runs" / f"{DEFAULT_MODEL}-chainer" / "run.json").is_file()
    exported = CliRunner().invoke(main, ["export", str(MODEL), "--format", "torchscript"])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "runs" / f"{DEFAULT_MODEL}-torchscript" / "cascade.json").is_file()
    assert not list(MODEL.parent.glob(f"{DEFAULT_MODEL}-*"))  # nothing in the package


def test_evaluate_on_it_writes_beside_the_runs_not_into_the_package(tmp_path, monkeypatch):
    from deeppose_cli.training.runs import packaged_eval_dir

    assert packaged_eval_dir(MODEL, tmp_path / "runs") == tmp_path / "runs" / f"{DEFAULT_MODEL}-eval"
    assert packaged_eval_dir(tmp_path / "some-run") is None


if __name__ == "__main__":  # regenerate the stored joints from the shipped model
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        joints = predict_fixed_image(MODEL, fixed_image(Path(tmp)))
    JOINTS_FILE.parent.mkdir(exist_ok=True)
    JOINTS_FILE.write_text(json.dumps({"image": FIXED_IMAGE, "box": "whole image",
                                       "joints": np.round(joints, 4).tolist()}, indent=1) + "\n")
    print(f"wrote {JOINTS_FILE}")
