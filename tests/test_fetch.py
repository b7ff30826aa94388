"""``deeppose_cli.fetch`` against a local HTTP server: download, resume, verify, extract safely."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
import stat
import sys
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from deeppose_cli import fetch
from deeppose_cli.errors import DeepPoseError
from deeppose_cli.fetch import FetchResult, default_data_root, fetch_dataset
from deeppose_cli.manifests import load_dataset_manifest

ARCHIVE_NAME = "lspet_dataset.zip"


# --------------------------------------------------------------------------------------------
# Test archives


def _tiny_jpeg(seed: int) -> bytes:
    """A small noisy image, so the archive does not compress to nothing."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 16, 3), dtype=np.uint8)
    try:
        import cv2
    except ImportError:  # raw bytes serve as well: fetch never decodes images
        return b"\xff\xd8\xff\xe0" + pixels.tobytes() + b"\xff\xd9"
    ok, encoded = cv2.imencode(".jpg", pixels)
    assert ok
    return encoded.tobytes()


def lspet_members(num_images: int = 3) -> dict[str, bytes]:
    """The files of an LSPET-layout archive: joints.mat (14 x 3 x N), images/, README.txt."""
    joints = np.random.default_rng(num_images).uniform(0, 16, size=(14, 3, num_images))
    joints[:, 2, :] = 1.0
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"joints": joints})
    members = {"joints.mat": mat.getvalue(), "README.txt": b"LSPET test copy\n"}
    for i in range(1, num_images + 1):
        members[f"images/im{i:05d}.jpg"] = _tiny_jpeg(i)
    return members


def build_zip(path: Path, members: dict[str, bytes], *, top_dir: str | None = None,
              symlinks: dict[str, str] | None = None) -> bytes:
    """Write a zip of ``members`` (under ``top_dir/`` if given) and return its bytes."""
    prefix = f"{top_dir}/" if top_dir else ""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if top_dir:
            zf.writestr(zipfile.ZipInfo(prefix), b"")
        for name, data in members.items():
            zf.writestr(prefix + name, data)
        for name, link_target in (symlinks or {}).items():
            info = zipfile.ZipInfo(prefix + name)
            info.create_system = 3  # unix, so external_attr carries the file type
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, link_target)
    return path.read_bytes()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# A local HTTP server with Range support and a connection-dropping mode


class ArchiveServer:
    """Serves ``payload`` at ``/lspet_dataset.zip`` and records each request's Range header."""

    def __init__(self) -> None:
        self.payload = b""
        self.honour_range = True
        self.drop_next = False  # send the full Content-Length, half the body, then hang up
        self.ranges: list[str | None] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                state.ranges.append(range_header)
                if self.path != f"/{ARCHIVE_NAME}":
                    self.send_error(404)
                    return
                data = state.payload
                if range_header and state.honour_range:
                    start = int(range_header.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if state.drop_next:
                    state.drop_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{ARCHIVE_NAME}"

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def short_socket_timeout(monkeypatch):
    monkeypatch.setattr(fetch, "SOCKET_TIMEOUT_S", 5.0)


@pytest.fixture
def server(tmp_path):
    with ArchiveServer() as running:
        running.payload = build_zip(tmp_path / "served.zip", lspet_members())
        yield running


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data"


def lspet_with(**archive_changes):
    """The real LSPET manifest with some ``[archive]`` keys replaced (URLs, checksum, size)."""
    base = load_dataset_manifest("lspet")
    return dataclasses.replace(base, archive={**base.archive, **archive_changes})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{ARCHIVE_NAME}"


def leftover_temp_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".lspet.*")) if root.exists() else []


# --------------------------------------------------------------------------------------------
# Downloads


