import json
import zipfile

import numpy as np
import pytest

from deeppose_cli.data.annotations import build_index, read_index, read_joints_mat
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.manifests import load_dataset_manifest
from conftest import LSPET_MINI, needs_lspet_mini, write_lsp_like


@pytest.mark.parametrize("fmt", ["lsp", "lspet"])
def test_joints_mat_conventions(tmp_path, fmt):
    """LSP stores 0 = visible, LSPET 1 = visible; both come out as True = visible, 0-based."""
    write_lsp_like(tmp_path, fmt, n=6)
    joints, visible = read_joints_mat(tmp_path / "joints.mat", fmt)
    assert joints.shape == (6, 14, 2) and visible.shape == (6, 14)
    # write_lsp_like hides joint 5 (left ankle) in every third image
    assert visible[:, 5].tolist() == [True, True, False, True, True, False]
    assert visible[:, :5].all()


def test_joints_mat_wrong_layout_is_a_clear_error(tmp_path):
    write_lsp_like(tmp_path, "lspet", n=3)
    with pytest.raises(DeepPoseError, match="expected LSP joints 3 x J x N"):
        read_joints_mat(tmp_path / "joints.mat", "lsp")


def test_lsp_index_uses_fixed_ranges(tmp_path, monkeypatch):
    import dataclasses

    manifest = load_dataset_manifest("lsp")
    manifest = dataclasses.replace(manifest, splits={"rule": "ranges", "train": [1, 6],
                                                     "test": [7, 10]})
    write_lsp_like(tmp_path / "lsp", "lsp", n=10)
    report = build_index(manifest, tmp_path / "lsp")
    assert report.counts == {"train": 6, "val": 0, "test": 4}
    test = read_index(report.index_dir / "test.jsonl")
    assert [r.id for r in test] == ["im0007", "im0008", "im0009", "im0010"]
    assert not (report.index_dir / "val.jsonl").exists()


def test_lspet_index_skips_bad_records_and_splits_with_seed(tmp_path):
    manifest = load_dataset_manifest("lspet")
    write_lsp_like(tmp_path / "lspet", "lspet", n=30, corrupt=(3,), invisible=(4, 5))
    (tmp_path / "lspet" / "images" / "im00006.jpg").unlink()
    report = build_index(manifest, tmp_path / "lspet", val_fraction=0.25, seed=1)
    assert report.counts["train"] + report.counts["val"] == 26
    assert report.counts["val"] == 6  # round(0.25 * 26)
    reasons = report.skipped_reasons
    assert reasons == {"not an image OpenCV can read": 1, "missing image": 1,
                       "fewer than 4 visible joints": 2}
    skipped = [json.loads(l) for l in (report.index_dir / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == {"im00003", "im00004", "im00005", "im00006"}
    again = build_index(manifest, tmp_path / "lspet", val_fraction=0.25, seed=1)
    first_val = (report.index_dir / "val.jsonl").read_text()
    assert again.counts == report.counts and (again.index_dir / "val.jsonl").read_text() == first_val
    other = build_index(manifest, tmp_path / "lspet", val_fraction=0.25, seed=2)
    assert (other.index_dir / "val.jsonl").read_text() != first_val


def test_index_records_round_trip(tmp_path):
    manifest = load_dataset_manifest("lspet")
    write_lsp_like(tmp_path / "d", "lspet", n=4)
    report = build_index(manifest, tmp_path / "d", val_fraction=0.0)
    records = read_index(report.index_dir / "train.jsonl")
    joints, visible = read_joints_mat(tmp_path / "d" / "joints.mat", "lspet")
    np.testing.assert_allclose(records[0].joints, joints[0], atol=1e-3)
    assert records[0].image.is_file()
    line = json.loads((report.index_dir / "train.jsonl").read_text().splitlines()[0])
    assert line["image"] == "../images/im00001.jpg"
    assert set(line) == {"id", "image", "width", "height", "joints", "visible", "box"}
    assert line["width"] == 64 and line["height"] == 64


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"image": "a.jpg"}', "missing key 'joints'"),
    ('{"image": "a.jpg", "joints": [[1, 2, 3]]}', "joints must be"),
    ('[1, 2]', "must be a JSON object"),
    ('{"image": "a.jpg", "joints": [[1, 2]], "box": [0, 0, 0, 5]}', "box width"),
])
def test_read_index_reports_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    (tmp_path / "a.jpg").write_bytes(b"")
    path.write_text('{"image": "a.jpg", "joints": [[1, 2]], "visible": [1]}\n' + line + "\n")
    with pytest.raises(DeepPoseError, match=rf"bad.jsonl:2: .*{message}"):
        read_index(path)


def test_user_index_without_box_gets_a_person_box(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"image": "/abs/x.jpg", "joints": [[0, 0], [10, 20]]}) + "\n")
    (record,) = read_index(path, check_images=False)
    assert str(record.image) == "/abs/x.jpg"
    assert record.box[2] == record.box[3] > 20


@needs_lspet_mini
def test_real_lspet_mini(tmp_path):
    """The first 200 LSPET images: all readable, 87% of joints visible, none skipped."""
    with zipfile.ZipFile(LSPET_MINI) as z:
        z.extractall(tmp_path / "lspet")
    joints, visible = read_joints_mat(tmp_path / "lspet" / "joints.mat", "lspet")
    assert joints.shape == (200, 14, 2)
    assert visible.mean() == pytest.approx(0.87, abs=1e-9)
    report = build_index(load_dataset_manifest("lspet"), tmp_path / "lspet", val_fraction=0.1)
    assert report.counts == {"train": 180, "val": 20, "test": 0}
    assert report.skipped == []
    records = read_index(report.index_dir / "train.jsonl")
    # visible joints lie in the image (annotators clicked up to a few pixels past the border)
    for r in records:
        pts = r.joints[r.visible]
        assert ((pts >= -5) & (pts <= np.array([r.width, r.height]) + 5)).all(), r.id
