"""MPII, FLIC and COCO-format datasets end to end, and the metrics they are scored by.

Small archives in each real format are built here: MPII's two archives (the RELEASE struct
saved with scipy.io.savemat in the real nesting, the images tarball), FLIC.zip (examples.mat
and images/) and a COCO keypoint JSON (17 keypoints, two people in one image). Each is
fetched with --archive, indexed, trained for stages 1 and 2 in both frameworks with a tiny
network, and evaluated with its own metrics.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.manifests import load_dataset_manifest
from deeppose_cli.core.metrics import head_sizes, pck_box, pckh
from deeppose_cli.core.records import PoseRecord
from deeppose_cli.data.annotations import build_index, read_index
from deeppose_cli.data.fetch import assign_archives, fetch_dataset

from conftest import assert_no_escaped_exception

IMAGE_SIZE = 96
TINY = ["--input-size", "67", "--width", "0.0625", "--max-iterations", "3", "--batch-size", "4",
        "--quiet"]


def jpeg(seed: int, size: int = IMAGE_SIZE) -> bytes:
    import cv2

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", pixels)
    assert ok
    return data.tobytes()


def structs(entries: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array (savemat writes a structured array as one); a field an
    entry lacks is an empty matrix, as MATLAB leaves it."""
    fields = list(dict.fromkeys(k for e in entries for k in e))
    array = np.zeros((1, len(entries)), dtype=[(f, object) for f in fields])
    for k, entry in enumerate(entries):
        array[0, k] = tuple(entry.get(f, np.zeros((0, 0))) for f in fields)
    return array


def scalar(value) -> np.ndarray:
    return np.array([[value]])


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def pose(rng: np.random.Generator, count: int, centre=(48.0, 46.0), spread=22.0) -> np.ndarray:
    return np.asarray(centre) + rng.uniform(-spread, spread, (count, 2))


# --------------------------------------------------------------------------------------------
# MPII


# is_visible as the real file stores it: a number, a one-character string, or nothing.
VISIBILITY_FORMS = [lambda: scalar(1), lambda: np.array(["0"]), lambda: np.zeros((0, 0)),
                    lambda: scalar(0)]


def mpii_person(rng, joints: list[int], scale=0.3, objpos=(49.0, 41.0), head=(40, 10, 60, 25),
                bad_id=False) -> dict:
    coords = pose(rng, 16)
    points = [{"id": scalar(16 if bad_id and j == joints[0] else j),
               "x": scalar(float(coords[j, 0]) + 1.0), "y": scalar(float(coords[j, 1]) + 1.0),
               "is_visible": VISIBILITY_FORMS[j % 4]()} for j in joints]
    person = {"x1": scalar(head[0]), "y1": scalar(head[1]), "x2": scalar(head[2]),
              "y2": scalar(head[3]), "annopoints": structs([{"point": structs(points)}]),
              "scale": scalar(scale),
              "objpos": structs([{"x": scalar(objpos[0]), "y": scalar(objpos[1])}])}
    person["_coords"] = coords  # kept by the test, removed before saving
    return person


