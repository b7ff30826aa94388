"""Faults and bad input, second round: odd paths, writes outside --out, symlinked locks,
runs replaced under a reader, decoders tricked past the size guard, full and read-only file
systems, killed writers, values accepted that mean nothing.

A fault that is a crash, a hang or a signal runs as a real ``deeppose`` process; so do the
read-only and full file systems, made for real in a private mount namespace (``unshare``:
tmpfs of a few KiB, read-only bind mounts) and skipped where the kernel does not allow one.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.core.errors import DeepPoseError

from conftest import assert_no_escaped_exception
from test_hardening import DEEPPOSE, assert_refused, copy_run, snapshot

FRAMEWORKS = ("pytorch", "chainer")


def run_cli(*argv: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``deeppose ARGV`` as a real process (a crash or a traceback shows); output bytes that
    are not UTF-8 (file names) read as surrogate escapes."""
    return subprocess.run([DEEPPOSE, *argv], capture_output=True, encoding="utf-8",
                          errors="surrogateescape", timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def tiny_args(framework: str, train: Path, out: Path, *extra: str) -> list[str]:
    return ["train-stage", "1", "--framework", framework, "--dataset", "synthetic",
            "--train", str(train), "--out", str(out), "--input-size", "67", "--width",
            "0.0625", "--batch-size", "4", "--quiet", *extra]


def invoke(*argv: str):
    """``deeppose ARGV`` in this process; an exception escaping the command fails the test."""
    result = CliRunner().invoke(main, list(argv))
    assert_no_escaped_exception(result)
    return result


def refused(result, message: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output, result.output


@pytest.fixture(scope="module")
def small_index(synthetic_dataset, tmp_path_factory) -> Path:
    """The first 8 training records of the synthetic dataset, image paths absolute."""
    _, index_dir = synthetic_dataset
    records = [json.loads(line) for line in
               (index_dir / "train.jsonl").read_text().splitlines()[:8]]
    for record in records:
        record["image"] = str((index_dir / record["image"]).resolve())
    path = tmp_path_factory.mktemp("index") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records_of(index: Path) -> list[dict]:
    return [json.loads(line) for line in index.read_text().splitlines()]


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def runs(small_index, tmp_path_factory) -> dict[str, Path]:
    """A finished tiny stage-1 run (2 iterations) of each framework."""
    made = {}
    for framework in FRAMEWORKS:
        out = tmp_path_factory.mktemp("runs") / framework
        result = invoke(*tiny_args(framework, small_index, out, "--max-iterations", "2"))
        assert result.exit_code == 0, result.output
        made[framework] = out
    return made


@pytest.fixture
def photo(tmp_path) -> Path:
    import cv2

    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8))
    return path


# ------------------------------------------------------------------ mount namespaces


def _namespace_command(script: str) -> list[str]:
    return ["unshare", "--mount", "--map-root-user", "sh", "-c", script]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp()
    try:
        done = subprocess.run(_namespace_command(
            f"mount -t tmpfs -o size=16k tmpfs {shlex.quote(probe)} && "
            f"mount -o remount,ro {shlex.quote(probe)}"), capture_output=True, timeout=30)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)


NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="no private mount namespace here (unshare --mount --map-root-user)")


