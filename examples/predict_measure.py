"""Measure `deeppose predict` on real photos (docs/predict.md#measured-on-lspet-val):

(a) recall of the hog person detector on LSPET val people and its speed;
(b) PDJ@0.2 of a cascade on "zoomed out" val images (each image at half size in a frame
    twice as wide and high, the rest filled with its reflection) given the ground-truth box,
    hog's best box, or the whole image as the person box;
(c) throughput of the `deeppose predict` command on a folder of val images and on a video
    made of them (30 fps).

Run it single-threaded (OMP_NUM_THREADS=1) on an index made with
`deeppose fetch lspet --archive lspet_dataset_dev.zip index lspet --seed 0`:

    python examples/predict_measure.py DATA/lspet/index/val.jsonl --model lspet-small

It prints a JSON report (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def iou(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def joints_rectangle(joints: np.ndarray, visible: np.ndarray) -> list[float]:
    """The tight (x, y, w, h) rectangle of the visible joints (the person without margin)."""
    pts = joints[visible.astype(bool)]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return [float(lo[0]), float(lo[1]), float(max(hi[0] - lo[0], 1.0)),
            float(max(hi[1] - lo[1], 1.0))]


def zoom_out(image: np.ndarray, rng: np.random.Generator):
    """``image`` at half size at a random place in a frame twice as wide and high, the
    rest filled with its reflection; returns the frame and the map of an original pixel
    coordinate (x, y) into it."""
    import cv2

    h, w = image.shape[:2]
    hw, hh = max(1, round(w / 2)), max(1, round(h / 2))
    small = cv2.resize(image, (hw, hh), interpolation=cv2.INTER_AREA)
    ox = int(rng.integers(0, 2 * w - hw + 1))
    oy = int(rng.integers(0, 2 * h - hh + 1))
    frame = np.pad(small, ((oy, 2 * h - hh - oy), (ox, 2 * w - hw - ox), (0, 0)),
                   mode="symmetric")
    sx, sy = hw / w, hh / h

    def point(xy: np.ndarray) -> np.ndarray:  # pixel centres at integers
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([ox + (xy[..., 0] + 0.5) * sx - 0.5,
                         oy + (xy[..., 1] + 0.5) * sy - 0.5], axis=-1)

    return frame, point, (sx, sy)


def pdj_at(pred, gt, visible, torso_pair, alpha=0.2) -> float:
    from deeppose_cli.core.metrics import pdj

    return pdj(np.asarray(pred), np.asarray(gt), np.asarray(visible, dtype=bool),
               torso_pair).at(alpha)[0]


def predict_crops(model, images_rgb, crops, chunk=64) -> np.ndarray:
    """The cascade's final joints (N, J, 2) for each image and its stage-1 crop (cx, cy,
    s, s)."""
    from deeppose_cli.core.cascade import cascade_predictions

    out = []
    for start in range(0, len(images_rgb), chunk):
        per_stage = cascade_predictions(model.cascade, images_rgb[start:start + chunk],
                                        np.asarray(crops[start:start + chunk]),
                                        model.manifest.torso_diameter, model.chunk)
        out.append(per_stage[-1].coords)
    return np.concatenate(out)


def detector_recall(records, detect) -> dict:
    """(a): hog on the original val images."""
    from deeppose_cli.core.geometry import box_to_xywh
    from deeppose_cli.core.images import read_bgr

    found_any, hits = 0, {0.0: [0, 0], 0.5: [0, 0]}  # min score -> [person, crop] hits
    seconds = 0.0
    for r in records:
        image = read_bgr(r.image)
        start = time.perf_counter()
        detections = detect(image)
        seconds += time.perf_counter() - start
        found_any += bool(detections)
        person = joints_rectangle(r.joints, r.visible)
        crop = box_to_xywh(r.box)
        for min_score, counts in hits.items():
            kept = [d for d in detections if d.score >= min_score]
            counts[0] += any(iou(d.box, person) >= 0.5 for d in kept)
            counts[1] += any(iou(box_to_xywh(d.crop), crop) >= 0.5 for d in kept)
    n = len(records)
    return {"images": n, "images_with_a_detection": found_any,
            "recall_person_box": {str(s): c[0] / n for s, c in hits.items()},
            "recall_crop_box": {str(s): c[1] / n for s, c in hits.items()},
            "detector_seconds": round(seconds, 2),
            "detector_images_per_s": round(n / seconds, 2)}


def zoomed_out_pdj(records, model, detect, seed: int) -> dict:
    """(b): the cascade on zoomed-out images with three person boxes (and on the original
    images with the ground-truth box, for reference)."""
    import cv2

    from deeppose_cli.apps.detectors import whole_image
    from deeppose_cli.core.images import read_bgr

    rng = np.random.default_rng(seed)
    originals, zoomed, gt, visible = [], [], [], []
    crops = {"original_gt_box": [], "original_whole_image": [], "gt_box": [],
             "hog_best_box_else_whole_image": [], "whole_image": []}
    no_detection = 0
    detection_seconds = 0.0
    hog_found = []
    for r in records:
        bgr = read_bgr(r.image)
        frame, point, (sx, sy) = zoom_out(bgr, rng)
        originals.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        zoomed.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        gt.append(point(r.joints))
        visible.append(r.visible)
        crops["original_gt_box"].append(np.asarray(r.box, dtype=np.float64))
        crops["original_whole_image"].append(whole_image(bgr.shape[1], bgr.shape[0]).crop)
        cx, cy = point(np.asarray(r.box[:2]))
        crops["gt_box"].append(np.array([cx, cy, r.box[2] * sx, r.box[3] * sy]))
        height, width = frame.shape[:2]
        start = time.perf_counter()
        detections = sorted(detect(frame), key=lambda d: -d.score)
        detection_seconds += time.perf_counter() - start
        hog_found.append(bool(detections))
        if not detections:
            no_detection += 1
        crops["hog_best_box_else_whole_image"].append(detections[0].crop if detections
                                     else whole_image(width, height).crop)
        crops["whole_image"].append(whole_image(width, height).crop)
    gt, visible = np.stack(gt), np.stack(visible)
    torso = model.manifest.torso_diameter
    results = {}
    timings = {}
    for name, boxes in crops.items():
        start = time.perf_counter()
        original = name.startswith("original")
        pred = predict_crops(model, originals if original else zoomed, boxes)
        timings[name] = round(time.perf_counter() - start, 2)
        if original:
            originals_gt = np.stack([r.joints for r in records])
            results[name] = pdj_at(pred, originals_gt, visible, torso)
            continue
        results[name] = pdj_at(pred, gt, visible, torso)
        if name == "hog_best_box_else_whole_image":
            # as `predict --detector hog` does: an image where hog found no one has no
            # pose, its joints count as missed
            missed = pred.copy()
            missed[~np.asarray(hog_found)] = np.nan
            results["hog_best_box"] = pdj_at(
                np.nan_to_num(missed, nan=-1e9), gt, visible, torso)
    return {"images": len(records), "pdj_at_0.2": {k: round(v, 4) for k, v in results.items()},
            "hog_found_no_one": no_detection,
            "note": "hog_best_box: hog's best scoring box at any score, the joints of an "
                    "image where it found no one counted as missed; original_*: the images "
                    "as they are",
            "hog_seconds": round(detection_seconds, 2), "cascade_seconds": timings}


SUMMARY = re.compile(r"(\d+) images/frames, (\d+) people, ([\d.]+) images/s")


def run_command(args: list[str]) -> dict:
    """`deeppose predict ARGS` in a subprocess: its summary line's rate and the wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deeppose_cli", "predict", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = SUMMARY.search(done.stderr)
    if done.returncode != 0 or not match:
        raise SystemExit(f"predict failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"frames": int(match[1]), "people": int(match[2]),
            "images_per_s": float(match[3]), "wall_s": round(wall, 1)}