def build_mpii(tmp_path: Path) -> tuple[Path, Path, dict]:
    """MPII's two archives: 12 training images (image 1 with two people, image 2 with a
    second person box that has no joints, image 3's person with a bad point id) and 2 test
    images without labels. Returns (annotation zip, image tarball, facts for the checks)."""
    rng = np.random.default_rng(3)
    annolist, train, single, acts, people = [], [], [], [], {}
    images = {}
    for number in range(1, 15):
        name = f"{number:09d}.jpg"
        images[f"images/{name}"] = jpeg(number)
        is_train = number <= 12
        rects = []
        if is_train:
            rects.append(mpii_person(rng, list(range(16)), bad_id=number == 3))
            if number == 1:
                rects.append(mpii_person(rng, list(range(10)), scale=0.25, objpos=(30.0, 50.0),
                                         head=(20, 20, 32, 29)))
            if number == 2:
                rects.append({"scale": scalar(0.2),
                              "objpos": structs([{"x": scalar(70.0), "y": scalar(50.0)}])})
        else:
            rects.append({"scale": scalar(0.3),
                          "objpos": structs([{"x": scalar(48.0), "y": scalar(48.0)}])})
        for r, rect in enumerate(rects, 1):
            if "_coords" in rect:
                people[f"{number:09d}_{r}"] = (rect.pop("_coords"), rect)
        annolist.append({"image": structs([{"name": name}]), "annorect": structs(rects),
                         "frame_sec": scalar(10), "vididx": scalar(1)})
        train.append(int(is_train))
        single.append(np.array([[1]]) if is_train else np.zeros((0, 0)))
        acts.append({"cat_name": "sports", "act_name": "running", "act_id": scalar(1)})
    single_person = np.empty((len(single), 1), dtype=object)  # a cell array, one per image
    for k, chosen in enumerate(single):
        single_person[k, 0] = chosen
    release = {"annolist": structs(annolist), "img_train": np.array([train]),
               "version": "12", "single_person": single_person,
               "act": structs(acts).T, "video_list": np.array([["abcdefghijk"]], dtype=object)}
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"RELEASE": release})
    annotations = zip_of(tmp_path / "mpii_human_pose_v1_u12_2.zip", {
        "mpii_human_pose_v1_u12_2/mpii_human_pose_v1_u12_1.mat": mat.getvalue(),
        "mpii_human_pose_v1_u12_2/README.md": b"MPII test copy\n"})
    tarball = tar_of(tmp_path / "mpii_human_pose_v1.tar.gz", images)
    return annotations, tarball, people


def test_mpii_two_archives_fetch_and_index_one_record_per_person(tmp_path):
    annotations, tarball, people = build_mpii(tmp_path)
    root = tmp_path / "data"
    result = CliRunner().invoke(main, ["fetch", "mpii", "--root", str(root),
                                       "--archive", str(tarball), "--archive", str(annotations),
                                       "index", "mpii"])
    assert result.exit_code == 0, result.output
    assert_no_escaped_exception(result)
    dataset = root / "mpii"
    assert (dataset / "mpii_human_pose_v1_u12_1.mat").is_file()  # its top directory stripped
    assert len(list((dataset / "images").glob("*.jpg"))) == 14      # unpacked into images/
    marker = json.loads((dataset / ".deeppose-complete.json").read_text())
    assert [p["name"] for p in marker["parts"]] == ["annotations", "images"]
    assert "pin it with --sha256 images=" in result.output

    index = dataset / "index"
    records = {r.id: r for split in ("train", "val") for r in read_index(index / f"{split}.jsonl")}
    # 12 training images: 13 people with joints, less image 3's (a point id out of range);
    # the test images' people are never indexed.
    assert sorted(records) == sorted(set(people) - {"000000003_1"})
    skipped = {s["id"]: s["reason"] for s in map(json.loads, (index / "skipped.jsonl")
                                                  .read_text().splitlines())}
    assert skipped == {"000000002_2": "no joint annotations (annopoints)",
                       "000000003_1": "point id 16 outside 0..15"}
    # Both people of image 1 are in the same split.
    val_ids = {r.id for r in read_index(index / "val.jsonl")}
    assert ("000000001_1" in val_ids) == ("000000001_2" in val_ids)

    coords, rect = people["000000001_2"]
    record = records["000000001_2"]
    labelled = np.arange(16) < 10
    assert record.visible.tolist() == labelled.tolist()  # every labelled point, any is_visible
    np.testing.assert_allclose(record.joints[labelled], coords[labelled], atol=1e-3)
    # Box: side 1.25 x 200 x scale, centred 15 x scale px below objpos (0-based).
    np.testing.assert_allclose(record.box, [29.0, 49.0 + 15 * 0.25, 62.5, 62.5], atol=1e-3)
    assert record.head_size == pytest.approx(0.6 * math.hypot(12, 9), abs=1e-3)