def run_cli_mounted(*argv: str, read_only: tuple[Path, ...] = (),
                    small: tuple[tuple[Path, int], ...] = (), before: str = "",
                    listing: Path | None = None) -> subprocess.CompletedProcess:
    """``deeppose ARGV`` in a mount namespace where each of ``read_only`` is a read-only view
    of itself and each (directory, KiB) of ``small`` a tmpfs that holds only that much: the
    kernel itself answers EROFS and ENOSPC, to torch's and NumPy's writers too. ``before``
    runs first, in the namespace (to fill a small file system); ``listing`` is a directory
    whose files (recursively, hidden ones too) are printed after ``@@files``, since a tmpfs
    vanishes with its namespace."""
    steps = []
    for path in read_only:
        q = shlex.quote(str(path))
        steps += [f"mount --bind {q} {q}", f"mount -o remount,bind,ro {q}"]
    for path, kib in small:
        steps.append(f"mount -t tmpfs -o size={kib}k tmpfs {shlex.quote(str(path))}")
    if before:
        steps.append(before)
    command = " ".join(shlex.quote(a) for a in [DEEPPOSE, *argv])
    script = " && ".join(steps + ["true"]) + f" || exit 99; {command}; rc=$?"
    if listing is not None:
        script += f"; echo @@files; cd {shlex.quote(str(listing))} && find . -mindepth 1"
    script += "; exit $rc"
    return subprocess.run(_namespace_command(script), capture_output=True, encoding="utf-8",
                          errors="surrogateescape", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def listed(result: subprocess.CompletedProcess) -> list[str]:
    """The paths ``run_cli_mounted(listing=...)`` printed, relative, sorted."""
    return sorted(line[2:] for line in result.stdout.split("@@files", 1)[1].split()
                  if line.startswith("./"))


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------- item 1: paths that are not UTF-8

# A Latin-1 file name ("café"): bytes that are not UTF-8, which Python holds as a surrogate
# escape ("caf\udce9") and cv2.imread crashed on (SIGSEGV).
ODD_NAME = os.fsdecode(b"caf\xe9")


def test_predict_reads_and_draws_images_whose_paths_are_not_utf8(runs, photo, tmp_path):
    odd = tmp_path / f"{ODD_NAME}.jpg"
    shutil.copy(photo, odd)
    drawings = tmp_path / ODD_NAME
    result = run_cli("predict", str(odd), str(photo), "--model", str(runs["pytorch"]),
                     "--json", "--draw", "--out", str(drawings))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p["image"] for p in json.loads(result.stdout)] == [str(odd), str(photo)]
    assert (drawings / f"{ODD_NAME}_pose.png").is_file()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_train_stage_reads_an_index_image_whose_path_is_not_utf8(framework, small_index,
                                                                 tmp_path):
    records = records_of(small_index)
    odd = tmp_path / f"{ODD_NAME}.jpg"
    shutil.copy(records[1]["image"], odd)
    records[1]["image"] = str(odd)
    train = write_records(tmp_path / "train.jsonl", records)
    assert "\\udce9" in train.read_text()  # how JSON holds such a name
    out = tmp_path / f"run-{ODD_NAME}"
    result = run_cli(*tiny_args(framework, train, out, "--max-iterations", "2"))  # all 8
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["complete"]