def test_download_extracts_and_marks_complete(server, root):
    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)

    assert isinstance(result, FetchResult)
    assert result.status == "downloaded"
    assert result.dataset_dir == root / "lspet"
    assert result.archive == root / "downloads" / ARCHIVE_NAME
    assert result.archive.read_bytes() == server.payload
    assert result.sha256 == sha256_of(server.payload)
    assert result.size == len(server.payload)
    # No checksum in the manifest: the message gives the user the one to pin.
    assert f"--sha256 {result.sha256}" in result.message

    dataset = root / "lspet"
    assert (dataset / "joints.mat").is_file()
    assert (dataset / "README.txt").read_bytes() == b"LSPET test copy\n"
    assert sorted(p.name for p in (dataset / "images").iterdir()) == [
        "im00001.jpg", "im00002.jpg", "im00003.jpg"]
    assert scipy.io.loadmat(dataset / "joints.mat")["joints"].shape == (14, 3, 3)

    marker = json.loads((dataset / fetch.MARKER_NAME).read_text())
    assert marker["source"] == server.url
    assert marker["sha256"] == result.sha256
    assert marker["size"] == len(server.payload)
    assert marker["date"]
    assert not (root / "downloads" / f"{ARCHIVE_NAME}.partial").exists()
    assert leftover_temp_dirs(root) == []
    assert server.ranges == [None]


def test_second_run_does_nothing(server, root):
    manifest = lspet_with(urls=[server.url])
    fetch_dataset(manifest, root, progress=False)
    dataset = root / "lspet"
    mtimes = {p: p.stat().st_mtime_ns for p in [dataset, dataset / "joints.mat",
                                                dataset / fetch.MARKER_NAME]}
    requests_before = len(server.ranges)

    again = fetch_dataset(manifest, root, progress=False)

    assert again.status == "already complete"
    assert "already complete" in again.message
    assert again.dataset_dir == dataset
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(server.ranges) == requests_before


def test_interrupted_download_resumes_with_range(server, root):
    manifest = lspet_with(urls=[server.url])
    partial = root / "downloads" / f"{ARCHIVE_NAME}.partial"
    half = len(server.payload) // 2
    server.drop_next = True

    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(manifest, root, progress=False)
    assert server.url in str(failure.value)
    assert partial.read_bytes() == server.payload[:half]
    assert not (root / "lspet").exists()

    result = fetch_dataset(manifest, root, progress=False)

    assert server.ranges == [None, f"bytes={half}-"]
    assert result.status == "downloaded"
    assert result.archive.read_bytes() == server.payload
    assert not partial.exists()
    assert (root / "lspet" / "joints.mat").is_file()


def test_server_without_range_support_restarts_from_zero(server, root):
    partial = root / "downloads" / f"{ARCHIVE_NAME}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"stale bytes from some other attempt")
    server.honour_range = False

    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)

    assert server.ranges == [f"bytes={len(b'stale bytes from some other attempt')}-"]
    assert result.archive.read_bytes() == server.payload


def test_complete_partial_answered_416_is_verified_and_used(server, root):
    partial = root / "downloads" / f"{ARCHIVE_NAME}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(server.payload)

    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)

    assert server.ranges == [f"bytes={len(server.payload)}-"]
    assert result.status == "downloaded"
    assert result.archive.read_bytes() == server.payload


def test_wrong_checksum_keeps_partial_and_extracts_nothing(server, root):
    wrong = "0" * 64
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(lspet_with(urls=[server.url], sha256=wrong), root, progress=False)

    message = str(failure.value)
    assert wrong in message and sha256_of(server.payload) in message
    partial = root / "downloads" / f"{ARCHIVE_NAME}.partial"
    assert partial.read_bytes() == server.payload
    assert not (root / "downloads" / ARCHIVE_NAME).exists()
    assert not (root / "lspet").exists()
    assert leftover_temp_dirs(root) == []


def test_wrong_size_is_refused(server, root):
    with pytest.raises(DeepPoseError, match=f"expected {len(server.payload) + 1} bytes"):
        fetch_dataset(lspet_with(urls=[server.url], size=len(server.payload) + 1), root,
                      progress=False)
    assert not (root / "lspet").exists()


def test_matching_checksum_is_accepted_quietly(server, root):
    manifest = lspet_with(urls=[server.url], sha256=sha256_of(server.payload),
                          size=len(server.payload))
    result = fetch_dataset(manifest, root, progress=False)
    assert result.status == "downloaded"
    assert "pin it" not in result.message


def test_unreachable_url_names_it_and_suggests_archive(root):
    url = closed_port_url()
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(lspet_with(urls=[url]), root, progress=False)
    message = str(failure.value)
    assert url in message
    assert "--archive" in message
    assert "\n" not in message
    assert not (root / "lspet").exists()