def test_mpii_archives_by_name_and_the_offline_message(tmp_path):
    annotations, tarball, _ = build_mpii(tmp_path)
    renamed = tmp_path / "copy.bin"
    renamed.write_bytes(tarball.read_bytes())
    root = tmp_path / "data"
    result = CliRunner().invoke(main, ["fetch", "mpii", "--root", str(root),
                                       "--archive", f"images={renamed}",
                                       "--archive", str(annotations)])
    assert result.exit_code == 0, result.output
    assert (root / "mpii" / "images" / "000000001.jpg").is_file()

    # A file whose name does not say which archive it is is told apart by its content.
    unnamed = CliRunner().invoke(main, ["fetch", "mpii", "--root", str(tmp_path / "other"),
                                        "--archive", str(annotations), "--archive", str(renamed)])
    assert unnamed.exit_code == 0, unnamed.output
    assert (tmp_path / "other" / "mpii" / "images" / "000000001.jpg").is_file()
    # Where content cannot tell either (two zip archives), NAME=FILE is asked for.
    manifest = load_dataset_manifest("mpii")
    two_zips = dataclasses.replace(manifest, archive={**manifest.archive, "parts": [
        {**part, "filename": f"{part['name']}.zip"} for part in manifest.archive["parts"]]})
    with pytest.raises(DeepPoseError, match=r"write --archive annotations=\S+ or "
                                            r"--archive images="):
        assign_archives(two_zips, [str(annotations.with_name("other.zip"))])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x"
    offline = dataclasses.replace(manifest, archive={**manifest.archive, "parts": [
        {**part, "urls": [dead]} for part in manifest.archive["parts"]]})
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(offline, tmp_path / "offline", progress=False)
    message = str(failure.value)
    assert "\n" not in message and manifest.homepage in message
    assert ("deeppose fetch mpii --archive PATH/TO/mpii_human_pose_v1_u12_2.zip "
            "--archive PATH/TO/mpii_human_pose_v1.tar.gz") in message
    # With the annotations given, the command names that file and the missing tarball.
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(offline, tmp_path / "offline", archives={"annotations": annotations},
                      progress=False)
    assert (f"deeppose fetch mpii --archive {annotations} --archive "
            "PATH/TO/mpii_human_pose_v1.tar.gz") in str(failure.value)
    assert not (tmp_path / "offline" / "mpii").exists()


# --------------------------------------------------------------------------------------------
# FLIC

FLIC_ROWS = [0, 1, 2, 3, 4, 5, 6, 9, 12, 13, 16]


def build_flic(tmp_path: Path, count: int = 12, coords_rows: int = 29) -> tuple[Path, dict]:
    """FLIC.zip: ``count`` frames, the first 8 istrain and the rest istest; frame 5 lacks its
    right wrist."""
    rng = np.random.default_rng(5)
    examples, members, truth = [], {}, {}
    for k in range(1, count + 1):
        name = f"film-{k:08d}.jpg"
        members[f"FLIC/images/{name}"] = jpeg(100 + k)
        coords = np.full((2, coords_rows), np.nan)
        joints = pose(rng, 11)
        if k == 5:
            joints[5] = np.nan
        if coords_rows > max(FLIC_ROWS):
            coords[:, FLIC_ROWS] = (joints + 1.0).T
        truth[Path(name).stem] = joints
        examples.append({"poselet_hit_idx": np.zeros((0, 0)), "moviename": "film",
                         "coords": coords, "filepath": name,
                         "imgdims": np.array([[IMAGE_SIZE, IMAGE_SIZE, 3]]),
                         "currframe": scalar(k), "torsobox": np.array([[30.0, 30.0, 60.0, 70.0]]),
                         "istrain": scalar(int(k <= 8)), "istest": scalar(int(k > 8)),
                         "isbad": scalar(0), "isunchecked": scalar(0)})
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"examples": structs(examples)})
    members["FLIC/examples.mat"] = mat.getvalue()
    return zip_of(tmp_path / "FLIC.zip", members), truth


