"""`deeppose predict` on collections and videos: sources (folders, globs, @lists, videos,
odd file names), people found from boxes files and detectors, and the COCO JSON, CSV and
drawn outputs read back and checked (docs/predict.md)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.apps.detectors import BoxesFile, crop_box, keep, Detection
from deeppose_cli.apps.sources import Frame, SourceFailure, expand_sources, read_frames
from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.manifests import load_dataset_manifest

from conftest import assert_no_escaped_exception, subset_index

MANIFEST = load_dataset_manifest("synthetic")
BAD = os.fsdecode(b"bad\xff")  # a file name that is not valid UTF-8


def write_image(path: Path, size=(48, 64), seed=0) -> Path:
    import cv2

    rng = np.random.default_rng(seed)
    ok, data = cv2.imencode(path.suffix or ".png",
                            rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


def write_video(path: Path, frames: int = 10, size=(64, 48), fps: float = 10.0) -> Path:
    """A short mp4v video written with OpenCV: frame k has a bright square at x = 4k."""
    import cv2

    tmp = path.parent / "plain-name.mp4"
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for k in range(frames):
        image = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
        image[10:20, 4 * k:4 * k + 10] = 250
        writer.write(image)
    writer.release()
    os.replace(tmp, path)
    return path


def frame_count(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    n = 0
    while capture.read()[0]:
        n += 1
    capture.release()
    return n


def one_line(result, *words) -> None:
    assert_no_escaped_exception(result)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors, result.output
    for word in words:
        assert any(word in line for line in errors), result.output


# ----------------------------------------------------------------------------- sources


def test_folders_globs_and_lists_expand_in_order(tmp_path):
    for name in ("b.jpg", "a.png", "c.txt", ".hidden.jpg", "sub/d.jpg", "clip.mp4"):
        target = tmp_path / "photos" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    photos = tmp_path / "photos"
    items, failures = expand_sources([photos])
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "clip.mp4"] and not failures
    assert [i.kind for i in items] == ["image", "image", "video"]
    items, _ = expand_sources([photos], recursive=True)
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "clip.mp4", "d.jpg"]

    items, failures = expand_sources([str(photos / "*.jpg"), str(photos / "*.gif")])
    assert [i.path.name for i in items] == ["b.jpg"]
    assert failures == [SourceFailure(str(photos / "*.gif"), "the pattern matches no file")]

    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# photos\nphotos/b.jpg\n\n" + os.fsencode(photos / "sub") + b"\n"
                        b"missing.jpg\n")
    items, failures = expand_sources([f"@{listing}"])
    assert [i.path for i in items] == [photos / "b.jpg", photos / "sub" / "d.jpg",
                                       tmp_path / "missing.jpg"] and not failures

    (tmp_path / "empty").mkdir()
    items, failures = expand_sources([tmp_path / "empty", f"@{tmp_path / 'nolist.txt'}"])
    assert items == [] and [f.reason for f in failures] == [
        "no images or videos in this folder (--recursive searches its subfolders)",
        "no such file"]


def test_images_and_video_frames_are_read_and_bad_ones_reported(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    write_video(tmp_path / "clip.mp4", frames=10)
    (tmp_path / "fake.mp4").write_bytes(b"this is not a video" * 100)
    write_video(tmp_path / f"{BAD}.mp4", frames=4)
    items, _ = expand_sources([tmp_path / "a.png", tmp_path / "broken.jpg",
                               tmp_path / "clip.mp4", tmp_path / "fake.mp4",
                               tmp_path / f"{BAD}.mp4"])
    got = list(read_frames(items, every=3))
    frames = [g for g in got if isinstance(g, Frame)]
    failures = [g for g in got if isinstance(g, SourceFailure)]
    assert [(f.source.name, f.frame) for f in frames] == [
        ("a.png", None), ("clip.mp4", 0), ("clip.mp4", 3), ("clip.mp4", 6), ("clip.mp4", 9),
        (f"{BAD}.mp4", 0), (f"{BAD}.mp4", 3)]
    assert frames[1].fps == pytest.approx(10.0) and frames[1].image.shape == (48, 64, 3)
    # frame 3's square sits 12 px further right than frame 0's: the frames are the right ones
    assert frames[2].image[15, 14:22].mean() > 200 and frames[1].image[15, 14:22].mean() < 200
    assert [Path(f.where).name for f in failures] == ["broken.jpg", "fake.mp4"]
    assert "bad\\xff" in str(SourceFailure(os.fspath(tmp_path / f"{BAD}.mp4"), "x"))


def write_truncated_video(path: Path, frames: int = 10, keep: float = 0.5) -> int:
    """An MJPG AVI of ``frames`` frames cut to its first ``keep`` of bytes (its header still
    counts every frame); returns how many frames OpenCV still decodes from it."""
    import cv2

    tmp = path.parent / "whole.avi"
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)  # noise: every frame takes about as many bytes
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[:int(len(data) * keep)])
    return frame_count(path)


def test_a_video_that_stops_decoding_midway_is_one_failure_after_its_frames(tmp_path):
    decodable = write_truncated_video(tmp_path / "cut.avi")
    assert 0 < decodable < 9
    write_image(tmp_path / "after.png")
    whole = write_video(tmp_path / "whole.mp4", frames=6)
    items, _ = expand_sources([tmp_path / "cut.avi", tmp_path / "after.png", whole])
    got = list(read_frames(items))
    failures = [g for g in got if isinstance(g, SourceFailure)]
    frames = [(g.source.name, g.frame) for g in got if isinstance(g, Frame)]
    assert frames == [("cut.avi", k) for k in range(decodable)] + [("after.png", None)] + [
        ("whole.mp4", k) for k in range(6)]  # the rest goes on; a whole video is not flagged
    assert failures == [SourceFailure(f"{tmp_path / 'cut.avi'} frame {decodable}",
                                      f"could not be decoded: the video stops there "
                                      f"({decodable} of the 10 frames its header counts "
                                      f"were read)")]
    # the failure comes right after the last frame read, before the next source
    assert isinstance(got[decodable], SourceFailure)


# ----------------------------------------------------------------------------- boxes files


def test_boxes_files_json_coco_and_csv(tmp_path):
    a, b = tmp_path / "x" / "a.jpg", tmp_path / "y" / "b.jpg"
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([
        {"file_name": "a.jpg", "bbox": [1, 2, 10, 20], "score": 0.9, "category_id": 1},
        {"file_name": str(b), "bbox": [0, 0, 5, 5]},
        {"file_name": "a.jpg", "bbox": [1, 2, 10, 20], "category_id": 3},  # not a person
        {"image_id": 7, "bbox": [3, 3, 8, 8], "score": 0.4},
        {"file_name": "a.jpg", "bbox": [500, 500, 10, 10]}]))
    read = BoxesFile.read(boxes)
    names = read.source_names([a, b])
    found, notes = read.detections(a, None, 1, 100, 100, names)
    assert [(d.box, d.score) for d in found] == [([1, 2, 10, 20], 0.9)]
    assert len(notes) == 1 and "outside the 100 x 100 image" in notes[0]
    assert [d.box for d in read.detections(b, None, 2, 100, 100, names)[0]] == [[0, 0, 5, 5]]
    assert sorted(d.score for d in read.detections(b, None, 7, 100, 100, names)[0]) == [0.4, 1.0]
    # the crop is a square on the box's centre, 1.25 x its longer side
    np.testing.assert_allclose(found[0].crop, [6, 12, 25, 25])

    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "bbox": [0, 0, 4, 4]}]}))
    assert len(BoxesFile.read(coco).entries) == 1

    table = tmp_path / "boxes.csv"
    table.write_text("file_name,x,y,w,h,score,frame\na.jpg,1,2,3,4,0.5,\nclip.mp4,0,0,9,9,,2\n")
    entries = BoxesFile.read(table).entries
    assert [(e.key, e.box, e.score, e.frame) for e in entries] == [
        ("a.jpg", [1, 2, 3, 4], 0.5, None), ("clip.mp4", [0, 0, 9, 9], 1.0, 2)]


@pytest.mark.parametrize("text, words", [
    ("file_name,x,y,w,h\na.jpg,1,2,3,4\nb.jpg,1,two,3,4\n", "line 3: bbox must be a number"),
    ("file_name,x,y\na.jpg,1,2\n", "needs the columns file_name, x, y, w, h"),
    ('[{"file_name": "a.jpg", "bbox": [1, 2, 3]}]', "entry 0: bbox must be [x, y, w, h]"),
    ('[{"file_name": "a.jpg", "bbox": [1, 2, 0, 4]}]', "at least 1 pixel"),
    ('[{"bbox": [1, 2, 3, 4]}]', "needs the image as file_name"),
    ('[{"file_name": "a.jpg", "bbox": [1, 2, 3, 4], "score": NaN}]', "finite"),
    ('[{"file_name": "a.jpg", "bbox": [1, 2', "not valid JSON (line 1"),
])
def test_a_bad_boxes_file_is_one_line(tmp_path, text, words):
    path = tmp_path / ("boxes.csv" if text.startswith("file") else "boxes.json")
    path.write_text(text)
    with pytest.raises(DeepPoseError, match=None) as error:
        BoxesFile.read(path)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_detections_are_filtered_by_score_and_count():
    found = [Detection([0, 0, 9, 9], s, crop_box([0, 0, 9, 9], 1.0)) for s in (0.2, 0.9, 0.6)]
    assert [d.score for d in keep(found, 0.5, None)] == [0.9, 0.6]
    assert [d.score for d in keep(found, 0.0, 2)] == [0.9, 0.6]


def test_confidence_is_the_laplace_probability_of_the_pdj_radius():
    from deeppose_cli.apps.predict import _confidence

    coords = np.zeros((1, 14, 2))
    coords[0, 9], coords[0, 2] = (0, 0), (0, 100)  # torso pair (9, 2): diameter 100 px
    crops = np.array([[0, 50, 200, 200]])
    log_scales = np.log(np.stack([np.full((14, 2), 1.0), np.full((14, 2), 20.0),
                                  np.full((14, 2), 1e4)]))
    got = [_confidence(coords, s[None], crops, (9, 2))[0, 0] for s in log_scales]
    # radius 0.2 x 100 = 20 px; per axis P(|d| <= 20) = 1 - exp(-20 / b), both axes
    assert got == pytest.approx([(1 - math.exp(-20)) ** 2, (1 - math.exp(-1)) ** 2,
                                 (1 - math.exp(-20 / 1e4)) ** 2])


def test_hog_detector_or_its_one_line_error():
    import cv2

    from deeppose_cli.apps.detectors import hog_detector

    if not hasattr(cv2, "HOGDescriptor"):
        with pytest.raises(DeepPoseError, match="opencv-contrib-python-headless"):
            hog_detector()
        return
    detect = hog_detector()
    image = np.full((200, 120, 3), 200, dtype=np.uint8)  # an upright dark figure
    cv2.circle(image, (60, 50), 10, (30, 30, 30), -1)
    cv2.rectangle(image, (48, 62), (72, 120), (30, 30, 30), -1)
    cv2.line(image, (54, 120), (44, 170), (30, 30, 30), 8)
    cv2.line(image, (66, 120), (76, 170), (30, 30, 30), 8)
    found = detect(image)
    assert found, "the HOG people detector found no one on an upright figure"
    x, y, w, h = found[0].box
    assert x < 60 < x + w and y < 110 < y + h  # around the figure
    found += detect(image[:100, :50])  # smaller than the detection window: enlarged first
    for d in found:
        x, y, w, h = d.box
        assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and 0 < d.score < 1


# ----------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def runs(synthetic_dataset, tmp_path_factory):
    """A PyTorch stage-1 run trained with the laplace loss (joints get a confidence) and a
    Chainer stage-1 run with l2 (they do not), a few iterations each."""
    from test_export import spread_weights, train

    _, full_index = synthetic_dataset
    root = tmp_path_factory.mktemp("predict-runs")
    index_dir = subset_index(full_index, root / "index", 16, 4)
    init = spread_weights(root / "init.pt", seed=1)
    return {"pytorch": train("pytorch", index_dir, root / "pt1", 1, init, loss="laplace"),
            "chainer": train("chainer", index_dir, root / "ch1", 1, init, loss="l2"),
            "images": [Path(json.loads(line)["image"]) for line in
                       (index_dir / "val.jsonl").read_text().splitlines()[:3]]}


def check_coco_results(entries, num_joints, images):
    """A COCO keypoint results file, checked field by field (what pycocotools' loadRes and
    COCOeval use): a list of objects with an int image_id, category_id 1, 3 x K keypoint
    numbers, a score and an [x, y, w, h] bbox."""
    assert isinstance(entries, list)
    for e in entries:
        assert isinstance(e["image_id"], int) and not isinstance(e["image_id"], bool)
        assert e["category_id"] == 1
        kp = e["keypoints"]
        assert len(kp) == 3 * num_joints and all(isinstance(v, (int, float)) for v in kp)
        assert all(math.isfinite(v) for v in kp)
        assert all(0 <= v <= 1 for v in kp[2::3])
        assert isinstance(e["score"], (int, float)) and 0 <= e["score"] <= 1
        x, y, w, h = e["bbox"]
        assert w > 0 and h > 0
        assert e["file_name"] in images
    return entries


def invoke(args):
    return CliRunner().invoke(main, ["predict", *map(str, args)])


@pytest.mark.slow
def test_collection_to_coco_json_and_csv(runs, tmp_path):
    import cv2

    source = runs["images"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, image in enumerate(source):
        (folder / f"p{k}.jpg").write_bytes(image.read_bytes())
    (folder / f"{BAD}.jpg").write_bytes(source[0].read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 50)
    listing = tmp_path / "list.txt"
    listing.write_text("photos/p1.jpg\n")
    video = write_video(tmp_path / "clip.mp4", frames=10, size=(96, 80))
    out = tmp_path / "results.json"
    table = tmp_path / "results.csv"
    result = invoke([folder, str(folder / "p[02].jpg"), f"@{listing}", video, "--every", "2",
                     "--model", runs["pytorch"], "--save-json", out, "--save-csv", table,
                     "--draw", "--out", tmp_path / "drawn"])
    assert result.exit_code == 2, result.output
    one_line(result, "corrupt.jpg: ")
    assert sum(line.startswith("Error") for line in result.output.splitlines()) == 1

    # 4 images of the folder, 2 of the glob, 1 of the list, frames 0, 2, 4, 6, 8
    entries = json.loads(out.read_text())
    names = [printable for printable in (str(folder / n) for n in
                                         ("bad\\xff.jpg", "p0.jpg", "p1.jpg", "p2.jpg"))]
    names += [str(folder / "p0.jpg"), str(folder / "p2.jpg"), str(tmp_path / "photos/p1.jpg"),
              str(video)]
    check_coco_results(entries, MANIFEST.num_joints, set(names))
    assert [e["image_id"] for e in entries] == list(range(1, 13))
    assert [e["frame"] for e in entries[-5:]] == [0, 2, 4, 6, 8]
    assert [e["file_name"] for e in entries[:7]] == names[:7]
    # the laplace run's joints carry a confidence (not the default 1)
    assert any(v != 1.0 for e in entries for v in e["keypoints"][2::3])
    # the whole image is the person: the box is the image
    h, w = cv2.imread(str(source[0])).shape[:2]
    assert entries[1]["bbox"] == [0, 0, w, h]

    rows = list(csv.DictReader(table.open(newline="")))
    assert list(rows[0]) == ["source", "frame", "image_id", "person", "score", "box_x", "box_y",
                             "box_w", "box_h", "joint", "x", "y", "confidence"]
    # one row per image or frame, person and joint, in the JSON's order
    assert len(rows) == len(entries) * MANIFEST.num_joints
    for n, entry in enumerate(entries):
        block = rows[n * MANIFEST.num_joints:(n + 1) * MANIFEST.num_joints]
        assert [r["joint"] for r in block] == list(MANIFEST.joint_names)
        for j, row in enumerate(block):
            assert row["source"] == entry["file_name"]
            assert int(row["image_id"]) == entry["image_id"]
            assert int(row["person"]) == entry["person"]
            assert (row["frame"] == "") == (entry["frame"] is None)
            if entry["frame"] is not None:
                assert int(row["frame"]) == entry["frame"]
            assert [float(row[k]) for k in ("box_x", "box_y", "box_w", "box_h")] == \
                pytest.approx(entry["bbox"], abs=0.01)
            assert float(row["score"]) == pytest.approx(entry["score"], abs=1e-4)
            x, y, v = entry["keypoints"][3 * j:3 * j + 3]
            assert float(row["x"]) == pytest.approx(x, abs=0.01)
            assert float(row["y"]) == pytest.approx(y, abs=0.01)
            assert float(row["confidence"]) == pytest.approx(v, abs=1e-4)
            assert 0 <= float(row["confidence"]) <= 1

    drawn = tmp_path / "drawn"
    assert frame_count(drawn / "clip_pose.mp4") == 5
    assert sorted(p.name for p in drawn.iterdir() if not p.name.startswith(".")) == sorted(
        [os.fsdecode(b"bad\xff_pose.png"), "p0_pose.png", "p0_pose-2.png", "p1_pose.png",
         "p1_pose-2.png", "p2_pose.png", "p2_pose-2.png", "clip_pose.mp4"])
    picture = cv2.imread(str(drawn / "p0_pose.png"))
    assert picture.shape[:2] == (h, w)


@pytest.mark.slow
def test_boxes_file_gives_two_people_and_bad_inputs_one_line_each(runs, tmp_path):
    image = write_image(tmp_path / "two.png", size=(80, 160))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([
        {"file_name": "two.png", "bbox": [5, 10, 60, 65], "score": 0.9},
        {"file_name": "two.png", "bbox": [90, 5, 60, 70], "score": 0.8},
        {"file_name": "two.png", "bbox": [400, 400, 10, 10], "score": 0.99}]))
    out = tmp_path / "r.json"
    result = invoke([image, "--model", runs["chainer"], "--boxes", boxes, "--save-json", out])
    one_line(result, "outside the 160 x 80 image")
    assert result.exit_code == 2
    entries = check_coco_results(json.loads(out.read_text()), MANIFEST.num_joints,
                                 {str(image)})
    assert [e["bbox"] for e in entries] == [[5, 10, 60, 65], [90, 5, 60, 70]]
    assert [e["person"] for e in entries] == [0, 1] and [e["score"] for e in entries] == [0.9, 0.8]
    # an l2 run predicts no scales: v is 1
    assert all(v == 1 for e in entries for v in e["keypoints"][2::3])
    first, second = (np.reshape(e["keypoints"], (-1, 3))[:, 0].mean() for e in entries)
    assert first < second  # each person's pose comes from its own box

    # --max-people keeps the best
    result = invoke([image, "--model", runs["chainer"], "--boxes", boxes, "--max-people", "1",
                     "--save-json", out, "--min-score", "0.85"])
    assert [e["bbox"] for e in json.loads(out.read_text())] == [[5, 10, 60, 65]]

    before = out.read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,x,y,w,h\ntwo.png,1,2,3\n")
    for args, words in [
        ([image, "--boxes", bad], "line 2: needs file_name, x, y, w, h"),
        ([tmp_path / "nothing-here"], "no such file"),
        ([str(tmp_path / "*.gif")], "the pattern matches no file"),
        ([image, "--detector", "hog", "--boxes", boxes], "give one way of finding the people"),
        ([image, "--detector-weights", boxes], "--detector-weights is for --detector torchvision"),
    ]:
        result = invoke([*args, "--model", runs["chainer"], "--save-json", out])
        one_line(result, words)
        assert result.exit_code in (1, 2)
        assert out.read_text() == before  # nothing half-written, nothing overwritten
    (tmp_path / "empty").mkdir()
    result = invoke([tmp_path / "empty", "--model", runs["chainer"]])
    one_line(result, "no images or videos in this folder")


@pytest.mark.slow
def test_torchvision_detector_with_a_test_made_weights_file(runs, tmp_path):
    import torch
    from torchvision.models import detection

    from deeppose_cli.apps.detectors import TORCHVISION_MODEL

    torch.manual_seed(0)
    net = getattr(detection, TORCHVISION_MODEL)(weights=None, weights_backbone=None,
                                                num_classes=91)
    with torch.no_grad():  # an untrained detector that calls every proposal a person
        net.roi_heads.box_predictor.cls_score.bias[1] = 20.0
    weights = tmp_path / "detector.pth"
    torch.save(net.state_dict(), weights)
    image = write_image(tmp_path / "street.png", size=(120, 160))
    out = tmp_path / "r.json"
    result = invoke([image, "--model", runs["pytorch"], "--detector", "torchvision",
                     "--detector-weights", weights, "--min-score", "0", "--max-people", "3",
                     "--save-json", out])
    assert result.exit_code == 0, result.output
    entries = check_coco_results(json.loads(out.read_text()), MANIFEST.num_joints,
                                 {str(image)})
    # an untrained detector's boxes: as many as allowed, inside the image, best first
    assert 1 <= len(entries) <= 3
    for e in entries:
        x, y, w, h = e["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 160 + 1e-3 and y + h <= 120 + 1e-3
    assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)

    class Payload:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Payload()))
    wrong = tmp_path / "wrong.pth"
    torch.save({"layer.weight": torch.zeros(2)}, wrong)
    for path, words in [(evil, "not a PyTorch weights file that loads as plain data"),
                        (wrong, f"not the weights of {TORCHVISION_MODEL}")]:
        result = invoke([image, "--model", runs["pytorch"], "--detector", "torchvision",
                         "--detector-weights", path])
        assert result.exit_code == 1
        one_line(result, words)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_python_api(runs, tmp_path):
    import warnings

    import deeppose_cli
    from deeppose_cli import PoseModel, PoseResult

    model = PoseModel(runs["pytorch"])
    assert model.has_confidence and model.joint_names == MANIFEST.joint_names
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = model.predict_image(image, boxes=[[0, 0, 50, 80], [60, 10, 50, 70]])
    assert isinstance(result, PoseResult) and len(result.people) == 2
    person = result.people[0]
    assert person.joints.shape == (14, 2) and person.confidence.shape == (14,)
    assert np.all((person.confidence >= 0) & (person.confidence <= 1))
    assert result.plot().shape == image.shape
    assert [e["bbox"] for e in result.to_coco()] == [[0, 0, 50, 80], [60, 10, 50, 70]]

    write_image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"nope")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = deeppose_cli.predict(tmp_path, model=runs["chainer"])
    assert [r.source.name for r in results] == ["a.png"]
    assert len(results[0].people) == 1 and results[0].people[0].confidence is None
    assert any("b.png" in str(w.message) for w in caught)


class FakeCamera:
    """``cv2.VideoCapture`` for the tests: given an int (a camera index) it plays a
    test-made video, sending this process Ctrl-C (SIGINT) after ``interrupt_after`` frames
    when that is set; given anything else it is OpenCV's own."""

    def __init__(self, real, video: Path, interrupt_after: int | None = None):
        self.real, self.video, self.interrupt_after = real, video, interrupt_after
        self.opened: list = []

    def __call__(self, source, *args):
        if not isinstance(source, int):
            return self.real(source, *args)
        self.opened.append(source)
        capture = self.real(str(self.video))
        if source != 0:  # no such camera
            capture.release()
            return capture
        outer, reads = self, []
        original_read = capture.read

        class Camera:
            def read(self):
                reads.append(1)
                if outer.interrupt_after is not None and len(reads) == outer.interrupt_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C
                return original_read()

            def __getattr__(self, name):
                return getattr(capture, name)

        return Camera()