def test_http_error_names_status(server, root):
    missing = server.url.replace(ARCHIVE_NAME, "nothing-here.zip")
    with pytest.raises(DeepPoseError, match="404"):
        fetch_dataset(lspet_with(urls=[missing]), root, progress=False)


def test_mirrors_are_tried_in_order(server, root):
    dead = closed_port_url()
    result = fetch_dataset(lspet_with(urls=[dead, server.url]), root, progress=False)
    assert result.status == "downloaded"
    assert json.loads((root / "lspet" / fetch.MARKER_NAME).read_text())["source"] == server.url


def test_url_argument_overrides_the_manifest(server, root):
    result = fetch_dataset(lspet_with(urls=[closed_port_url()]), root, url=server.url,
                           progress=False)
    assert result.status == "downloaded"


def test_force_fetches_again_and_replaces_the_dataset(server, root, tmp_path):
    manifest = lspet_with(urls=[server.url])
    first = fetch_dataset(manifest, root, progress=False)
    server.payload = build_zip(tmp_path / "served-v2.zip", lspet_members(num_images=5))

    second = fetch_dataset(manifest, root, force=True, progress=False)

    assert second.status == "downloaded"
    assert second.sha256 == sha256_of(server.payload) != first.sha256
    assert len(list((root / "lspet" / "images").iterdir())) == 5
    assert (root / "downloads" / ARCHIVE_NAME).read_bytes() == server.payload
    assert server.ranges == [None, None]
    assert leftover_temp_dirs(root) == []


def test_failed_force_keeps_the_previous_dataset(server, root, tmp_path):
    manifest = lspet_with(urls=[server.url])
    fetch_dataset(manifest, root, progress=False)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")

    with pytest.raises(DeepPoseError, match="not a valid zip"):
        fetch_dataset(manifest, root, archive=broken, force=True, progress=False)

    assert (root / "lspet" / fetch.MARKER_NAME).is_file()
    assert len(list((root / "lspet" / "images").iterdir())) == 3
    assert leftover_temp_dirs(root) == []


# --------------------------------------------------------------------------------------------
# Local archives and extraction


def test_local_archive_against_official_checksum(tmp_path, root):
    local = tmp_path / "copy.zip"
    data = build_zip(local, lspet_members())
    actual = sha256_of(data)
    manifest = lspet_with(urls=[closed_port_url()], sha256="ab" * 32)

    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(manifest, root, archive=local, progress=False)
    assert f"--sha256 {actual}" in str(failure.value)
    assert "ab" * 32 in str(failure.value)
    assert not (root / "lspet").exists()

    result = fetch_dataset(manifest, root, archive=local, sha256=actual.upper(), progress=False)
    assert result.status == "extracted from archive"
    assert result.archive == local
    assert result.sha256 == actual
    assert (root / "lspet" / "joints.mat").is_file()
    assert not (root / "downloads").exists()  # no network involved


def test_local_archive_against_wrong_user_checksum(tmp_path, root):
    local = tmp_path / "copy.zip"
    build_zip(local, lspet_members())
    with pytest.raises(DeepPoseError, match="--sha256"):
        fetch_dataset(lspet_with(), root, archive=local, sha256="cd" * 32, progress=False)
    with pytest.raises(DeepPoseError, match="64 hexadecimal"):
        fetch_dataset(lspet_with(), root, archive=local, sha256="not-a-checksum", progress=False)


def test_missing_local_archive(tmp_path, root):
    with pytest.raises(DeepPoseError, match="does not exist"):
        fetch_dataset(lspet_with(), root, archive=tmp_path / "absent.zip", progress=False)


def test_corrupt_zip_is_a_clear_error(tmp_path, root):
    local = tmp_path / "corrupt.zip"
    local.write_bytes(b"definitely not a zip archive" * 10)
    with pytest.raises(DeepPoseError, match="not a valid zip"):
        fetch_dataset(lspet_with(), root, archive=local, progress=False)
    assert not (root / "lspet").exists()
    assert leftover_temp_dirs(root) == []


def test_single_top_level_directory_is_stripped(tmp_path, root):
    local = tmp_path / "nested.zip"
    build_zip(local, lspet_members(), top_dir="lspet_dataset")
    fetch_dataset(lspet_with(), root, archive=local, progress=False)
    assert (root / "lspet" / "joints.mat").is_file()
    assert (root / "lspet" / "images" / "im00001.jpg").is_file()
    assert not (root / "lspet" / "lspet_dataset").exists()