def test_flic_official_split_and_its_joints(tmp_path):
    archive, truth = build_flic(tmp_path)
    root = tmp_path / "data"
    result = CliRunner().invoke(main, ["fetch", "flic", "--root", str(root), "--archive",
                                       str(archive), "index", "flic"])
    assert result.exit_code == 0, result.output
    index = root / "flic" / "index"
    train, test = read_index(index / "train.jsonl"), read_index(index / "test.jsonl")
    assert [r.id for r in train] == [f"film-{k:08d}" for k in range(1, 9)]
    assert [r.id for r in test] == [f"film-{k:08d}" for k in range(9, 13)]
    assert not (index / "val.jsonl").exists()
    fifth = train[4]
    assert fifth.visible.tolist() == [True] * 5 + [False] + [True] * 5
    np.testing.assert_allclose(fifth.joints[fifth.visible], truth["film-00000005"][fifth.visible],
                               atol=1e-3)
    carved = build_index(load_dataset_manifest("flic"), root / "flic", val_fraction=0.25)
    assert carved.counts == {"train": 6, "val": 2, "test": 4}


# --------------------------------------------------------------------------------------------
# COCO

COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                 [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5],
                 [4, 6], [5, 7]]


def build_coco(tmp_path: Path, images: int = 10) -> tuple[Path, Path, dict]:
    """A COCO person-keypoints file: image 1 holds two people; image 2 a crowd region and a
    person with no labelled keypoint; one person's keypoints are partly v = 1 or 0."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "coco_images"
    folder.mkdir()
    entries, annotations, truth = [], [], {}
    for k in range(1, images + 1):
        name = f"{k:012d}.jpg"
        (folder / name).write_bytes(jpeg(200 + k))
        entries.append({"id": k, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for person in range(2 if k == 1 else 1):
            points = pose(rng, 17, centre=(30.0 + 35 * person, 46.0), spread=14.0)
            v = np.full(17, 2)
            if k == 3:
                v[:4], v[4:8] = 1, 0  # occluded (labelled), then not labelled
            keypoints = np.concatenate([np.where(v[:, None] > 0, points, 0.0), v[:, None]],
                                       axis=1)
            ann_id = 100 * k + person
            annotations.append({"id": ann_id, "image_id": k, "category_id": 1, "iscrowd": 0,
                                "num_keypoints": int((v > 0).sum()),
                                "keypoints": keypoints.ravel().round(2).tolist(),
                                "bbox": [float(points[:, 0].min()), float(points[:, 1].min()),
                                         float(np.ptp(points[:, 0])),
                                         float(np.ptp(points[:, 1]))]})
            truth[f"{k:012d}_{ann_id}"] = (points, v)
    annotations.append({"id": 900, "image_id": 2, "category_id": 1, "iscrowd": 1,
                        "keypoints": [0] * 51, "bbox": [0, 0, 10, 10]})
    annotations.append({"id": 901, "image_id": 2, "category_id": 1, "iscrowd": 0,
                        "keypoints": [0] * 51, "bbox": [5, 5, 20, 20]})
    data = {"images": entries, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": COCO_KEYPOINTS, "skeleton": COCO_SKELETON}]}
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps(data))
    return path, folder, truth


def test_coco_json_becomes_a_dataset_every_command_knows(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "default"))
    path, folder, truth = build_coco(tmp_path)
    root = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["index", "--coco", str(path), "--images", str(folder),
                                       "--name", "people", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert_no_escaped_exception(result)
    manifest = load_dataset_manifest("people", [root])
    assert manifest.path == root / "people" / "dataset.toml"
    assert manifest.joint_names == tuple(COCO_KEYPOINTS)
    assert manifest.flip_pairs == ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12),
                                   (13, 14), (15, 16))
    assert manifest.torso_diameter == (5, 12)  # left shoulder, right hip
    assert {limb.name: limb.category for limb in manifest.limbs} == {
        "left_ankle-left_knee": "lower_legs", "left_knee-left_hip": "upper_legs",
        "right_ankle-right_knee": "lower_legs", "right_knee-right_hip": "upper_legs",
        "left_shoulder-left_elbow": "upper_arms", "right_shoulder-right_elbow": "upper_arms",
        "left_elbow-left_wrist": "lower_arms", "right_elbow-right_wrist": "lower_arms"}
    assert len(manifest.skeleton) == len(COCO_SKELETON)
    assert manifest.head_segment is None and manifest.headline == ("pck@0.2",)

    index = root / "people" / "index"
    records = {r.id: r for split in ("train", "val") for r in read_index(index / f"{split}.jsonl")}
    assert sorted(records) == sorted(truth)  # one record per person, both of image 1
    val_ids = {r.id for r in read_index(index / "val.jsonl")}
    assert ("000000000001_100" in val_ids) == ("000000000001_101" in val_ids)
    partial = records["000000000003_300"]
    assert partial.visible.tolist() == [True] * 4 + [False] * 4 + [True] * 9  # v = 1 counts
    points, _ = truth["000000000003_300"]
    np.testing.assert_allclose(partial.joints[partial.visible], points[partial.visible],
                               atol=0.01)
    bbox = json.loads(path.read_text())["annotations"][0]["bbox"]
    side = 1.25 * max(bbox[2], bbox[3])
    np.testing.assert_allclose(records["000000000001_100"].box,
                               [bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2, side, side],
                               atol=2e-3)
    skipped = {s["id"]: s["reason"] for s in map(json.loads, (index / "skipped.jsonl")
                                                  .read_text().splitlines())}
    assert skipped == {"000000000002_900": "a crowd region (iscrowd), not one person",
                       "000000000002_901": "fewer than 1 visible joints"}

    # Every command takes it by name: index again (under its root), and train on it.
    again = CliRunner().invoke(main, ["index", "people", "--root", str(root), "--min-keypoints",
                                      "12"])
    assert again.exit_code == 0, again.output
    assert "fewer than 12 visible joints" in again.output
    unknown = CliRunner().invoke(main, ["index", "people"])
    assert unknown.exit_code == 2 and "'people' is not one of" in unknown.output
    nothing = CliRunner().invoke(main, ["fetch", "people", "--root", str(root)])
    assert nothing.exit_code == 1 and "there is nothing to fetch" in nothing.output
    # A later command of the same chain takes the name the chain's index --coco gives.
    chained = CliRunner().invoke(main, ["index", "--coco", str(path), "--images", str(folder),
                                        "--name", "again", "--root", str(root),
                                        "index", "again", "--val-fraction", "0.5"])
    assert chained.exit_code == 0, chained.output
    assert len(read_index(root / "again" / "index" / "val.jsonl")) >= 4


# --------------------------------------------------------------------------------------------
# Stages 1 and 2 in both frameworks, and evaluate, on each format


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The three datasets fetched and indexed once: name -> (root, the fetch/index argv)."""
    tmp = tmp_path_factory.mktemp("formats")
    root = tmp / "data"
    annotations, tarball, _ = build_mpii(tmp)
    flic, _ = build_flic(tmp)
    coco, folder, _ = build_coco(tmp)
    runner = CliRunner()
    for argv in (["fetch", "mpii", "--root", str(root), "--archive", str(annotations),
                  "--archive", str(tarball), "index", "mpii"],
                 ["fetch", "flic", "--root", str(root), "--archive", str(flic), "index", "flic"],
                 ["index", "--coco", str(coco), "--images", str(folder), "--name", "people",
                  "--root", str(root)]):
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["pytorch", "chainer"])
@pytest.mark.parametrize("dataset, joints, headline", [
    ("mpii", 16, "PCKh@.5"), ("flic", 11, "PDJ@.2"), ("people", 17, "PCK@.2")])