def test_camera_frames_until_ctrl_c_or_max_frames(tmp_path, monkeypatch):
    import cv2

    from deeppose_cli.apps.sources import camera_source

    video = write_video(tmp_path / "camera.mp4", frames=10)
    fake = FakeCamera(cv2.VideoCapture, video)
    monkeypatch.setattr(cv2, "VideoCapture", fake)
    frames = list(read_frames([camera_source(0)], every=2))
    assert [(f.source, f.frame) for f in frames] == [(Path("camera0"), k)
                                                     for k in (0, 2, 4, 6, 8)]
    assert frames[0].image.shape == (48, 64, 3) and frames[0].fps == pytest.approx(10.0)
    assert [f.frame for f in read_frames([camera_source(0)], max_frames=3)] == [0, 1, 2]
    assert list(read_frames([camera_source(1)])) == [
        SourceFailure("camera 1", "cannot be opened (no such camera, or it is in use)")]

    import signal

    before = signal.getsignal(signal.SIGINT)
    fake.interrupt_after = 4  # Ctrl-C while the 4th frame is read: it is the last one
    got = list(read_frames([camera_source(0)]))
    assert [f.frame for f in got] == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is back to what it was


@pytest.mark.slow
def test_camera_and_a_truncated_video_through_the_command(tmp_path, monkeypatch):
    """The shipped model on a camera stopped with Ctrl-C (outputs written, exit 0) and a
    truncated video among other sources (one line, the rest predicted, exit 2)."""
    import cv2

    video = write_video(tmp_path / "camera.mp4", frames=10, size=(96, 80))
    monkeypatch.setattr(cv2, "VideoCapture", FakeCamera(cv2.VideoCapture, video, 6))
    out, table = tmp_path / "poses.json", tmp_path / "poses.csv"
    result = invoke(["--camera", "0", "--model", "lspet-small", "--save-json", out,
                     "--save-csv", table, "--draw", "--out", tmp_path / "drawn"])
    assert result.exit_code == 0, result.output
    assert_no_escaped_exception(result)
    entries = json.loads(out.read_text())
    assert [(e["file_name"], e["frame"]) for e in entries] == [("camera0", k) for k in range(6)]
    assert len(list(csv.DictReader(table.open(newline="")))) == 6 * 14
    assert frame_count(tmp_path / "drawn" / "camera0_pose.mp4") == 6

    result = invoke(["--camera", "0", "--max-frames", "2", "--model", "lspet-small",
                     "--save-json", out])
    assert result.exit_code == 0, result.output
    assert [e["frame"] for e in json.loads(out.read_text())] == [0, 1]

    decodable = write_truncated_video(tmp_path / "cut.avi")
    image = write_image(tmp_path / "after.png", size=(80, 60))
    result = invoke([tmp_path / "cut.avi", image, "--model", "lspet-small", "--save-json", out])
    assert result.exit_code == 2
    one_line(result, f"cut.avi frame {decodable}: could not be decoded")
    assert sum(line.startswith("Error") for line in result.output.splitlines()) == 1
    entries = json.loads(out.read_text())
    assert [(Path(e["file_name"]).name, e["frame"]) for e in entries] == [
        ("cut.avi", k) for k in range(decodable)] + [("after.png", None)]

    result = invoke(["--model", "lspet-small"])
    assert result.exit_code == 2 and "give at least one SOURCE, or --camera N" in result.output