def test_archive_without_annotations_is_refused(tmp_path, root):
    local = tmp_path / "no-joints.zip"
    build_zip(local, {"README.txt": b"hello\n"})
    with pytest.raises(DeepPoseError, match="joints.mat"):
        fetch_dataset(lspet_with(), root, archive=local, progress=False)
    assert not (root / "lspet").exists()


@pytest.mark.parametrize("kind", ["dotdot", "deep-dotdot", "absolute", "drive", "symlink"])
def test_hostile_members_are_refused(tmp_path, root, kind):
    outside = tmp_path / "outside"
    members = lspet_members()
    symlinks = None
    if kind == "dotdot":
        members["../evil.txt"] = b"escaped"
    elif kind == "deep-dotdot":
        members["images/../../../evil.txt"] = b"escaped"
    elif kind == "absolute":
        members[str(outside / "evil.txt")] = b"escaped"
    elif kind == "drive":
        members["C:/evil.txt"] = b"escaped"
    else:
        symlinks = {"images/evil.txt": str(outside / "evil.txt")}
    local = tmp_path / f"hostile-{kind}.zip"
    build_zip(local, members, symlinks=symlinks)

    with pytest.raises(DeepPoseError, match="refusing"):
        fetch_dataset(lspet_with(), root, archive=local, progress=False)

    for directory in [root, tmp_path, tmp_path.parent, outside]:
        assert not (directory / "evil.txt").exists()
    assert not (root / "lspet").exists()
    assert not outside.exists()
    assert leftover_temp_dirs(root) == []
    assert not (root / "C:").exists()


# --------------------------------------------------------------------------------------------
# Generated data, missing sources, defaults


def test_synthetic_dataset_is_generated(monkeypatch, root):
    calls = []

    def fake_generate_dataset(out_dir, *, num_images, seed, image_size):
        calls.append((Path(out_dir).parent, num_images, seed, image_size))
        Path(out_dir, "joints.mat").write_bytes(b"fake")

    try:
        import deeppose_cli.synthetic as synthetic
    except ImportError:  # the generator module is not written yet: stand in for it
        synthetic = types.ModuleType("deeppose_cli.synthetic")
        monkeypatch.setitem(sys.modules, "deeppose_cli.synthetic", synthetic)
    monkeypatch.setattr(synthetic, "generate_dataset", fake_generate_dataset, raising=False)

    manifest = load_dataset_manifest("synthetic")
    result = fetch_dataset(manifest, root, progress=False)

    gen = manifest.generator
    assert calls == [(root, gen["num_images"], gen["seed"], gen["image_size"])]
    assert result.status == "generated"
    assert (root / "synthetic" / "joints.mat").read_bytes() == b"fake"
    assert json.loads((root / "synthetic" / fetch.MARKER_NAME).read_text())["source"] == "generated"
    assert not (root / "downloads").exists()
    assert fetch_dataset(manifest, root, progress=False).status == "already complete"
    assert len(calls) == 1


def test_failed_generation_leaves_nothing(monkeypatch, root):
    def failing_generate_dataset(out_dir, **kwargs):
        Path(out_dir, "half.txt").write_text("half written")
        raise RuntimeError("renderer crashed")

    try:
        import deeppose_cli.synthetic as synthetic
    except ImportError:
        synthetic = types.ModuleType("deeppose_cli.synthetic")
        monkeypatch.setitem(sys.modules, "deeppose_cli.synthetic", synthetic)
    monkeypatch.setattr(synthetic, "generate_dataset", failing_generate_dataset, raising=False)

    with pytest.raises(RuntimeError):
        fetch_dataset(load_dataset_manifest("synthetic"), root, progress=False)
    assert list(root.iterdir()) == []


def test_no_urls_and_no_archive_is_an_error(root):
    manifest = dataclasses.replace(lspet_with(urls=[]), generator={})
    with pytest.raises(DeepPoseError, match="--archive"):
        fetch_dataset(manifest, root, progress=False)


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPPOSE_DATA", raising=False)
    assert default_data_root() == Path("data")
    monkeypatch.setenv("DEEPPOSE_DATA", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