def test_train_both_stages_and_evaluate(datasets, tmp_path, monkeypatch, framework, dataset,
                                        joints, headline):
    monkeypatch.chdir(tmp_path)
    root = str(datasets)
    result = CliRunner().invoke(main, [
        "train-stage", "1", "--dataset", dataset, "--root", root, "--framework", framework,
        *TINY, "train-stage", "2", "--framework", framework, *TINY, "evaluate"])
    assert result.exit_code == 0, result.output
    assert_no_escaped_exception(result)
    run = tmp_path / "runs" / dataset / f"stage2-{framework}"
    assert json.loads((run / "run.json").read_text())["num_joints"] == joints
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["mean pose", "stage 1", "stages 1-2"]
    row = metrics["rows"][-1]
    assert len(row["pdj@0.2_per_joint"]) == joints and 0 <= row["pck@0.2"] <= 1
    assert ("pckh@0.5" in row) == (dataset == "mpii")
    assert ("pdj_groups" in row) == (dataset == "flic")
    assert set(row["headline"]) == set(metrics["headline"])
    # The headline is the table's first metric column.
    header = next(line for line in result.output.splitlines() if "┃ model" in line)
    assert header.split("model")[1].strip(" ┃|").startswith(headline.split()[0])


# --------------------------------------------------------------------------------------------
# The metrics, against hand-computed values