def test_csv_has_a_row_per_frame_person_and_joint():
    from deeppose_cli.apps.predict import Person, PoseResult, csv_text

    names = ("ankle", "knee", "hip")
    joints = np.array([[1.0, 2.0], [3.5, 4.25], [5.0, 6.0]])
    image = PoseResult(Path("photos/a.jpg"), None, 1, 100, 80, names,
                       [Person([0, 0, 100, 80], 1.0, [0, -10, 100, 100], joints)])
    frame = PoseResult(Path("clip.mp4"), 7, 2, 100, 80, names,
                       [Person([10, 5, 20, 40], 0.9, [0, 0, 50, 50], joints + 10,
                               np.array([0.5, float("nan"), 1.0])),
                        Person([50, 5, 20, 40], 0.6, [40, 0, 50, 50], joints + 50,
                               np.array([0.25, 0.75, 0.0]))])
    empty = PoseResult(Path("clip.mp4"), 8, 3, 100, 80, names, [])
    rows = list(csv.reader(io.StringIO(csv_text([image, frame, empty], names))))
    assert rows[0] == ["source", "frame", "image_id", "person", "score", "box_x", "box_y",
                       "box_w", "box_h", "joint", "x", "y", "confidence"]
    rows = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(rows) == 3 * 3  # 3 people x 3 joints; the frame with nobody has no row
    assert [(r["source"], r["frame"], int(r["image_id"]), int(r["person"]), r["joint"])
            for r in rows] == [
        ("photos/a.jpg", "", 1, 0, "ankle"), ("photos/a.jpg", "", 1, 0, "knee"),
        ("photos/a.jpg", "", 1, 0, "hip"),
        ("clip.mp4", "7", 2, 0, "ankle"), ("clip.mp4", "7", 2, 0, "knee"),
        ("clip.mp4", "7", 2, 0, "hip"),
        ("clip.mp4", "7", 2, 1, "ankle"), ("clip.mp4", "7", 2, 1, "knee"),
        ("clip.mp4", "7", 2, 1, "hip")]
    got = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    np.testing.assert_allclose(got, np.concatenate([joints, joints + 10, joints + 50]))
    assert [r["confidence"] for r in rows[:3]] == ["", "", ""]  # a model without confidence
    assert [float(r["confidence"]) if r["confidence"] else None for r in rows[3:]] == [
        0.5, None, 1.0, 0.25, 0.75, 0.0]
    assert [float(rows[k][c]) for k in (0, 3, 6) for c in ("score", "box_x", "box_w")] == [
        1.0, 0.0, 100.0, 0.9, 10.0, 20.0, 0.6, 50.0, 20.0]


def test_a_box_prints_in_whole_pixels_and_draw_outlines_it():
    from deeppose_cli.apps.drawing import draw_people
    from deeppose_cli.apps.predict import Person

    person = Person([-0.4, 10.2, 40.0, 30.0], 1.0, [0, 0, 40, 40], np.full((14, 2), 20.0))
    assert person.box_text == "x 0, y 10, 40 x 30"
    drawn = draw_people(np.zeros((60, 60, 3), np.uint8), [(person.box, person.joints)], ())
    assert drawn[10, 5].any() and drawn[39, 5].any() and drawn[25, 0].any()  # the outline
    assert not drawn[25, 5].any()  # inside the outline stays as it was
