"""``deeppose fetch``: download, verify and unpack a dataset archive, or render the synthetic one.

The dataset directory ``ROOT/<name>`` only ever appears complete: archives are downloaded to
``ROOT/downloads/<file>.partial`` (resumable with an HTTP Range request), checked against the
manifest's size and sha256, unpacked into a temporary directory inside ROOT and renamed into
place with a ``.deeppose-complete.json`` marker. A failure at any step removes the temporary
directory and leaves the previous dataset (if any) untouched.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DeepPoseError
from .files import sha256_of
from .manifests import DatasetManifest

#: Seconds a connect or a read may stall before the download counts as failed.
SOCKET_TIMEOUT_S = 30.0
#: Bytes read from the network (and from archives) per step.
CHUNK_SIZE = 1 << 16
#: Written last into a dataset directory; its presence means the directory is complete.
MARKER_NAME = ".deeppose-complete.json"
#: Environment variable naming the default data root.
DATA_ROOT_ENV = "DEEPPOSE_DATA"

_USER_AGENT = "deeppose-fetch/1"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass
class FetchResult:
    """What ``fetch_dataset`` did, for the CLI to report and for callers to locate the data."""

    dataset_dir: Path
    status: str  # "downloaded", "extracted from archive", "generated", "already complete"
    archive: Path | None
    sha256: str | None
    size: int | None
    message: str


def default_data_root() -> Path:
    """Where datasets live unless ``--root`` says otherwise: ``$DEEPPOSE_DATA`` or ``./data``."""
    env = os.environ.get(DATA_ROOT_ENV, "")
    return Path(env) if env else Path("data")


def fetch_dataset(
    manifest: DatasetManifest,
    root: Path,
    *,
    url: str | None = None,
    archive: Path | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> FetchResult:
    """Make ``root/<manifest.name>`` hold the complete dataset, doing only the work still needed.

    ``url`` replaces the manifest's mirrors; ``archive`` is a local copy used instead of the
    network; ``sha256`` is the checksum to accept (overriding the manifest's, e.g. for a copy
    obtained elsewhere); ``force`` fetches again even when a complete copy is present.
    """
    root = Path(root)
    dataset_dir = root / manifest.name
    pinned_sha256 = _normalise_sha256(sha256) if sha256 is not None else None

    marker = _read_marker(dataset_dir)
    if marker is not None and not force:
        when = f" (fetched {marker['date']})" if marker.get("date") else ""
        return FetchResult(
            dataset_dir=dataset_dir,
            status="already complete",
            archive=None,
            sha256=marker.get("sha256"),
            size=marker.get("size"),
            message=f"{dataset_dir} is already complete{when}; pass --force to fetch it again.",
        )

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeepPoseError(f"cannot create data root {root}: {e.strerror or e}") from None

    if archive is not None:
        archive_path = Path(archive)
        checked = _check_archive(manifest, archive_path, pinned_sha256, source_is_user_file=True)
        _install(manifest, dataset_dir, source=str(archive_path), archive_path=archive_path,
                 sha256=checked.sha256, size=checked.size)
        return _archive_result(dataset_dir, "extracted from archive", archive_path, checked,
                               f"Extracted {archive_path}")

    urls = [url] if url else [str(u) for u in manifest.archive.get("urls", [])]
    if not urls and manifest.generator:
        return _generate(manifest, dataset_dir)
    if not urls:
        raise DeepPoseError(
            f"dataset {manifest.name!r} lists no download URL; pass --url URL or "
            f"--archive FILE with a copy of its archive"
        )

    filename = _archive_filename(manifest, urls[0])
    downloads = root / "downloads"
    final_path = downloads / filename
    partial_path = downloads / f"{filename}.partial"

    if final_path.is_file() and not force:
        checked = _check_archive(manifest, final_path, pinned_sha256, source_is_user_file=False)
        _install(manifest, dataset_dir, source=str(final_path), archive_path=final_path,
                 sha256=checked.sha256, size=checked.size)
        return _archive_result(dataset_dir, "extracted from archive", final_path, checked,
                               f"Extracted the earlier download {final_path}")

    downloads.mkdir(parents=True, exist_ok=True)
    if force and partial_path.exists():
        partial_path.unlink()  # --force means a fresh copy, not the remains of an old one
    used_url = _download_from_mirrors(urls, partial_path, progress=progress)
    checked = _check_archive(manifest, partial_path, pinned_sha256, source_is_user_file=False)
    os.replace(partial_path, final_path)
    _install(manifest, dataset_dir, source=used_url, archive_path=final_path,
             sha256=checked.sha256, size=checked.size)
    return _archive_result(dataset_dir, "downloaded", final_path, checked,
                           f"Downloaded {used_url} and extracted it")


# --------------------------------------------------------------------------------------------
# Results and markers


@dataclass
class _CheckedArchive:
    sha256: str
    size: int
    checksum_known: bool


def _archive_result(dataset_dir: Path, status: str, archive_path: Path, checked: _CheckedArchive,
                    what: str) -> FetchResult:
    message = f"{what} into {dataset_dir} ({checked.size} bytes, sha256 {checked.sha256})."
    if not checked.checksum_known:
        message += (" No checksum is recorded for this archive; "
                    f"pin it with --sha256 {checked.sha256}.")
    return FetchResult(dataset_dir=dataset_dir, status=status, archive=archive_path,
                       sha256=checked.sha256, size=checked.size, message=message)


def _read_marker(dataset_dir: Path) -> dict[str, Any] | None:
    """The completion marker's contents, or None when the directory is absent or incomplete."""
    path = dataset_dir / MARKER_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # present but unreadable still means the rename completed
    return data if isinstance(data, dict) else {}