def test_pckh_and_pck_match_hand_computed_values():
    manifest = load_dataset_manifest("mpii")
    gt = np.zeros((2, 16, 2))
    gt[:, :, 0] = np.arange(16) * 7.0
    gt[1, 8], gt[1, 9] = [100.0, 100.0], [100.0, 120.0]  # person 2's head segment: 20 px
    pred = gt.copy()
    pred[:, :, 0] += np.arange(16)  # joint j is j pixels off
    visible = np.ones((2, 16), dtype=bool)
    visible[1, 15] = False
    sizes = head_sizes(gt, visible, [10.0, None], manifest.head_segment)
    assert sizes.tolist() == [10.0, 20.0]

    curve = pckh(pred, gt, visible, sizes, excluded=manifest.pckh_excludes)
    mean, per_joint = curve.at(0.5)
    # Person 1 (threshold 5): joints 0-5; person 2 (threshold 10): joints 0-10, 15 unlabelled.
    # The mean leaves out pelvis (6) and thorax (7): (6 + 9) / (14 + 13).
    assert mean == pytest.approx(15 / 27)
    assert per_joint[:6].tolist() == [1.0] * 6
    assert per_joint[6:11].tolist() == [0.5] * 5 and per_joint[11:].tolist() == [0.0] * 5

    boxes = np.array([[0.0, 0.0, 50.0, 80.0], [0.0, 0.0, 40.0, 30.0]])
    box_mean, box_joints = pck_box(pred, gt, visible, boxes).at(0.2)
    # Person 1: 0.2 x 80 = 16 px, every joint; person 2: 0.2 x 40 = 8 px, joints 0-8.
    assert box_mean == pytest.approx(25 / 31)
    assert box_joints[:9].tolist() == [1.0] * 9 and box_joints[9:15].tolist() == [0.5] * 6
    assert box_joints[15] == 1.0