def test_index_reads_a_data_root_whose_path_is_not_utf8(tmp_path):
    from conftest import write_lsp_like

    write_lsp_like(tmp_path / "plain" / "lspet", "lspet", 4)
    root = tmp_path / ODD_NAME
    (tmp_path / "plain").rename(root)
    result = run_cli("index", "lspet", "--root", str(root), "--val-fraction", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(records_of(root / "lspet" / "index" / "train.jsonl")) == 4


# ---------------------------------------------------- item 2: chain entries outside the run

@pytest.mark.parametrize("kind", ["climbs out", "absolute", "symbolic link"])
def test_chain_entries_leading_outside_the_run_are_refused_everywhere(kind, runs, small_index,
                                                                      photo, tmp_path):
    victim = copy_run(runs["pytorch"], tmp_path / "a" / "x")  # a run somewhere else
    run = copy_run(runs["pytorch"], tmp_path / "a" / "b" / "run")
    entry = {"climbs out": "../../x", "absolute": str(victim),
             "symbolic link": "chain/stage1"}[kind]
    if kind == "symbolic link":
        (run / "chain").mkdir()
        (run / "chain" / "stage1").symlink_to(victim, target_is_directory=True)
    meta = json.loads((run / "run.json").read_text())
    meta.update(stage=2, sigma=1.0, chain=[{"stage": 1, "framework": "pytorch", "dir": entry,
                                            "model_sha256": meta["model_sha256"]}])
    (run / "run.json").write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    out = tmp_path / "a" / "b" / "c" / "converted"  # its ../../x would be a/b/x
    for argv in (["convert", str(run), "--to", "chainer", "--out", str(out)],
                 ["predict", str(photo), "--model", str(run)],
                 ["evaluate", "--model", str(run), "--index", str(small_index)]):
        refused(invoke(*argv), f"chain entry 1 ({entry!r})")
    assert snapshot(tmp_path) == before  # nothing written, anywhere
    assert not (tmp_path / "a" / "b" / "x").exists() and not out.exists()


# ------------------------------------------------------- item 3: one lock per directory

def test_a_symlink_to_a_run_directory_meets_the_same_lock(tmp_path):
    from deeppose_cli.training.rundir import RunLock

    real = tmp_path / "conc" / "run"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for first, second in ((real, link), (link, real)):
        with RunLock(first):
            with pytest.raises(DeepPoseError, match="in use by another training run"):
                with RunLock(second):
                    pass


@pytest.mark.parametrize("held, given", [("real", "link"), ("link", "real")])
def test_train_stage_through_another_name_of_a_training_run_is_refused(held, given,
                                                                       small_index, tmp_path):
    real = tmp_path / "conc" / "run"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    names = {"real": real, "link": link}
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom deeppose_cli.training.rundir import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n",
         str(names[held])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke(*tiny_args("pytorch", small_index, names[given], "--max-iterations", "2"))
        refused(result, f"is in use by another training run (pid {holder.pid} ")
        assert not any(real.iterdir())
    finally:
        holder.kill()
        holder.wait()


def test_retraining_through_a_symlinked_out_replaces_the_run_it_points_to(runs, small_index,
                                                                         tmp_path):
    real = copy_run(runs["pytorch"], tmp_path / "conc" / "run")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = json.loads((real / "run.json").read_text())["model_sha256"]
    result = invoke(*tiny_args("pytorch", small_index, link, "--max-iterations", "2",
                               "--seed", "5"))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "run.json").read_text())["model_sha256"] != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conc", "link"]


# --------------------------------------------- item 4: evaluate reads one run, writes one unit

def test_evaluate_writes_nothing_into_a_run_retrained_meanwhile(runs, small_index, tmp_path,
                                                                monkeypatch):
    from deeppose_cli.core import cascade
    from deeppose_cli.training.rundir import RunDirectory, publish_run

    run = copy_run(runs["pytorch"], tmp_path / "run")
    retrained = copy_run(runs["chainer"], tmp_path / "run.next")
    evaluate_cascade = cascade.run_cascade_on_records

    def retrain_finishes_meanwhile(*args, **kwargs):
        predictions = evaluate_cascade(*args, **kwargs)
        publish_run(RunDirectory(retrained), run)
        return predictions

    monkeypatch.setattr(cascade, "run_cascade_on_records", retrain_finishes_meanwhile)
    result = invoke("evaluate", "--model", str(run), "--index", str(small_index))
    refused(result, f"{run} was replaced (retrained) while it was being evaluated")
    assert json.loads((run / "run.json").read_text())["framework"] == "chainer"
    assert not (run / "eval").exists() and hidden_leftovers(run) == []


def test_a_retrain_is_published_only_once_a_reader_has_loaded_the_run(runs, tmp_path):
    from deeppose_cli.training.rundir import RunDirectory, publish_run

    run = copy_run(runs["pytorch"], tmp_path / "run")
    retrained = copy_run(runs["chainer"], tmp_path / "run.next")
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom deeppose_cli.training.rundir import RunReadLock\n"
         "with RunReadLock(sys.argv[1]):\n    print('reading', flush=True)\n"
         "    sys.stdin.readline()\n", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    published = threading.Event()
    swap = threading.Thread(target=lambda: (publish_run(RunDirectory(retrained), run),
                                            published.set()))
    try:
        assert reader.stdout.readline().strip() == "reading"
        swap.start()
        assert not published.wait(0.5)  # the swap waits for the reader
        assert json.loads((run / "run.json").read_text())["framework"] == "pytorch"
        reader.stdin.write("done\n")
        reader.stdin.flush()
        assert reader.wait(30) == 0
        assert published.wait(30)
        assert json.loads((run / "run.json").read_text())["framework"] == "chainer"
    finally:
        reader.kill()
        reader.wait()
        swap.join(30)


