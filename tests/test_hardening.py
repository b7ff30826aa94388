"""Faults and bad input: nothing is lost, nothing half-written, every refusal one clear line.

Each bad-input case also runs once as a real ``deeppose`` process, because CliRunner keeps an
escaped exception in ``result.exception`` instead of printing its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.files import atomic_write_text, sha256_of

DEEPPOSE = str(Path(sys.executable).with_name("deeppose"))


def tiny_train_args(index_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train-stage", "1", "--framework", "pytorch", "--dataset", "synthetic",
            "--train", str(index_dir / "train.jsonl"), "--val", str(index_dir / "val.jsonl"),
            "--out", str(out), "--input-size", "67", "--width", "0.125", "--batch-size", "4",
            "--quiet", *extra]


def run_cli(*argv: str, umask: int = -1) -> subprocess.CompletedProcess:
    """``deeppose ARGV`` as a real process (so a traceback would be printed, not kept)."""
    return subprocess.run([DEEPPOSE, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, umask=umask)


def assert_refused(result: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert message in output, output
    assert "Traceback" not in output, output


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_of(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset, tmp_path_factory):
    """A finished tiny stage-1 run (2 iterations)."""
    _, index_dir = synthetic_dataset
    out = tmp_path_factory.mktemp("runs") / "stage1"
    result = CliRunner().invoke(main, tiny_train_args(index_dir, out, "--max-iterations", "2"))
    assert result.exit_code == 0 and result.exception is None, result.output
    return out


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------- item 3: no lost models

def test_a_failing_retrain_keeps_the_earlier_model(finished_run, synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    # An index whose second image exists but cannot be decoded: found only when a batch
    # loads it, after the run directory was prepared.
    lines = (index_dir / "train.jsonl").read_text().splitlines()[:8]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    record = json.loads(lines[1])
    record["image"] = str(broken)
    lines[1] = json.dumps(record)
    train = tmp_path / "train.jsonl"
    for line_no, line in enumerate(lines):  # make the relative image paths absolute
        obj = json.loads(line)
        if not Path(obj["image"]).is_absolute():
            obj["image"] = str((index_dir / obj["image"]).resolve())
        lines[line_no] = json.dumps(obj)
    train.write_text("\n".join(lines) + "\n")
    args = tiny_train_args(index_dir, out, "--max-iterations", "4", "--seed", "7")
    args[args.index("--train") + 1] = str(train)
    result = run_cli(*args)
    assert_refused(result, "broken.jpg: not an image OpenCV can read")
    assert snapshot(out) == before  # model, run.json, log and checkpoint all intact


def test_an_interrupted_retrain_keeps_the_earlier_model_and_resumes(
        finished_run, synthetic_dataset, tmp_path, monkeypatch):
    from deeppose_cli.engines import torch_engine

    _, index_dir = synthetic_dataset
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    real_save = torch_engine.TorchEngine.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_engine.TorchEngine, "save_checkpoint", save_then_interrupt)
    args = tiny_train_args(index_dir, out, "--max-iterations", "6", "--seed", "7")
    interrupted = CliRunner().invoke(main, args)
    assert interrupted.exit_code == 130, interrupted.output
    assert f"--resume --out {out}" in interrupted.output
    assert snapshot(out) == before
    assert (tmp_path / "run.next" / "checkpoint.pt").is_file()

    monkeypatch.setattr(torch_engine.TorchEngine, "save_checkpoint", real_save)
    resumed = CliRunner().invoke(main, ["train-stage", "1", "--framework", "pytorch", "--out",
                                        str(out), "--resume", "--quiet"])
    assert resumed.exit_code == 0 and resumed.exception is None, resumed.output
    assert not (tmp_path / "run.next").exists()
    assert not any(p.name.endswith(".replaced") for p in tmp_path.iterdir())
    meta = json.loads((out / "run.json").read_text())
    assert meta["complete"] and json.loads((out / "recipe.json").read_text())["seed"] == 7
    assert sha256_of(out / "model.pt") == meta["model_sha256"]
    assert [json.loads(l)["iteration"] for l in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)][-1] == 6


def test_an_interruption_before_any_checkpoint_says_nothing_is_lost(
        finished_run, synthetic_dataset, tmp_path, monkeypatch):
    from deeppose_cli.engines import torch_engine

    _, index_dir = synthetic_dataset
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_engine.TorchEngine, "step", interrupt)
    result = CliRunner().invoke(main, tiny_train_args(index_dir, out, "--max-iterations", "6"))
    assert result.exit_code == 130
    assert "nothing to resume" in result.output and "unchanged" in result.output
    assert snapshot(out) == before


# -------------------------------------------------------------- item 4: one run per --out

def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(synthetic_dataset,
                                                                   tmp_path):
    _, index_dir = synthetic_dataset
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from deeppose_cli.training.rundir import RunLock\n"
         f"with RunLock({str(out)!r}):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli(*tiny_train_args(index_dir, out, "--max-iterations", "2"))
        assert_refused(result, f"{out} is in use by another training run (pid {holder.pid} ")
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the killed holder's lock: no stale lock to clean up.
    after = CliRunner().invoke(main, tiny_train_args(index_dir, out, "--max-iterations", "2"))
    assert after.exit_code == 0 and after.exception is None, after.output


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    from deeppose_cli.training.rundir import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(DeepPoseError, match="in use by another training run"):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released on exit
        pass


# --------------------------------------------------------- item 6: images that are bombs

def bomb_png(path: Path, side: int) -> None:
    """A real 1-bit PNG of side x side black pixels: ~100 kB on disk, side^2 * 3 bytes once
    decoded to BGR (2.7 GB at 30000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 500) for _ in range(side // 500)) + \
        packer.compress(row * (side % 500)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side,
                                                                        1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_decompression_bomb_image_is_refused_before_decoding(tmp_path):
    from deeppose_cli.core.images import read_bgr

    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 30000)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DeepPoseError, match="30000 x 30000 pixels is more than the 100,000,000"):
        read_bgr(bomb)


