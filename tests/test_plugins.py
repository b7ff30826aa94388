"""Extending deeppose without touching its code: a dataset that is only a manifest."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.core.manifests import _REPO_ROOT

from conftest import assert_no_escaped_exception, write_lsp_like

MANIFEST = """
name = "mini"
title = "A dataset known only by this manifest"
format = "lspet"

[archive]
filename = "mini.zip"
urls = []
annotations = "joints.mat"
image_template = "images/im{:05d}.jpg"
num_images = 24

[splits]
rule = "random"
val_fraction = 0.25
seed = 0

[joints]
include = "skeletons/lsp14.toml"
"""


def test_a_manifest_only_dataset_fetches_indexes_trains_and_evaluates(tmp_path, monkeypatch):
    manifests = tmp_path / "manifests"
    (manifests / "skeletons").mkdir(parents=True)
    (manifests / "mini.toml").write_text(MANIFEST)
    shutil.copy(_REPO_ROOT / "datasets" / "skeletons" / "lsp14.toml", manifests / "skeletons")
    source = write_lsp_like(tmp_path / "source", "lspet", 24)
    archive = tmp_path / "mini.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(source))
    monkeypatch.setenv("DEEPPOSE_MANIFESTS", str(manifests))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "mini"
    result = CliRunner().invoke(main, [
        "fetch", "mini", "--root", str(tmp_path / "data"), "--archive", str(archive),
        "index", "mini",
        "train-stage", "1", "--framework", "pytorch", "--out", str(run), "--input-size", "67",
        "--width", "0.125", "--batch-size", "4", "--max-iterations", "2", "--quiet",
        "evaluate"])
    assert result.exit_code == 0, result.output
    assert_no_escaped_exception(result)
    assert json.loads((run / "run.json").read_text())["dataset"] == "mini"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["mean pose", "stage 1"]
    assert metrics["images"] == 6 and metrics["images_per_second"] > 0
    assert metrics["images_per_second"] == pytest.approx(6 / metrics["seconds"], rel=0.01)
    assert "images/s through the cascade" in result.output
    assert len((tmp_path / "data" / "mini" / "index" / "val.jsonl").read_text().splitlines()) == 6


def test_an_unknown_dataset_lists_the_manifests_found(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPPOSE_MANIFESTS", str(tmp_path))
    (tmp_path / "extra.toml").write_text(MANIFEST.replace('"mini"', '"extra"'))
    result = CliRunner().invoke(main, ["fetch", "nope"])
    assert result.exit_code == 2
    for name in ("extra", "lsp", "lspet", "synthetic"):
        assert name in result.output