def test_a_failed_evaluation_leaves_the_previous_eval_whole(runs, small_index, tmp_path,
                                                           monkeypatch):
    from deeppose_cli.apps import evaluate as evaluate_app

    run = copy_run(runs["pytorch"], tmp_path / "run")
    assert invoke("evaluate", "--model", str(run), "--index", str(small_index)).exit_code == 0
    before = snapshot(run / "eval")
    assert set(before) == {"metrics.json", "pdj.png", "predictions.json"}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_app, "plot_pdj", disk_full)  # after metrics.json
    result = invoke("evaluate", "--model", str(run), "--index", str(small_index),
                    "--no-flip-test")
    refused(result, "pdj.png: No space left on device")
    assert snapshot(run / "eval") == before
    assert hidden_leftovers(run) == []


# --------------------------------------------------- item 5: the size guard cannot be tricked

def jpeg_claiming(width: int, height: int, stray_byte: bool) -> bytes:
    """A JPEG whose frame header claims ``width`` x ``height``, with one stray byte before
    its quantization table marker (libjpeg skips it with a warning) if asked."""
    import cv2

    ok, encoded = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    if stray_byte:
        data.insert(data.index(b"\xff\xdb"), 0x00)
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """A 138-byte little-endian TIFF whose one directory claims ``width`` x ``height`` RGB."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, height),
               (279, 4, 1, 30)]
    directory = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", *entry) for entry in entries) + b"\0\0\0\0"
    data = b"II*\x00" + struct.pack("<I", 8) + directory
    return data + b"\0" * (138 - len(data))


@pytest.fixture
def no_decoding(monkeypatch):
    """cv2's decoders fail the test: what the header check refuses is never decoded."""
    import cv2

    def decoded(*args, **kwargs):
        raise AssertionError("decoded an image that its header shows to be over the bound")

    monkeypatch.setattr(cv2, "imread", decoded)
    monkeypatch.setattr(cv2, "imdecode", decoded)


@pytest.mark.parametrize("kind", ["JPEG with a stray byte", "TIFF"])
def test_an_oversized_image_is_refused_from_its_header(kind, tmp_path, no_decoding):
    from deeppose_cli.core.images import read_bgr

    path = tmp_path / "bomb.img"
    path.write_bytes(jpeg_claiming(12000, 12000, True) if kind.startswith("JPEG")
                     else tiff_claiming(12000, 12000))
    with pytest.raises(DeepPoseError, match="12000 x 12000 pixels is more than the 100,000,000"):
        read_bgr(path)


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04gAMA\x00\x00\xb1\x8f" + b"\0" * 32,  # no IHDR first
    b"RIFF\x20\x00\x00\x00WEBPVP8 \x10\x00\x00\x00" + b"\0" * 20,  # no key frame start code
    b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\0" * 32,  # a scan, no frame
    b"II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x04\x00\x01\x00\x00\x00\x10\x00\x00\x00",  # no height
], ids=["PNG", "WebP", "JPEG", "TIFF"])
def test_an_image_whose_header_does_not_parse_is_not_decoded(data, tmp_path, no_decoding):
    from deeppose_cli.core.images import read_bgr

    path = tmp_path / "damaged.img"
    path.write_bytes(data)
    with pytest.raises(DeepPoseError, match="header does not say how large the image is"):
        read_bgr(path)


def test_opencv_is_given_the_same_pixel_bound(tmp_path):
    import cv2

    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((100, 100, 3), np.uint8))
    code = ("import sys\nfrom deeppose_cli.core.image_headers import bound_opencv_decoding\n"
            "bound_opencv_decoding()\nimport cv2, numpy as np\n"
            "try:\n    cv2.imdecode(np.fromfile(sys.argv[1], np.uint8), cv2.IMREAD_COLOR)\n"
            "    print('decoded')\nexcept cv2.error:\n    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, timeout=60,
                            env={**env, "DEEPPOSE_MAX_IMAGE_PIXELS": "9999"})
    assert result.stdout.strip() == "refused", result.stderr[-2000:]