def _write_marker(directory: Path, **fields: Any) -> None:
    fields["date"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    (directory / MARKER_NAME).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Verification


def _normalise_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise DeepPoseError(f"--sha256 must be 64 hexadecimal digits, got {value!r}")
    return digest


def _check_archive(manifest: DatasetManifest, path: Path, pinned_sha256: str | None, *,
                   source_is_user_file: bool) -> _CheckedArchive:
    """Compare ``path`` with the expected size and sha256; on mismatch raise and keep the file.

    A checksum given by the user (``pinned_sha256``) replaces the manifest's size and sha256,
    which describe only the official archive.
    """
    if not path.exists():
        raise DeepPoseError(f"archive {path} does not exist")
    if not path.is_file():
        raise DeepPoseError(f"archive {path} is not a file")
    size = path.stat().st_size
    actual = sha256_of(path)
    official = _normalise_manifest_sha256(manifest)
    expected = pinned_sha256 or official

    if source_is_user_file:
        label = str(path)
        keep = ""
        accept = f"; if you trust this copy, accept it with --sha256 {actual}"
    else:
        label = f"the downloaded {path.name.removesuffix('.partial')}"
        keep = f" (kept for inspection at {path}; delete it to download again)"
        accept = ""

    expected_size = int(manifest.archive.get("size", 0) or 0)
    if pinned_sha256 is None and expected_size > 0 and size != expected_size:
        raise DeepPoseError(
            f"{label} has the wrong size: expected {expected_size} bytes, got {size} "
            f"(sha256 {actual}){keep}{accept}"
        )
    if expected and actual != expected:
        which = "--sha256" if pinned_sha256 else f"the official checksum of {manifest.name}"
        raise DeepPoseError(
            f"{label} does not match {which}: expected sha256 {expected}, got {actual}"
            f"{keep}{accept if not pinned_sha256 else ''}"
        )
    return _CheckedArchive(sha256=actual, size=size, checksum_known=bool(expected))


def _normalise_manifest_sha256(manifest: DatasetManifest) -> str:
    value = str(manifest.archive.get("sha256", "") or "").strip().lower()
    if value and not _SHA256_RE.match(value):
        where = manifest.path or manifest.name
        raise DeepPoseError(f"{where}: archive.sha256 must be 64 hexadecimal digits")
    return value


# --------------------------------------------------------------------------------------------
# Download


def _archive_filename(manifest: DatasetManifest, first_url: str) -> str:
    name = str(manifest.archive.get("filename", "") or "")
    if not name:
        name = PurePosixPath(urllib.parse.urlsplit(first_url).path).name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        name = f"{manifest.name}.archive"
    return name


class _DownloadFailed(Exception):
    """One mirror failed; the message is a short reason for the combined error."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _download_from_mirrors(urls: list[str], partial_path: Path, *, progress: bool) -> str:
    """Download into ``partial_path`` from the first mirror that works; return its URL."""
    failures: list[str] = []
    for candidate in urls:
        try:
            _download(candidate, partial_path, progress=progress)
            return candidate
        except _DownloadFailed as e:
            failures.append(f"{candidate} ({_one_line(e)})")
    tried = "; ".join(failures)
    resume = ""
    if partial_path.exists() and partial_path.stat().st_size > 0:
        resume = (f" The {partial_path.stat().st_size} bytes already in {partial_path} "
                  f"are resumed next time.")
    raise DeepPoseError(
        f"could not download {partial_path.name.removesuffix('.partial')} from {tried}; "
        f"if this machine is offline, pass --archive FILE with a copy obtained elsewhere.{resume}"
    )


def _network_reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return "timed out"
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror.lower()
        return _one_line(reason)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return _one_line(error) or type(error).__name__


def _open(url: str, start: int):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S)


def _range_total(content_range: str | None) -> int | None:
    """The total size from ``Content-Range: bytes a-b/TOTAL`` or ``bytes */TOTAL``."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _download(url: str, partial_path: Path, *, progress: bool) -> None:
    """Fetch ``url`` into ``partial_path``, resuming what it holds when the server allows."""
    for _attempt in range(2):  # a second attempt only after discarding an unusable partial file
        start = partial_path.stat().st_size if partial_path.exists() else 0
        try:
            response = _open(url, start)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start > 0:
                total = _range_total(e.headers.get("Content-Range") if e.headers else None)
                e.close()
                if total is None or total == start:
                    return  # the partial file already holds every byte
                partial_path.unlink()  # longer than the remote file: not the same file
                continue
            raise _DownloadFailed(_network_reason(e)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise _DownloadFailed(_network_reason(e)) from None

        with response:
            status = getattr(response, "status", 200)
            if status == 206:
                if _range_start(response.headers.get("Content-Range")) != start:
                    # The server answered some other range: start over.
                    partial_path.unlink(missing_ok=True)
                    continue
                offset = start
            else:
                offset = 0  # the server ignored Range and sent the whole file
            length_header = response.headers.get("Content-Length")
            remaining = int(length_header) if length_header and length_header.isdigit() else None
            total = offset + remaining if remaining is not None else None
            _copy_response(response, partial_path, offset, total, progress=progress)
        return
    raise _DownloadFailed("the server's answers to a resumed download were inconsistent")


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not (enabled and console.is_terminal),
    )


def _copy_response(response, partial_path: Path, offset: int, total: int | None, *,
                   progress: bool) -> None:
    """Write the body at ``offset`` of ``partial_path``; raise if the body ends early."""
    written = offset
    mode = "r+b" if offset > 0 else "wb"
    with _progress_bar(progress) as bar:
        task = bar.add_task(partial_path.name.removesuffix(".partial"), total=total,
                            completed=offset)
        try:
            with open(partial_path, mode) as out:
                out.seek(offset)
                out.truncate()
                while True:
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(task, completed=written)
        except (http.client.HTTPException, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.filename == str(partial_path):
                raise DeepPoseError(f"cannot write {partial_path}: {e.strerror or e}") from None
            raise _DownloadFailed(f"{_network_reason(e)} after {written} bytes") from None
    if total is not None and written < total:
        raise _DownloadFailed(f"connection closed after {written} of {total} bytes")


# --------------------------------------------------------------------------------------------
# Extraction and installation


def _member_parts(info: zipfile.ZipInfo) -> list[str]:
    """The member's path components after refusing anything that could land outside the target."""
    name = info.filename
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise DeepPoseError(f"archive member {name!r} is a symbolic link; refusing to extract")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DeepPoseError(f"archive member {name!r} is not a regular file; refusing to extract")
    if "\x00" in name:
        raise DeepPoseError(f"archive member {name!r} has a NUL in its name; refusing to extract")
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        raise DeepPoseError(f"archive member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise DeepPoseError(f"archive member {name!r} points outside the dataset directory; "
                            f"refusing to extract")
    if any(_DRIVE_RE.match(p) for p in parts):
        raise DeepPoseError(f"archive member {name!r} has a drive letter; refusing to extract")
    return parts


def _extract_zip(archive_path: Path, target: Path, annotations: str) -> int:
    """Unpack ``archive_path`` into the empty directory ``target``; return the file count.

    Every member is checked before anything is written, and each destination is checked
    again against ``target`` after resolving, so a hostile archive writes nothing at all.
    """
    try:
        with zipfile.ZipFile(archive_path) as zf:
            members: list[tuple[zipfile.ZipInfo, list[str]]] = []
            for info in zf.infolist():
                parts = _member_parts(info)
                if not parts or parts[0] == "__MACOSX":
                    continue  # resource forks added by macOS's archiver
                members.append((info, parts))
            if not members:
                raise DeepPoseError(f"archive {archive_path} is empty")

            at_root = any("/".join(parts) == annotations for _info, parts in members)
            top_levels = {parts[0] for _info, parts in members}
            only_dir = next(iter(top_levels)) if len(top_levels) == 1 else None
            strip = (not at_root and only_dir is not None
                     and all(len(parts) > 1 or info.is_dir() for info, parts in members))

            target_resolved = target.resolve()
            count = 0
            for info, parts in members:
                relative = parts[1:] if strip else parts
                if not relative:
                    continue
                destination = target.joinpath(*relative)
                if not destination.resolve().is_relative_to(target_resolved):
                    raise DeepPoseError(f"archive member {info.filename!r} points outside the "
                                        f"dataset directory; refusing to extract")
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(destination, "xb") as out:
                    shutil.copyfileobj(source, out, CHUNK_SIZE)
                count += 1
    except zipfile.BadZipFile as e:
        raise DeepPoseError(f"{archive_path} is not a valid zip archive ({_one_line(e)})") from None
    except (zlib.error, EOFError) as e:
        raise DeepPoseError(f"{archive_path} is corrupt ({_one_line(e)})") from None
    except NotImplementedError as e:
        raise DeepPoseError(
            f"{archive_path} uses an unsupported compression ({_one_line(e)})") from None
    except RuntimeError as e:  # encrypted members
        raise DeepPoseError(f"cannot extract {archive_path}: {_one_line(e)}") from None
    except FileExistsError as e:
        raise DeepPoseError(f"archive {archive_path} holds {e.filename} twice") from None
    except OSError as e:
        raise DeepPoseError(f"cannot extract {archive_path}: {e.strerror or e}") from None

    if annotations and not (target / annotations).is_file():
        raise DeepPoseError(f"archive {archive_path} has no {annotations}; is it the right file?")
    return count


def _new_temp_dir(dataset_dir: Path, purpose: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.{purpose}-", dir=dataset_dir.parent))


def _swap_into_place(staged: Path, dataset_dir: Path) -> None:
    """Replace ``dataset_dir`` by ``staged``, removing the old copy only once the new one is in."""
    if not dataset_dir.exists() and not dataset_dir.is_symlink():
        os.replace(staged, dataset_dir)
        return
    old = _new_temp_dir(dataset_dir, "old")
    os.rmdir(old)  # only its unique name is wanted
    os.replace(dataset_dir, old)
    try:
        os.replace(staged, dataset_dir)
    except BaseException:
        os.replace(old, dataset_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _install(manifest: DatasetManifest, dataset_dir: Path, *, source: str, archive_path: Path,
             sha256: str, size: int) -> None:
    """Extract a verified archive into a temporary directory, mark it complete and move it in."""
    staged = _new_temp_dir(dataset_dir, "tmp")
    try:
        annotations = str(manifest.archive.get("annotations", "") or "")
        files = _extract_zip(archive_path, staged, annotations)
        _write_marker(staged, dataset=manifest.name, source=source, archive=str(archive_path),
                      sha256=sha256, size=size, files=files)
        _swap_into_place(staged, dataset_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _generate(manifest: DatasetManifest, dataset_dir: Path) -> FetchResult:
    """Render a generated dataset (``[generator]`` in its manifest) through the same staging."""
    from .synthetic import generate_dataset

    try:
        num_images = int(manifest.generator["num_images"])
        seed = int(manifest.generator["seed"])
        image_size = int(manifest.generator["image_size"])
    except KeyError as e:
        where = manifest.path or manifest.name
        raise DeepPoseError(f"{where}: [generator] is missing {e}") from None

    staged = _new_temp_dir(dataset_dir, "tmp")
    try:
        generate_dataset(staged, num_images=num_images, seed=seed, image_size=image_size)
        _write_marker(staged, dataset=manifest.name, source="generated", sha256=None, size=None,
                      generator=dict(manifest.generator))
        _swap_into_place(staged, dataset_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return FetchResult(
        dataset_dir=dataset_dir,
        status="generated",
        archive=None,
        sha256=None,
        size=None,
        message=f"Generated {num_images} {manifest.name} images (seed {seed}) into {dataset_dir}.",
    )