def test_the_pixel_bound_can_be_changed_and_applies_to_every_format(tmp_path, monkeypatch):
    import cv2

    from deeppose_cli.core.images import read_bgr

    image = np.zeros((30, 40, 3), np.uint8)
    for ext in ("png", "jpg", "bmp", "webp", "tiff"):
        cv2.imwrite(str(tmp_path / f"a.{ext}"), image)
    monkeypatch.setenv("DEEPPOSE_MAX_IMAGE_PIXELS", "1200")
    for ext in ("png", "jpg", "bmp", "webp", "tiff"):
        assert read_bgr(tmp_path / f"a.{ext}").shape == (30, 40, 3)
    monkeypatch.setenv("DEEPPOSE_MAX_IMAGE_PIXELS", "1199")
    for ext in ("png", "jpg", "bmp", "webp", "tiff"):  # tiff: caught after decoding
        with pytest.raises(DeepPoseError, match="40 x 30 pixels is more than the 1,199"):
            read_bgr(tmp_path / f"a.{ext}")


def test_predict_refuses_a_bomb_without_traceback(finished_run, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 30000)
    result = run_cli("predict", str(bomb), "--model", str(finished_run))
    assert_refused(result, "bomb.png: 30000 x 30000 pixels is more than", code=2)


# --------------------------------------------------- item 7: bad annotations found early

def test_every_bad_index_line_is_reported_before_training(synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    good = [json.loads(l) for l in (index_dir / "train.jsonl").read_text().splitlines()[:6]]
    for record in good:
        record["image"] = str((index_dir / record["image"]).resolve())
    lines = [json.dumps(r) for r in good]
    lines[1] = lines[1].replace(str(good[1]["joints"][0][0]), "NaN", 1)
    bad_box = dict(good[2], box=[0, 0, 1e999, 10])  # json writes Infinity
    lines[2] = json.dumps(bad_box)
    lines[3] = json.dumps(dict(good[3], joints=good[3]["joints"][:5],
                               visible=good[3]["visible"][:5]))
    lines[4] = json.dumps(dict(good[4], image=str(tmp_path / "gone.jpg")))
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = tiny_train_args(index_dir, out, "--max-iterations", "2")
    args[args.index("--train") + 1] = str(train)
    result = run_cli(*args)
    assert_refused(result, "train.jsonl: 4 invalid record(s)")
    output = result.stderr
    assert f"{train}:2: NaN is not a valid number" in output
    assert f"{train}:3: Infinity is not a valid number" in output
    assert f"{train}:4: 5 joints, the skeleton has" in output
    assert f"{train}:5: image {tmp_path / 'gone.jpg'} not found" in output
    assert not out.exists()  # refused before the run directory was touched


def test_index_skips_nan_joints_and_truncated_jpegs(tmp_path):
    import cv2
    import scipy.io

    from deeppose_cli.data.annotations import build_index, read_index
    from deeppose_cli.core.manifests import load_dataset_manifest
    from conftest import write_lsp_like

    root = write_lsp_like(tmp_path / "lspet", "lspet", 12)
    joints = scipy.io.loadmat(str(root / "joints.mat"))["joints"]
    joints[0, 0, 2] = np.nan        # image 3: a visible joint at NaN -> skipped
    assert joints[0, 2, 2] == 1
    joints[5, 1, 3] = np.inf        # image 4: an invisible one -> kept, coordinates zeroed
    joints[5, 2, 3] = 0
    scipy.io.savemat(str(root / "joints.mat"), {"joints": joints})
    image = sorted((root / "images").iterdir())[4]  # image 5: cut in half
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(image)) is not None  # OpenCV alone would accept it

    report = build_index(load_dataset_manifest("lspet"), root, val_fraction=0.0)
    reasons = {s["id"]: s["reason"] for s in report.skipped}
    assert reasons[sorted((root / "images").iterdir())[2].stem] == "non-finite joint coordinates"
    assert reasons[image.stem] == "truncated JPEG (no end-of-image marker)"
    skipped_file = [json.loads(l) for l in (report.index_dir / "skipped.jsonl").read_text()
                    .splitlines()]
    assert {s["reason"] for s in skipped_file} >= {"truncated JPEG (no end-of-image marker)"}
    records = read_index(report.index_dir / "train.jsonl")  # valid JSON, no NaN written
    assert len(records) == 10


