"""``deeppose_cli.data.fetch`` against a local HTTP server: download, resume, verify, extract safely."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from deeppose_cli.data import fetch
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.data.fetch import FetchResult, default_data_root, fetch_dataset
from deeppose_cli.core.manifests import load_dataset_manifest

ARCHIVE_NAME = "lspet_dataset.zip"
WEB_PAGE = b"<!DOCTYPE html>\n<html><head><title>Moved</title></head><body>Gone.</body></html>\n"


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
    """Serves ``payload`` at ``/lspet_dataset.zip`` and records each request's Range header.

    ``/page/lspet_dataset.zip`` always answers 200 with a web page, as dead mirrors do.
    """

    def __init__(self) -> None:
        self.payload = b""
        self.honour_range = True
        self.drop_next = False  # send the full Content-Length, half the body, then hang up
        self.cut_next_without_length = False  # no Content-Length, half the body, hang up
        self.web_page = False  # answer the archive's URL with a web page
        self.validator: str | None = None  # "etag" or "last-modified": sent, and If-Range honoured
        self.last_modified = formatdate(1_500_000_000, usegmt=True)
        self.ranges: list[str | None] = []
        self.if_ranges: list[str | None] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                state.ranges.append(range_header)
                state.if_ranges.append(self.headers.get("If-Range"))
                path = self.path.split("?", 1)[0]
                if path == f"/page/{ARCHIVE_NAME}" or (path == f"/{ARCHIVE_NAME}"
                                                         and state.web_page):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(WEB_PAGE)))
                    self.end_headers()
                    self.wfile.write(WEB_PAGE)
                    return
                if path != f"/{ARCHIVE_NAME}":
                    self.send_error(404)
                    return
                data = state.payload
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range != state.current_validator():
                    range_header = None  # the file changed: RFC 9110 says send all of it
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
                if state.validator == "etag":
                    self.send_header("ETag", state.current_validator())
                elif state.validator == "last-modified":
                    self.send_header("Last-Modified", state.current_validator())
                if state.cut_next_without_length:
                    state.cut_next_without_length = False
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
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

    def current_validator(self) -> str | None:
        if self.validator == "etag":
            return '"' + hashlib.sha256(self.payload).hexdigest()[:16] + '"'
        if self.validator == "last-modified":
            return self.last_modified
        return None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{ARCHIVE_NAME}"

    @property
    def web_page_url(self) -> str:
        return self.url.replace(f"/{ARCHIVE_NAME}", f"/page/{ARCHIVE_NAME}")

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
# Downloads that must not get stuck


def partial_of(root: Path) -> Path:
    return root / "downloads" / f"{ARCHIVE_NAME}.partial"


def test_web_page_is_refused_and_not_kept(server, root):
    server.web_page = True
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)
    message = str(failure.value)
    assert "web page, not the archive" in message
    assert "\n" not in message
    assert not (root / "downloads" / ARCHIVE_NAME).exists()
    assert not partial_of(root).exists()
    assert not (root / "lspet").exists()

    server.web_page = False  # the next fetch downloads again instead of re-reading the page
    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)
    assert result.status == "downloaded"
    assert result.archive.read_bytes() == server.payload
    assert server.ranges == [None, None]


def test_mirror_answering_with_a_web_page_is_skipped(server, root):
    result = fetch_dataset(lspet_with(urls=[server.web_page_url, server.url]), root,
                           progress=False)
    assert result.status == "downloaded"
    assert result.archive.read_bytes() == server.payload
    assert json.loads((root / "lspet" / fetch.MARKER_NAME).read_text())["source"] == server.url


def test_mirror_serving_an_unusable_archive_is_dropped(server, root, tmp_path):
    with ArchiveServer() as wrong:
        wrong.payload = build_zip(tmp_path / "wrong.zip", {"README.txt": b"not LSPET\n"})
        result = fetch_dataset(lspet_with(urls=[wrong.url, server.url]), root, progress=False)
    assert result.archive.read_bytes() == server.payload
    assert json.loads((root / "lspet" / fetch.MARKER_NAME).read_text())["source"] == server.url
    assert not partial_of(root).exists()


def test_body_cut_without_content_length_is_resumed_not_accepted(server, root):
    manifest = lspet_with(urls=[server.url])
    half = len(server.payload) // 2
    server.cut_next_without_length = True

    with pytest.raises(DeepPoseError, match="resume") as failure:
        fetch_dataset(manifest, root, progress=False)
    assert "\n" not in str(failure.value)
    assert partial_of(root).read_bytes() == server.payload[:half]
    assert not (root / "downloads" / ARCHIVE_NAME).exists()
    assert not (root / "lspet").exists()
    assert leftover_temp_dirs(root) == []

    result = fetch_dataset(manifest, root, progress=False)
    assert server.ranges == [None, f"bytes={half}-"]
    assert result.status == "downloaded"
    assert result.archive.read_bytes() == server.payload
    assert not partial_of(root).exists()
    assert not partial_of(root).with_name(f"{ARCHIVE_NAME}.partial.json").exists()


@pytest.mark.parametrize("cached", ["web page", "truncated zip", "garbage"])
def test_unusable_cached_download_is_deleted_and_fetched_again(server, root, cached):
    final = root / "downloads" / ARCHIVE_NAME
    final.parent.mkdir(parents=True)
    final.write_bytes({"web page": WEB_PAGE,
                       "truncated zip": server.payload[: len(server.payload) // 2],
                       "garbage": b"\x00" * 1000}[cached])

    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)

    assert result.status == "downloaded"
    assert f"earlier download {final} was unusable" in result.message
    assert final.read_bytes() == server.payload
    assert (root / "lspet" / "joints.mat").is_file()
    assert server.ranges == [None]


def test_unusable_archive_option_says_it_cannot_be_fetched_again(tmp_path, root):
    local = tmp_path / "page.zip"
    local.write_bytes(WEB_PAGE)
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(lspet_with(), root, archive=local, progress=False)
    message = str(failure.value)
    assert "web page" in message
    assert "--archive" in message and "cannot be downloaded again" in message
    assert "--force" in message
    assert "\n" not in message
    assert local.read_bytes() == WEB_PAGE  # the user's file is never deleted


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_resume_sends_if_range_from_the_first_response(server, root, validator):
    server.validator = validator
    server.drop_next = True
    manifest = lspet_with(urls=[server.url])
    with pytest.raises(DeepPoseError):
        fetch_dataset(manifest, root, progress=False)
    state = json.loads(partial_of(root).with_name(f"{ARCHIVE_NAME}.partial.json").read_text())
    assert state["url"] == server.url

    result = fetch_dataset(manifest, root, progress=False)

    half = len(server.payload) // 2
    assert server.ranges == [None, f"bytes={half}-"]
    assert server.if_ranges == [None, server.current_validator()]
    assert result.archive.read_bytes() == server.payload


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_changed_remote_file_restarts_instead_of_splicing(server, root, tmp_path, validator):
    server.validator = validator
    server.drop_next = True
    manifest = lspet_with(urls=[server.url])
    with pytest.raises(DeepPoseError):
        fetch_dataset(manifest, root, progress=False)
    old_validator = server.current_validator()

    server.payload = build_zip(tmp_path / "served-v2.zip", lspet_members(num_images=5))
    server.last_modified = formatdate(1_600_000_000, usegmt=True)
    result = fetch_dataset(manifest, root, progress=False)

    assert server.if_ranges[-1] == old_validator
    assert result.archive.read_bytes() == server.payload
    assert len(list((root / "lspet" / "images").iterdir())) == 5


def test_stale_partial_is_not_spliced_onto_the_download(server, root):
    partial = partial_of(root)
    partial.parent.mkdir(parents=True)
    stale = b"stale bytes from some other attempt"
    partial.write_bytes(stale)

    result = fetch_dataset(lspet_with(urls=[server.url]), root, progress=False)

    assert server.ranges == [f"bytes={len(stale)}-", None]  # tried, found spliced, restarted
    assert result.archive.read_bytes() == server.payload
    assert not partial.exists()


def test_partial_from_another_mirror_is_not_continued(server, root):
    manifest = lspet_with(urls=[server.url])
    server.drop_next = True
    with pytest.raises(DeepPoseError):
        fetch_dataset(manifest, root, progress=False)

    other = server.url + "?mirror=2"
    result = fetch_dataset(manifest, root, url=other, progress=False)

    assert server.ranges == [None, None]
    assert result.archive.read_bytes() == server.payload


# --------------------------------------------------------------------------------------------
# Mirrors


def test_every_mirror_failing_says_where_to_get_the_archive(root):
    from deeppose_cli.cli import fetch as fetch_command

    dead = [closed_port_url(), closed_port_url()]
    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(lspet_with(urls=dead), root, progress=False)
    message = str(failure.value)
    assert all(url in message for url in dead)
    assert load_dataset_manifest("lspet").homepage in message
    assert f"deeppose fetch lspet --archive PATH/TO/{ARCHIVE_NAME}" in message
    assert "\n" not in message
    # The option named in the message is the command's real one.
    assert "--archive" in {opt for param in fetch_command.params for opt in param.opts}


@pytest.mark.parametrize("name", ["lsp", "lspet"])
def test_manifests_list_mirrors_and_a_homepage(name):
    manifest = load_dataset_manifest(name)
    urls = manifest.archive["urls"]
    assert manifest.homepage.startswith("http")
    assert len(urls) >= 2 and len(set(urls)) == len(urls)
    assert all(u.startswith(("http://", "https://")) for u in urls)
    assert not any("comp.leeds.ac.uk" in u for u in urls)  # redirects to a web page
    assert manifest.archive["filename"] == f"{name}_dataset.zip"
    assert manifest.archive["max_extracted_bytes"] > 0


# --------------------------------------------------------------------------------------------
# Decompression bombs


def bomb_zip(path: Path, padding: int = 4 << 20) -> Path:
    """A valid LSPET archive plus a zero-filled member that compresses to almost nothing."""
    members = lspet_members()
    members["padding.bin"] = bytes(padding)
    build_zip(path, members)
    assert path.stat().st_size < padding // 20
    return path


@pytest.mark.parametrize("bound_from", ["argument", "manifest", "environment"])
def test_decompression_bomb_is_refused(tmp_path, root, monkeypatch, bound_from):
    good = tmp_path / "good.zip"
    build_zip(good, lspet_members())
    fetch_dataset(lspet_with(), root, archive=good, progress=False)
    bomb = bomb_zip(tmp_path / "bomb.zip")
    manifest, kwargs = lspet_with(), {}
    if bound_from == "argument":
        kwargs["max_extract_bytes"] = 1 << 20
    elif bound_from == "manifest":
        manifest = lspet_with(max_extracted_bytes=1 << 20)
    else:
        monkeypatch.setenv("DEEPPOSE_MAX_EXTRACT_GIB", str(1 / 1024))

    with pytest.raises(DeepPoseError) as failure:
        fetch_dataset(manifest, root, archive=bomb, force=True, progress=False, **kwargs)

    message = str(failure.value)
    assert "would unpack to" in message and "refusing" in message
    assert "DEEPPOSE_MAX_EXTRACT_GIB" in message
    assert "\n" not in message
    assert not (root / "lspet" / "padding.bin").exists()
    assert len(list((root / "lspet" / "images").iterdir())) == 3  # the old copy is untouched
    assert leftover_temp_dirs(root) == []


def test_bound_counts_bytes_written_not_only_declared_sizes(tmp_path, root, monkeypatch):
    # A directory that understates the sizes: extraction must still stop at the bound.
    monkeypatch.setattr(fetch, "_declared_size", lambda members: 0)
    monkeypatch.setattr(fetch, "MAX_EXPANSION_RATIO", 1 << 40)  # the streaming bound alone
    with pytest.raises(DeepPoseError, match="unpacks to more than its directory declares"):
        fetch_dataset(lspet_with(), root, archive=bomb_zip(tmp_path / "bomb.zip"),
                      max_extract_bytes=1 << 20, progress=False)
    assert not (root / "lspet").exists()
    assert leftover_temp_dirs(root) == []


def test_directory_understating_a_member_is_refused(tmp_path, root):
    bomb = bomb_zip(tmp_path / "bomb.zip")
    data = bytearray(bomb.read_bytes())
    # Rewrite the uncompressed size (offset 24) in padding.bin's central directory entry.
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + int.from_bytes(data[entry + 28:entry + 30], "little")] \
            != b"padding.bin":
        entry = data.index(b"PK\x01\x02", entry + 4)
    assert int.from_bytes(data[entry + 24:entry + 28], "little") == 4 << 20
    data[entry + 24:entry + 28] = (100).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))

    with pytest.raises(DeepPoseError):
        fetch_dataset(lspet_with(), root, archive=bomb, max_extract_bytes=1 << 20,
                      progress=False)
    assert not (root / "lspet").exists()
    assert leftover_temp_dirs(root) == []


# --------------------------------------------------------------------------------------------
# File modes


@pytest.mark.parametrize("umask, expected", [(0o002, 0o775), (0o022, 0o755)],
                         ids=["umask-002", "umask-022"])
def test_dataset_directory_mode_follows_the_umask(tmp_path, root, umask, expected):
    local = tmp_path / "copy.zip"
    build_zip(local, lspet_members())
    previous = os.umask(umask)
    try:
        fetch_dataset(lspet_with(), root, archive=local, progress=False)
        forced = fetch_dataset(lspet_with(), root, archive=local, force=True, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(forced.dataset_dir.stat().st_mode) == expected
    assert stat.S_IMODE((forced.dataset_dir / "images").stat().st_mode) == expected


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
        import deeppose_cli.data.synthetic as synthetic
    except ImportError:  # the generator module is not written yet: stand in for it
        synthetic = types.ModuleType("deeppose_cli.data.synthetic")
        monkeypatch.setitem(sys.modules, "deeppose_cli.data.synthetic", synthetic)
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
        import deeppose_cli.data.synthetic as synthetic
    except ImportError:
        synthetic = types.ModuleType("deeppose_cli.data.synthetic")
        monkeypatch.setitem(sys.modules, "deeppose_cli.data.synthetic", synthetic)
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


# --------------------------------------------------------------------------- tar archives

def _lspet_tar(tmp_path, name="lspet_dataset.tar.gz", top="lspet_dataset"):
    import tarfile

    from conftest import write_lsp_like

    source = write_lsp_like(tmp_path / "src" / top, "lspet", 6)
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname=top)
    return archive


def test_a_tar_archive_is_extracted_and_indexed(tmp_path):
    from deeppose_cli.data.annotations import build_index

    archive = _lspet_tar(tmp_path)
    result = fetch_dataset(load_dataset_manifest("lspet"), tmp_path / "data", archive=archive,
                           progress=False)
    assert (result.dataset_dir / "joints.mat").is_file()  # the top directory was stripped
    assert len(list((result.dataset_dir / "images").glob("*.jpg"))) == 6
    report = build_index(load_dataset_manifest("lspet"), result.dataset_dir, val_fraction=0.0)
    assert report.counts["train"] == 6


def test_a_tar_member_outside_the_dataset_is_refused(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "lspet_dataset.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"x"
        info = tarfile.TarInfo("joints.mat")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/evil.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        escape = tarfile.TarInfo("../escape.txt")
        escape.size = len(data)
        tf.addfile(escape, io.BytesIO(data))
    with pytest.raises(DeepPoseError, match="refused"):
        fetch_dataset(load_dataset_manifest("lspet"), tmp_path / "data", archive=archive,
                      progress=False)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "data" / "lspet" / "joints.mat").exists()


def test_a_tar_bomb_is_refused_before_writing(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "lspet_dataset.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 8 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(DeepPoseError, match="would unpack to 8.0 MiB, more than the limit"):
        fetch_dataset(load_dataset_manifest("lspet"), tmp_path / "data", archive=archive,
                      progress=False, max_extract_bytes=1 << 20)
    assert not (tmp_path / "data" / "lspet" / "zeros.bin").exists()


# --------------------------------------------------------------------------------------------
# Servers that never finish: a deadline on progress, a cap on size, a bound on expansion

DEEPPOSE = str(Path(sys.executable).with_name("deeppose"))


class MisbehavingServer:
    """A loopback server of the archive that never finishes, with raw sockets to control
    every byte: ``trickle`` sends the headers and 600 bytes of a zip, then one byte every
    ``interval`` seconds; ``slow-headers`` the status line, then header bytes as slowly;
    ``endless`` a zip signature, then zeros as fast as it can, with no Content-Length.
    ``requests`` holds each request's first lines."""

    def __init__(self, mode: str, interval: float = 0.05):
        import socketserver

        self.mode, self.interval = mode, interval
        self.requests: list[str] = []
        self.stop = threading.Event()
        start = build_zip_bytes(lspet_members())[:600]
        state = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                state.requests.append(self.request.recv(65536).decode("latin-1"))
                try:
                    if state.mode == "trickle":
                        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip"
                                             b"\r\nContent-Length: 100000\r\n\r\n" + start)
                        while not state.stop.wait(state.interval):
                            self.request.sendall(b"\0")
                    elif state.mode == "slow-headers":
                        self.request.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                        while not state.stop.wait(state.interval):
                            self.request.sendall(b"a")
                    else:
                        self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/zip"
                                             b"\r\n\r\nPK\x03\x04")
                        zeros = bytes(1 << 16)
                        while not state.stop.is_set():
                            self.request.sendall(zeros)
                except OSError:
                    pass  # the client gave up: what it should do

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{ARCHIVE_NAME}"

    def __enter__(self) -> "MisbehavingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def build_zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def run_fetch(*argv: str, stall_seconds: str = "0.5") -> subprocess.CompletedProcess:
    """``deeppose fetch ARGV`` as a real process: a hang shows as a timeout, not as a stuck
    test run."""
    env = {**os.environ, "DEEPPOSE_FETCH_STALL_SECONDS": stall_seconds}
    return subprocess.run([DEEPPOSE, "fetch", *argv], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("mode, says", [("trickle", "stalled: "),
                                        ("slow-headers", "stalled: no response within 0.5 s")])
def test_a_server_that_trickles_is_given_up_with_its_url(tmp_path, mode, says):
    with MisbehavingServer(mode) as slow:
        started = time.monotonic()
        result = run_fetch("lspet", "--root", str(tmp_path / "data"), "--url", slow.url)
        elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"could not download lspet_dataset.zip from {slow.url} ({says}" in result.stderr
    assert "2 tries" in result.stderr and len(slow.requests) == 2  # retried once, then failed
    assert "Traceback" not in result.stderr
    assert elapsed < 30  # seconds: half-second windows, not one read timeout per byte


def test_a_body_without_end_stops_at_the_manifests_size(tmp_path):
    code = ("import dataclasses, sys\n"
            "from deeppose_cli.core.errors import DeepPoseError\n"
            "from deeppose_cli.core.manifests import load_dataset_manifest\n"
            "from deeppose_cli.data.fetch import fetch_dataset\n"
            "base = load_dataset_manifest('lspet')\n"
            "manifest = dataclasses.replace(base, archive={**base.archive, 'urls': [sys.argv[1]],"
            " 'size': 300000})\n"
            "try:\n    fetch_dataset(manifest, sys.argv[2], progress=False)\n"
            "except DeepPoseError as e:\n    print(e)\n")
    with MisbehavingServer("endless") as endless:
        result = subprocess.run([sys.executable, "-c", code, endless.url, str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
    assert "the server sent more than the 300000 bytes the manifest gives" in result.stdout, \
        result.stdout + result.stderr
    assert not (tmp_path / "downloads" / f"{ARCHIVE_NAME}.partial").exists()


def test_a_body_without_end_stops_at_the_bound_when_the_size_is_unknown(tmp_path):
    with MisbehavingServer("endless") as endless:
        result = run_fetch("lspet", "--root", str(tmp_path), "--url", endless.url,
                           "--sha256", "0" * 64, "--max-extract-gib", "0.001")
    assert result.returncode == 1, result.stderr
    assert "the server sent more than 2.0 MiB, more than an archive that unpacks to at most" \
        in result.stderr
    assert not (tmp_path / "downloads" / f"{ARCHIVE_NAME}.partial").exists()


@pytest.mark.parametrize("layout", ["one member", "many small members", "tar.gz"])
def test_an_archive_expanding_more_than_200_to_1_is_refused_within_the_bound(tmp_path, layout):
    import tarfile

    members = lspet_members()
    if layout == "one member":
        members["images/zeros.bin"] = bytes(48 << 20)
    else:
        members.update({f"images/zeros{k:03d}.bin": bytes(512 << 10) for k in range(96)})
    if layout == "tar.gz":
        archive = tmp_path / "lspet_dataset.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:
        archive = tmp_path / ARCHIVE_NAME
        build_zip(archive, members)
    assert archive.stat().st_size < 1 << 20  # 48 MiB, far below LSPET's 4 GiB bound
    with pytest.raises(DeepPoseError, match=r"expands \d+:1 .* more than the 200:1"):
        fetch_dataset(load_dataset_manifest("lspet"), tmp_path / "data", archive=archive,
                      progress=False)
    assert not (tmp_path / "data" / "lspet").exists()
    assert leftover_temp_dirs(tmp_path / "data") == []


def test_a_port_out_of_range_is_named_as_such(tmp_path):
    result = run_fetch("lspet", "--root", str(tmp_path),
                       "--url", "http://127.0.0.1:99999/lspet_dataset.zip")
    assert result.returncode == 1
    assert "invalid URL http://127.0.0.1:99999/lspet_dataset.zip: Port out of range" \
        in result.stderr