def throughput(records, model_name: str, video_frames: int, work: Path) -> dict:
    """(c): the command on a folder of the images and on a video made of them."""
    import cv2

    from deeppose_cli.core.images import read_bgr

    folder = work / "images"
    folder.mkdir()
    for r in records:
        os.symlink(os.path.abspath(r.image), folder / Path(r.image).name)
    video = work / "val.mp4"
    size = (640, 480)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
    for k in range(video_frames):
        image = read_bgr(records[k % len(records)].image)
        h, w = image.shape[:2]
        scale = min(size[0] / w, size[1] / h)
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))))
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        y, x = (size[1] - small.shape[0]) // 2, (size[0] - small.shape[1]) // 2
        frame[y:y + small.shape[0], x:x + small.shape[1]] = small
        writer.write(frame)
    writer.release()
    common = ["--model", model_name, "--save-json", str(work / "out.json")]
    return {"folder": {"images": len(records), **run_command([str(folder), *common])},
            "video": {"frames": video_frames, "fps": 30, "size": list(size),
                      **run_command([str(video), *common])}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=Path, help="val.jsonl of `deeppose index lspet`")
    parser.add_argument("--model", default="lspet-small")
    parser.add_argument("--limit", type=int, help="the first N records only")
    parser.add_argument("--video-frames", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0, help="placement of the zoomed images")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["recall", "zoomed", "throughput"])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    from deeppose_cli.apps.detectors import hog_detector
    from deeppose_cli.apps.predict import PoseModel
    from deeppose_cli.data.annotations import read_index

    records = read_index(args.index)[:args.limit]
    model = PoseModel(args.model)
    detect = hog_detector()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    report = {"model": args.model, "index": str(args.index), "records": len(records),
              "commit": commit, "threads": os.environ.get("OMP_NUM_THREADS")}
    if "recall" not in args.skip:
        report["hog_recall"] = detector_recall(records, detect)
        print(json.dumps(report["hog_recall"]), file=sys.stderr)
    if "zoomed" not in args.skip:
        report["zoomed_out"] = zoomed_out_pdj(records, model, detect, args.seed)
        print(json.dumps(report["zoomed_out"]), file=sys.stderr)
    if "throughput" not in args.skip:
        with tempfile.TemporaryDirectory() as work:
            report["throughput"] = throughput(records, args.model, args.video_frames,
                                              Path(work))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