# ------------------------------------------------ item 7: one line, and good inputs kept

def tiny_webp(path: Path) -> Path:
    path.write_bytes(b"RIFF\x08\x00\x00\x00WEBPVP8L")  # 16 bytes: no room for a size
    return path


def huge_tiff(path: Path) -> Path:
    path.write_bytes(tiff_claiming(100000, 100000))
    return path


def test_predict_reports_bad_image_files_and_predicts_the_others(runs, photo, tmp_path):
    webp, tiff = tiny_webp(tmp_path / "tiny.webp"), huge_tiff(tmp_path / "huge.tiff")
    result = run_cli("predict", str(webp), str(photo), str(tiff), "--model",
                     str(runs["pytorch"]), "--json")
    assert result.returncode == 2, result.stderr[-3000:]
    assert [p["image"] for p in json.loads(result.stdout)] == [str(photo)]
    assert f"Error: {webp}: damaged WebP file" in result.stderr
    assert f"Error: {tiff}: 100000 x 100000 pixels is more than" in result.stderr
    assert "Traceback" not in result.stderr


def test_index_skips_bad_image_files_and_indexes_the_others(tmp_path):
    from conftest import write_lsp_like

    root = write_lsp_like(tmp_path / "lspet", "lspet", 5)
    tiny_webp(root / "images" / "im00002.jpg")
    huge_tiff(root / "images" / "im00004.jpg")
    result = invoke("index", "lspet", "--root", str(tmp_path), "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    skipped = {s["id"]: s["reason"] for s in records_of(root / "index" / "skipped.jsonl")}
    assert skipped["im00002"].startswith("damaged WebP file")
    assert skipped["im00004"].startswith("100000 x 100000 pixels is more than")
    assert len(records_of(root / "index" / "train.jsonl")) == 3


@pytest.mark.parametrize("command", ["evaluate", "show-augmentation"])
def test_bad_image_files_are_one_line_in_evaluate_and_show_augmentation(command, runs,
                                                                       small_index, tmp_path):
    records = records_of(small_index)
    records[3]["image"] = str(huge_tiff(tmp_path / "huge.tiff"))
    records[5]["image"] = str(tiny_webp(tmp_path / "tiny.webp"))
    index = write_records(tmp_path / "index.jsonl", records)
    argv = (["evaluate", "--model", str(runs["pytorch"]), "--index", str(index)]
            if command == "evaluate" else
            ["show-augmentation", "--dataset", "synthetic", "--index", str(index), "--count",
             "8", "--out", str(tmp_path / "grid.png")])
    result = invoke(*argv)
    assert result.exit_code == 1, result.output
    assert (f"{tmp_path / 'huge.tiff'}: 100000 x 100000 pixels" in result.output
            or f"{tmp_path / 'tiny.webp'}: damaged WebP file" in result.output)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_index_lines_with_numbers_json_cannot_hold_are_listed(framework, small_index,
                                                             tmp_path):
    import re

    lines = small_index.read_text().splitlines()
    record = json.loads(lines[1])
    record["joints"][0][0] = int("9" * 401)  # JSON has no bound; a float64 does
    lines[1] = json.dumps(record)
    lines[2] = re.sub(r'"width": \d+', '"width": 1e400', lines[2])  # parses as infinity
    lines[3] = json.dumps({"image": "x.jpg", "joints": []}).replace(
        "[]", "[" * 100000 + "]" * 100000)
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = invoke(*tiny_args(framework, train, out, "--max-iterations", "2"))
    refused(result, "train.jsonl: 3 invalid record(s)")
    assert f"{train}:2: a number is too large to be a pixel coordinate" in result.output
    assert f"{train}:3: width must be a whole number of pixels, found inf" in result.output
    assert f"{train}:4: not an index record (JSON nested too deeply)" in result.output
    assert not out.exists()


def test_save_predictions_under_a_file_is_refused_before_evaluating(runs, small_index,
                                                                    tmp_path):
    run = copy_run(runs["pytorch"], tmp_path / "run")
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, not a directory\n")
    result = invoke("evaluate", "--model", str(run), "--index", str(small_index),
                    "--save-predictions", str(blocker / "pred.json"))
    refused(result, f"cannot write to {blocker}: {blocker} is a file, not a directory")
    assert not (run / "eval").exists() and hidden_leftovers(run) == []


@needs_namespaces
def test_evaluate_on_a_read_only_run_fails_before_computing(runs, small_index, tmp_path):
    run = copy_run(runs["pytorch"], tmp_path / "run")
    records = records_of(small_index)
    records[5]["image"] = str(tiny_webp(tmp_path / "tiny.webp"))  # met only when computing
    index = write_records(tmp_path / "index.jsonl", records)
    result = run_cli_mounted("evaluate", "--model", str(run), "--index", str(index),
                             read_only=(run,))
    assert_refused(result, f"cannot create a directory beside {run / 'eval'}: "
                           "Read-only file system")


@needs_namespaces
@pytest.mark.parametrize("command", ["train-stage", "predict --draw", "convert"])
def test_writing_into_a_read_only_directory_is_one_line(command, runs, small_index, photo,
                                                        tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    argv = {"train-stage": tiny_args("pytorch", small_index, read_only / "run",
                                     "--max-iterations", "2"),
            "predict --draw": ["predict", str(photo), "--model", str(runs["pytorch"]),
                               "--draw", "--out", str(read_only)],
            "convert": ["convert", str(runs["pytorch"]), "--to", "chainer", "--out",
                        str(read_only / "converted")]}[command]
    result = run_cli_mounted(*argv, read_only=(read_only,))
    assert_refused(result, "Read-only file system")
    assert str(read_only) in result.stderr
    assert not any(read_only.iterdir())


def pages_kib(directory: Path) -> int:
    """What the files under ``directory`` take on a tmpfs, in KiB (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in directory.rglob("*") if p.is_file())


@needs_namespaces
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_train_stage_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(
        framework, small_index, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    out = small / "run"
    result = run_cli_mounted(*tiny_args(framework, small_index, out, "--max-iterations", "2"),
                             small=((small, 64),), listing=small)
    suffix = ".pt" if framework == "pytorch" else ".npz"
    assert_refused(result, f"cannot write {out / ('checkpoint' + suffix)}: "
                           "No space left on device")
    assert not [name for name in listed(result) if ".tmp-" in name], listed(result)


@needs_namespaces
def test_evaluate_on_a_full_disk_keeps_the_run_and_writes_no_eval(runs, small_index,
                                                                  tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    run = small / "run"
    room = pages_kib(runs["pytorch"]) + 24  # the run, and less than pdj.png needs beside it
    result = run_cli_mounted("evaluate", "--model", str(run), "--index", str(small_index),
                             small=((small, room),), listing=small,
                             before=f"cp -r {shlex.quote(str(runs['pytorch']))} "
                                    f"{shlex.quote(str(run))}")
    assert_refused(result, "No space left on device")
    assert f"cannot write {run / 'eval'}/" in result.stderr
    files = listed(result)
    assert not [name for name in files if "eval" in name or ".tmp-" in name], files
    assert "run/model.pt" in files and "run/run.json" in files


@needs_namespaces
@pytest.mark.parametrize("command", ["convert", "fetch synthetic"])
def test_a_full_disk_leaves_no_half_output(command, runs, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    argv, target = {
        "convert": (["convert", str(runs["pytorch"]), "--to", "chainer", "--out",
                     str(small / "converted")], small / "converted"),
        "fetch synthetic": (["fetch", "synthetic", "--root", str(small)], small / "synthetic"),
    }[command]
    result = run_cli_mounted(*argv, small=((small, 128),), listing=small)
    assert_refused(result, f"cannot write {target}: No space left on device")
    assert listed(result) == [], listed(result)


# ----------------------------------------------------------------- item 8: convert is atomic

def run_killed_after_first_model(*argv: str) -> subprocess.CompletedProcess:
    """``deeppose ARGV`` killed (SIGKILL) right after convert writes its first model file."""
    code = ("import os, signal, sys\n"
            "import deeppose_cli.apps.convert as convert\n"
            "write = convert.atomic_write\n"
            "def write_then_die(path, writer):\n"
            "    write(path, writer)\n"
            "    if str(path).endswith(('.pt', '.npz')):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "convert.atomic_write = write_then_die\n"
            "from deeppose_cli.cli import main\n"
            "main(sys.argv[1:], prog_name='deeppose')\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=300)


def test_a_convert_killed_midway_leaves_nothing_a_retry_refuses(runs, tmp_path):
    out = tmp_path / "converted"
    argv = ["convert", str(runs["pytorch"]), "--to", "chainer", "--out", str(out)]
    killed = run_killed_after_first_model(*argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()
    assert hidden_leftovers(tmp_path)  # what SIGKILL left: removed by the next conversion
    retry = run_cli(*argv)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["framework"] == "chainer"
    assert hidden_leftovers(tmp_path) == []


# ------------------------------------------------------- item 9: values that mean nothing

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_visibility_flags_and_coordinates_out_of_range_are_listed(framework, small_index,
                                                                 tmp_path):
    records = records_of(small_index)
    for line, value in ((1, -1), (2, 2), (3, 0.1)):
        records[line]["visible"][4] = value
    records[4]["joints"][0] = [1e300, 5.0]
    train = write_records(tmp_path / "train.jsonl", records)
    out = tmp_path / "run"
    result = invoke(*tiny_args(framework, train, out, "--max-iterations", "2"))
    refused(result, "train.jsonl: 4 invalid record(s)")
    for line, value in ((2, "-1"), (3, "2"), (4, "0.1")):
        assert f"{train}:{line}: visible must hold 0 or 1 (or false/true) per joint, found " \
               f"{value}" in result.output
    assert f"{train}:5: joint coordinates must be within 1e+06 pixels" in result.output
    assert not out.exists()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_training_index_without_a_visible_joint_is_refused(framework, small_index, tmp_path):
    records = records_of(small_index)
    for record in records:
        record["visible"] = [0] * len(record["visible"])
    train = write_records(tmp_path / "train.jsonl", records)
    out = tmp_path / "run"
    result = invoke(*tiny_args(framework, train, out, "--max-iterations", "2"))
    refused(result, "no record has a visible joint, so there is nothing to train on")
    assert not out.exists()


def test_predict_refuses_a_box_of_no_pixels(runs, photo):
    result = invoke("predict", str(photo), "--model", str(runs["pytorch"]),
                    "--bbox", "0,0,1e-5,1e-5")
    refused(result, "--bbox must be X,Y,W,H: four finite numbers of pixels (at most 1e+06) "
                    "with W and H at least 1 pixel")


@pytest.mark.parametrize("where", ["run", "chain entry"])
def test_a_run_without_its_model_checksum_is_refused_not_trusted(where, runs, small_index,
                                                                photo, tmp_path):
    run = copy_run(runs["pytorch"], tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    if where == "run":
        del meta["model_sha256"]
        shutil.copy(runs["chainer"] / "model.npz", run / "model.npz")  # a swapped model
        meta["model_file"], meta["framework"] = "model.npz", "chainer"
        message = f"cannot be verified: {run / 'run.json'} has no model_sha256"
    else:
        copy_run(runs["pytorch"], run / "chain" / "stage1")
        meta.update(stage=2, sigma=1.0, chain=[{"stage": 1, "framework": "pytorch",
                                                "dir": "chain/stage1"}])
        message = "records no model_sha256 for it"
    (run / "run.json").write_text(json.dumps(meta))
    for argv in (["predict", str(photo), "--model", str(run)],
                 ["evaluate", "--model", str(run), "--index", str(small_index)],
                 ["convert", str(run), "--to", "chainer", "--out", str(tmp_path / "c")]):
        refused(invoke(*argv), message)
    assert not (run / "eval").exists() and not (tmp_path / "c").exists()


def test_predict_reports_a_truncated_jpeg_and_predicts_the_others(runs, photo, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    result = invoke("predict", str(cut), str(photo), "--model", str(runs["pytorch"]), "--json")
    assert result.exit_code == 2, result.output
    assert [p["image"] for p in json.loads(result.stdout)] == [str(photo)]
    assert f"Error: {cut}: truncated JPEG (no end-of-image marker)" in result.stderr


# ---------------------------------------------------------------------- item 10: smaller

def test_a_directory_among_predicts_images_is_reported_and_the_rest_predicted(runs, photo,
                                                                             tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    result = invoke("predict", str(folder), str(photo), "--model", str(runs["pytorch"]),
                    "--json")
    assert result.exit_code == 2, result.output
    assert [p["image"] for p in json.loads(result.stdout)] == [str(photo)]
    # a folder is a source: its images are predicted, and an empty one is reported
    assert f"Error: {folder}: no images or videos in this folder" in result.stderr


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_init_that_does_not_fit_is_refused_before_the_run_directory_is_touched(
        framework, runs, small_index, tmp_path):
    out = copy_run(runs[framework], tmp_path / "run")
    before = snapshot(out)
    other = runs["chainer" if framework == "pytorch" else "pytorch"]
    args = tiny_args(framework, small_index, out, "--max-iterations", "2", "--init",
                     str(other))
    args[args.index("--width") + 1] = "0.125"  # the --init run is 0.0625 wide
    refused(invoke(*args), f"--init {other} does not fit this network")
    assert not (tmp_path / "run.next").exists()
    assert snapshot(out) == before


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    from deeppose_cli.core.files import atomic_write_text

    code = ("import os, signal, sys\nfrom pathlib import Path\n"
            "from deeppose_cli.core.files import atomic_write\n"
            "def die(tmp):\n    tmp.write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(Path(sys.argv[1]), die)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "metrics.json")],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert len(hidden_leftovers(tmp_path)) == 1 and not (tmp_path / "metrics.json").exists()
    atomic_write_text(tmp_path / "other.json", "{}\n")
    assert hidden_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_a_killed_dataset_generation_is_cleaned_up_by_the_next_fetch(tmp_path):
    code = ("import os, signal, sys\n"
            "import deeppose_cli.data.synthetic as synthetic\n"
            "def die(target, **kwargs):\n"
            "    (target / 'images').mkdir()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "synthetic.generate_dataset = die\n"
            "from deeppose_cli.cli import main\n"
            "main(sys.argv[1:], prog_name='deeppose')\n")
    argv = ["fetch", "synthetic", "--root", str(tmp_path)]
    killed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".synthetic.")]
    result = invoke(*argv)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


@pytest.mark.parametrize("line, message", [
    ('{"image": 5, "joints": [[1, 2]]}', "image must be a file path (a string), found int 5"),
    ('{"image": ["a.jpg"], "joints": [[1, 2]]}', "image must be a file path (a string)"),
])
def test_an_image_that_is_not_a_path_says_so(tmp_path, line, message):
    from deeppose_cli.data.annotations import read_index

    path = tmp_path / "index.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DeepPoseError) as refusal:
        read_index(path)
    assert f"index.jsonl:1: {message}" in str(refusal.value)


def test_an_image_url_is_named_as_a_url(runs):
    result = invoke("predict", "http://example.com/person.jpg", "--model",
                    str(runs["pytorch"]))
    assert result.exit_code == 2, result.output
    assert "http:/example.com/person.jpg: no such file (a URL? images are read from local " \
           "files: download it first)" in result.stderr


def test_a_pickled_npz_model_is_named_as_such(runs, tmp_path):
    from deeppose_cli.engines import chainer_engine

    model = tmp_path / "model.npz"
    with np.load(runs["chainer"] / "model.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["conv1/W"] = np.array([{"not": "numbers"}], dtype=object)
    with open(model, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(DeepPoseError, match="holds Python objects \\(pickled data\\), which are "
                                            "never loaded"):
        chainer_engine.read_params(model)
    garbage = tmp_path / "garbage.npz"  # neither: still "truncated or corrupt"
    garbage.write_bytes(bytes(1000))
    with pytest.raises(DeepPoseError, match="truncated or corrupt"):
        chainer_engine.read_params(garbage)