# ----------------------------------------------------- item 8: no tracebacks for users

@pytest.mark.parametrize("bbox", ["nan,nan,nan,nan", "inf,0,10,10", "0,0,1e308,1e308"])
def test_predict_bad_bbox_is_one_line(finished_run, tmp_path, bbox):
    import cv2

    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), np.zeros((40, 30, 3), np.uint8))
    result = run_cli("predict", str(photo), "--model", str(finished_run), "--bbox", bbox)
    assert_refused(result, "--bbox must be X,Y,W,H: four finite numbers")


def test_joints_mat_of_strings_is_one_line(tmp_path):
    import scipy.io

    from conftest import write_lsp_like

    root = write_lsp_like(tmp_path / "lspet", "lspet", 3)
    scipy.io.savemat(str(root / "joints.mat"), {"joints": np.array([["a", "b"], ["c", "d"]])})
    data_root = tmp_path
    result = run_cli("index", "lspet", "--root", str(data_root))
    assert_refused(result, "`joints` must hold numbers")


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected a JSON object, found list"),
    ('{"stage": 1, "model_file": "model.pt"}', "framework must be one of"),
    ('{"framework": "pytorch", "stage": "one", "model_file": "model.pt"}', "stage must be"),
])
def test_damaged_run_json_is_one_line(finished_run, tmp_path, content, message):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "run.json").write_text(content)
    for argv in (["predict", str(tmp_path / "x.jpg"), "--model", str(run)],
                 ["evaluate", "--model", str(run), "--index", str(tmp_path / "i.jsonl")]):
        assert_refused(run_cli(*argv), f"{run / 'run.json'} is not a valid run description: "
                                       f"{message}")


def test_a_damaged_model_is_described_as_damaged(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    with open(run / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8)
    result = run_cli("predict", str(tmp_path / "x.jpg"), "--model", str(run))
    assert_refused(result, f"does not match the checksum in {run / 'run.json'}")
    assert "changed or damaged after training" in result.stderr


# -------------------------------------------------------------------- item 10: file modes

@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "file.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == mode


def test_a_run_directory_is_group_writable_under_a_group_umask(synthetic_dataset, tmp_path):
    _, index_dir = synthetic_dataset
    out = tmp_path / "run"
    result = run_cli(*tiny_train_args(index_dir, out, "--max-iterations", "2"), umask=0o002)
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert {"run.json", "recipe.json", "model.pt", "checkpoint.pt"} <= set(modes)
    assert set(modes.values()) == {0o664}, modes


# ------------------------------------------------------ items 5 and 6: fetch as a process

def test_a_cached_web_page_is_discarded_and_the_failure_says_what_to_do(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "lsp_dataset.zip").write_text("<!DOCTYPE html><html>moved</html>")
    # Port 9 (discard) refuses connections here: every mirror fails.
    result = run_cli("fetch", "lsp", "--root", str(tmp_path), "--url",
                     "http://127.0.0.1:9/lsp_dataset.zip")
    assert_refused(result, "was unusable (a web page, not the archive) and was deleted")
    assert "deeppose fetch lsp --archive" in result.stderr
    assert "http://sam.johnson.io/research/lsp.html" in result.stderr
    assert not (downloads / "lsp_dataset.zip").exists()


def test_a_zip_bomb_is_refused_and_leaves_no_dataset(tmp_path):
    import zipfile

    bomb = tmp_path / "lsp_dataset.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("joints.mat", b"")
        with archive.open("images/zeros.bin", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    result = run_cli("fetch", "lsp", "--root", str(tmp_path / "data"), "--archive", str(bomb),
                     "--max-extract-gib", "0.01")
    assert_refused(result, "more than the limit of 10.2 MiB")
    assert "--max-extract-gib" in result.stderr
    assert not (tmp_path / "data" / "lsp").exists() or \
        not any((tmp_path / "data" / "lsp").glob("images/*"))