def test_evaluate_scores_use_the_record_head_size_and_the_headline():
    from deeppose_cli.apps.evaluate import metric_label, score, summary_metrics

    manifest = load_dataset_manifest("mpii")
    gt = np.tile(np.arange(16.0)[:, None] * [7.0, 0.0], (1, 1))
    records = [PoseRecord(id="a", image=Path("a.jpg"), joints=gt, visible=np.ones(16, bool),
                          box=np.array([50.0, 50.0, 100.0, 100.0]), head_size=4.0)]
    pred = gt[None] + [3.0, 4.0]  # 5 px off everywhere
    row = score("stage 1", pred, records, manifest)
    assert row.metric("pckh@0.5") == 0.0      # 5 > 0.5 x 4
    assert row.metric("pck@0.2") == 1.0       # 5 <= 0.2 x 100
    records[0].head_size = 10.0
    assert score("stage 1", pred, records, manifest).metric("pckh@0.5") == 1.0
    assert summary_metrics([row], manifest)[0] == "pckh@0.5"
    assert metric_label("pdj@0.2/wrists") == "PDJ@.2 wrists"


# --------------------------------------------------------------------------------------------
# Malformed annotation files: one line that says what is wrong


def mpii_with(tmp_path: Path, release) -> Path:
    dataset = tmp_path / "mpii"
    dataset.mkdir(parents=True)
    scipy.io.savemat(dataset / "mpii_human_pose_v1_u12_1.mat", release)
    return dataset


@pytest.mark.parametrize("content, message", [
    ({"joints": np.zeros((3, 3))}, "no variable `RELEASE` in the file"),
    ({"RELEASE": {"img_train": np.array([[1]])}}, "RELEASE has no annolist"),
    ({"RELEASE": {"annolist": structs([{"image": structs([{"name": "a.jpg"}])}] * 2),
                  "img_train": np.array([[1]])}},
     "RELEASE.img_train must hold one flag per annolist entry (2)"),
    ({"RELEASE": {"annolist": structs([{"image": structs([{"name": "../a.jpg"}])}]),
                  "img_train": np.array([[1]])}}, "annolist(1).image.name is missing"),
])
def test_a_malformed_mpii_file_is_one_line(tmp_path, content, message):
    dataset = mpii_with(tmp_path, content)
    with pytest.raises(DeepPoseError) as failure:
        build_index(load_dataset_manifest("mpii"), dataset)
    assert message in str(failure.value) and "\n" not in str(failure.value)
    assert "mpii_human_pose_v1_u12_1.mat" in str(failure.value)


def test_a_malformed_flic_or_coco_file_is_one_line_through_the_cli(tmp_path):
    archive, _ = build_flic(tmp_path, count=3, coords_rows=14)
    result = CliRunner().invoke(main, ["fetch", "flic", "--root", str(tmp_path / "data"),
                                       "--archive", str(archive), "index", "flic"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "examples(1).coords must be 2 x K with K > 16, got 2 x 14" \
        in lines[0]
    assert_no_escaped_exception(result)

    folder = tmp_path / "images"
    folder.mkdir()
    for text, message in (("{not json", "not JSON"),
                          ('{"images": [], "annotations": []}', "`categories` must be a list"),
                          (json.dumps({"images": [{"id": 1}], "annotations": [],
                                       "categories": []}), "images[0] needs an id and a "
                                                           "file_name")):
        path = tmp_path / "bad.json"
        path.write_text(text)
        result = CliRunner().invoke(main, ["index", "--coco", str(path), "--images",
                                           str(folder), "--name", "bad", "--root",
                                           str(tmp_path / "data")])
        assert result.exit_code == 1, result.output
        assert result.output.count("Error:") == 1 and message in result.output
        assert str(path) in result.output
        assert_no_escaped_exception(result)


def test_a_wrong_number_of_coco_keypoints_skips_that_person_only(tmp_path):
    path, folder, truth = build_coco(tmp_path, images=4)
    data = json.loads(path.read_text())
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["index", "--coco", str(path), "--images", str(folder),
                                       "--name", "few", "--root", str(tmp_path / "data"),
                                       "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    train = read_index(tmp_path / "data" / "few" / "index" / "train.jsonl")
    assert len(train) == len(truth) - 1
    assert "keypoints must be 51 numbers" in result.output
