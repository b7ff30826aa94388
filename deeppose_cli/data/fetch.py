"""``deeppose fetch``: download, verify and unpack a dataset archive, or render the synthetic one.

The dataset directory ``ROOT/<name>`` only ever appears complete: archives are downloaded to
``ROOT/downloads/<file>.partial`` (resumable with an HTTP Range request guarded by If-Range, so
a file that changed on the server is fetched again rather than spliced), checked for a zip
signature and against the manifest's size and sha256, unpacked within a size bound into a
temporary directory inside ROOT and renamed into place with a ``.deeppose-complete.json``
marker. Only then does the ``.partial`` file take its final name, so a final name in
``downloads/`` always means an archive that was verified and extracted once. A failure at any
step removes the temporary directory and leaves the previous dataset (if any) untouched.

A dataset may come in several archives (MPII: its images and its annotations, listed as
``[[archive.parts]]`` in the manifest): each is obtained and verified as above, unpacked into
the same staging directory (into its own subdirectory where the manifest says so), and the
directory is renamed into place only once every archive is in. ``--archive`` names a local
copy of each (``NAME=FILE``, or a FILE whose name says which archive it is).

A download cannot hang or fill the disk: a window without progress (``STALL_SECONDS``)
retries the mirror and then fails naming it, and no download outgrows the archive's size
(the manifest's, else what the extraction bound allows). Archives that expand more than
``MAX_EXPANSION_RATIO`` to one are refused before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import json
import math
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.errors import DeepPoseError
from ..core.files import make_temp_dir, os_error_reason, replace_directory, sha256_of
from ..core.manifests import DatasetManifest
from ..core.manifests import default_data_root as manifest_data_root

#: Seconds a connect or a read may stall before the download counts as failed.
SOCKET_TIMEOUT_S = 30.0
#: A download that receives fewer than ``STALL_MIN_BYTES`` in this many seconds (or no
#: response in as long) has stalled ($DEEPPOSE_FETCH_STALL_SECONDS): a server trickling one
#: byte every 20 s never lets a read time out, but it is no download.
STALL_SECONDS = 60.0
STALL_MIN_BYTES = 16 << 10
STALL_ENV = "DEEPPOSE_FETCH_STALL_SECONDS"
#: Tries of a mirror that stalls (each resuming the bytes already there) before the next.
STALL_TRIES = 2
#: Most an archive member, or a whole archive, may expand: dataset archives hold JPEGs that
#: barely compress, while 1 GiB of zeros zips to 1 MiB (1000:1), a decompression bomb.
MAX_EXPANSION_RATIO = 200
#: Members up to this size are not judged by their ratio (a small text file compresses well).
RATIO_FLOOR_BYTES = 1 << 20
#: Bytes read from the network (and from archives) per step.
CHUNK_SIZE = 1 << 16
#: Written last into a dataset directory; its presence means the directory is complete.
MARKER_NAME = ".deeppose-complete.json"
#: Most bytes an archive may unpack to when its manifest sets no ``max_extracted_bytes``.
DEFAULT_MAX_EXTRACTED_BYTES = 8 << 30
#: Environment variable that raises (or lowers) the extraction bound, in GiB.
MAX_EXTRACT_ENV = "DEEPPOSE_MAX_EXTRACT_GIB"

_USER_AGENT = "deeppose-fetch/1"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a first member, or an empty archive
# Archives whose name ends so are tar files (plain or gzip/bzip2/xz), all others zip files.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COMPRESSED_TAR_SIGNATURES = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_HTML_STARTS = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


@dataclass
class PartResult:
    """How one archive of a dataset was obtained."""

    name: str           # the archive's name in the manifest (its dataset's name for one archive)
    status: str         # "downloaded" or "extracted from archive"
    archive: Path
    sha256: str
    size: int
    what: str           # what was done: "Downloaded URL and extracted it", ...
    details: str        # "(N bytes, sha256 X)." and how to pin the checksum where none is known

    @property
    def message(self) -> str:
        return f"{self.what} {self.details}"


@dataclass
class FetchResult:
    """What ``fetch_dataset`` did, for the CLI to report and for callers to locate the data.

    ``archive``, ``sha256`` and ``size`` describe a dataset's only archive; a dataset of
    several archives has them in ``parts`` (and None here).
    """

    dataset_dir: Path
    status: str  # "downloaded", "extracted from archive", "generated", "already complete"
    archive: Path | None
    sha256: str | None
    size: int | None
    message: str
    parts: list[PartResult] = field(default_factory=list)


@dataclass
class _Part:
    """One archive of a dataset (``DatasetManifest.archive_parts``), with the names the
    messages about it use."""

    manifest: DatasetManifest
    spec: dict[str, Any]
    count: int  # how many archives the dataset has

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def urls(self) -> list[str]:
        return [str(u) for u in self.spec.get("urls", [])]

    @property
    def contains(self) -> str:
        return str(self.spec.get("contains", "") or "")

    @property
    def into(self) -> list[str]:
        """The subdirectory it unpacks into, as path components (checked to stay inside)."""
        parts = [p for p in re.split(r"[/\\]", str(self.spec.get("into", "") or ""))
                 if p not in ("", ".")]
        if ".." in parts or any(_DRIVE_RE.match(p) for p in parts):
            raise DeepPoseError(f"{self.where}: archive {self.name!r} unpacks outside its "
                                "dataset directory (into = ...)")
        return parts

    @property
    def where(self) -> Path | str:
        return self.manifest.path or self.manifest.name

    @property
    def title(self) -> str:
        """How messages name it: the dataset for a one-archive dataset, else the archive."""
        return self.manifest.name if self.count == 1 else \
            f"{self.manifest.name}'s {self.name} archive"

    def filename(self, first_url: str = "") -> str:
        name = str(self.spec.get("filename", "") or "")
        if not name and first_url:
            name = PurePosixPath(urllib.parse.urlsplit(first_url).path).name
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            name = f"{self.manifest.name}-{self.name}.archive" if self.count > 1 \
                else f"{self.manifest.name}.archive"
        return name


def default_data_root() -> Path:
    """Where datasets live unless ``--root`` says otherwise: ``$DEEPPOSE_DATA`` or ``./data``."""
    return manifest_data_root()


def dataset_parts(manifest: DatasetManifest) -> list[_Part]:
    specs = manifest.archive_parts
    names = [str(spec.get("name", "")) for spec in specs]
    if len(specs) > 1 and (not all(names) or len(set(names)) != len(names)):
        raise DeepPoseError(f"{manifest.path or manifest.name}: each [[archive.parts]] needs "
                            "a name of its own")
    return [_Part(manifest, spec, len(specs)) for spec in specs]


def assign_archives(manifest: DatasetManifest, given: list[str]) -> dict[str, Path]:
    """Which archive of the dataset each ``--archive`` value is: ``NAME=FILE`` names it; a
    plain FILE is the only archive of a one-archive dataset, else the archive whose file name
    it has, else the only archive of its kind (tar or zip, read from the file's first bytes)."""
    parts = dataset_parts(manifest)
    names = {p.name for p in parts}
    assigned: dict[str, Path] = {}
    for value in given:
        name, sep, rest = value.partition("=")
        if sep and name in names:
            part_name, path = name, Path(rest)
        else:
            path = Path(value)
            part_name = _guess_part(manifest, parts, path, assigned)
        if part_name in assigned:
            raise DeepPoseError(f"--archive: two files given for {manifest.name}'s "
                                f"{part_name} archive ({assigned[part_name]} and {path})")
        assigned[part_name] = path
    return assigned


def _guess_part(manifest: DatasetManifest, parts: list[_Part], path: Path,
                assigned: dict[str, Path]) -> str:
    if len(parts) == 1:
        return parts[0].name
    by_name = [p for p in parts if p.filename().lower() == path.name.lower()]
    if len(by_name) == 1:
        return by_name[0].name
    by_kind = [p for p in parts if p.name not in assigned
               and archive_kind(p.filename()) == _file_kind(path)]
    if len(by_kind) == 1:
        return by_kind[0].name
    choices = " or ".join(f"--archive {p.name}={path}" for p in parts)
    raise DeepPoseError(f"--archive {path}: {manifest.name} has {len(parts)} archives and this "
                        f"file's name does not say which it is; write {choices}")


def assign_checksums(manifest: DatasetManifest, given: list[str]) -> dict[str, str]:
    """``--sha256`` values by archive: ``HEX`` for a one-archive dataset, else ``NAME=HEX``."""
    parts = dataset_parts(manifest)
    names = [p.name for p in parts]
    pins: dict[str, str] = {}
    for value in given:
        name, sep, digest = value.rpartition("=")
        if not sep:
            if len(parts) > 1:
                raise DeepPoseError(f"--sha256: {manifest.name} has {len(parts)} archives; "
                                    f"write --sha256 NAME=HEX with NAME one of {', '.join(names)}")
            name, digest = names[0], value
        elif name not in names:
            raise DeepPoseError(f"--sha256 {value}: {manifest.name} has no archive {name!r} "
                                f"(its archives: {', '.join(names)})")
        pins[name] = _normalise_sha256(digest)
    return pins


def fetch_dataset(
    manifest: DatasetManifest,
    root: Path,
    *,
    url: str | None = None,
    archive: Path | None = None,
    sha256: str | None = None,
    archives: dict[str, Path] | None = None,
    checksums: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
    max_extract_bytes: int | None = None,
) -> FetchResult:
    """Make ``root/<manifest.name>`` hold the complete dataset, doing only the work still needed.

    A dataset is one archive or several (``DatasetManifest.archive_parts``); each is taken
    from a local copy (``archive`` for a one-archive dataset, ``archives`` by name for any),
    else from an earlier verified download in ``root/downloads``, else downloaded from its
    mirrors (``url`` replaces those of a one-archive dataset). ``sha256`` / ``checksums`` (by
    name) are checksums to accept, overriding the manifest's (e.g. for a copy obtained
    elsewhere); ``force`` fetches again even when a complete copy is present;
    ``max_extract_bytes`` bounds what each archive may unpack to (default:
    ``$DEEPPOSE_MAX_EXTRACT_GIB``, else the manifest's ``max_extracted_bytes``, else 8 GiB).
    Every archive unpacks into one staging directory that is renamed into place only when
    all of them are in.
    """
    root = Path(root)
    dataset_dir = root / manifest.name
    if manifest.format == "coco":
        raise DeepPoseError(f"dataset {manifest.name} was written by `deeppose index --coco` "
                            f"from files already on this machine: there is nothing to fetch "
                            f"(`deeppose index {manifest.name}` indexes it again)")
    parts = dataset_parts(manifest)
    local = dict(archives or {})
    pins = {name: _normalise_sha256(value) for name, value in (checksums or {}).items()}
    if archive is not None:
        local[parts[0].name if len(parts) == 1 else
              assign_archives(manifest, [str(archive)]).popitem()[0]] = Path(archive)
    if sha256 is not None:
        pins.update(assign_checksums(manifest, [sha256]))
    unknown = sorted((set(local) | set(pins)) - {p.name for p in parts})
    if unknown:
        raise DeepPoseError(f"{manifest.name} has no archive named {', '.join(unknown)} "
                            f"(its archives: {', '.join(p.name for p in parts)})")
    if url and len(parts) > 1:
        raise DeepPoseError(f"--url replaces the mirrors of a dataset of one archive; "
                            f"{manifest.name} has {len(parts)}: give local copies with "
                            + " ".join(f"--archive {p.name}=FILE" for p in parts))

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

    for part in parts:
        _extraction_limit(part, max_extract_bytes)  # a bad bound fails before any work
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeepPoseError(f"cannot create data root {root}: {e.strerror or e}") from None

    if not local and not url and manifest.generator and not any(p.urls for p in parts):
        return _generate(manifest, dataset_dir)

    with staged_dataset(dataset_dir) as staged:
        results = [_fetch_part(part, root, staged, local=local, url=url,
                               pinned_sha256=pins.get(part.name), force=force,
                               progress=progress,
                               limit=_extraction_limit(part, max_extract_bytes))
                   for part in parts]
        files = sum(r.files for r in results)
        if len(results) == 1:
            only = results[0]
            _write_marker(staged, dataset=manifest.name, source=only.source,
                          archive=str(only.result.archive), sha256=only.result.sha256,
                          size=only.result.size, files=files)
        else:
            _write_marker(staged, dataset=manifest.name, files=files, parts=[
                {"name": r.result.name, "source": r.source, "archive": str(r.result.archive),
                 "sha256": r.result.sha256, "size": r.result.size, "files": r.files}
                for r in results])
    return _fetch_result(dataset_dir, [r.result for r in results])


def _fetch_part(part: _Part, root: Path, staged: Path, *, local: dict[str, Path],
                url: str | None, pinned_sha256: str | None, force: bool, progress: bool,
                limit: int) -> _PartDone:
    """Unpack one archive into ``staged``: from its local copy, an earlier download, or the
    network."""
    archive_path = local.get(part.name)
    if archive_path is not None:
        try:
            checked = _check_archive(part, archive_path, pinned_sha256, source_is_user_file=True)
            files = _unpack(part, archive_path, staged, limit)
        except _BadArchive as e:
            if not e.unusable:
                raise
            raise DeepPoseError(
                f"{_sentence(str(e))} It was given with --archive, so it cannot be downloaded "
                f"again: replace that file, or leave out --archive to download the dataset "
                f"(with --force if a complete copy is already there)."
            ) from None
        return _PartDone(_part_result(part, "extracted from archive", archive_path, checked,
                                      f"Extracted {archive_path}"), str(archive_path), files)

    urls = [url] if url else part.urls
    for candidate in urls:
        _check_url(candidate)
    filename = part.filename(urls[0] if urls else "")
    downloads = root / "downloads"
    final_path = downloads / filename
    partial_path = downloads / f"{filename}.partial"

    discarded = ""
    if final_path.is_file() and not force:
        try:
            checked = _check_archive(part, final_path, pinned_sha256, source_is_user_file=False)
            files = _unpack(part, final_path, staged, limit)
            return _PartDone(_part_result(part, "extracted from archive", final_path, checked,
                                          f"Extracted the earlier download {final_path}"),
                             str(final_path), files)
        except _BadArchive as e:
            if not e.unusable:
                raise
            # Not the archive (an old tool's leftover, a web page, a damaged copy): never
            # let it block every later fetch; it can always be downloaded again.
            final_path.unlink(missing_ok=True)
            discarded = (f"The earlier download {final_path} was unusable ({e.reason}) "
                         f"and was deleted. ")
    if not urls:
        how = ("--url URL or --archive FILE with a copy of its archive" if part.count == 1
               else f"--archive {part.name}=FILE with a copy of its {part.name} archive")
        raise DeepPoseError(f"{discarded}dataset {part.manifest.name!r} lists no download URL "
                            f"for {part.filename()}; pass {how}")

    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeepPoseError(f"cannot create {downloads}: {e.strerror or e}") from None
    if force:
        _discard_partial(partial_path)  # --force means a fresh copy, not the remains of an old one
    try:
        used_url, checked, files = _download_and_unpack(
            part, urls, partial_path, final_path, staged, pinned_sha256, local=local,
            limit=limit, progress=progress)
    except DeepPoseError as e:
        if discarded:
            text = str(e)
            raise DeepPoseError(f"{discarded}{text[:1].upper()}{text[1:]}", e.exit_code) from None
        raise
    return _PartDone(_part_result(part, "downloaded", final_path, checked,
                                  f"{discarded}Downloaded {used_url} and extracted it"),
                     used_url, files)


# --------------------------------------------------------------------------------------------
# Results and markers


@dataclass
class _CheckedArchive:
    sha256: str
    size: int
    checksum_known: bool


@dataclass
class _PartDone:
    result: PartResult
    source: str   # the URL or file it came from, for the marker
    files: int


def _part_result(part: _Part, status: str, archive_path: Path, checked: _CheckedArchive,
                 what: str) -> PartResult:
    details = f"({checked.size} bytes, sha256 {checked.sha256})."
    if not checked.checksum_known:
        pin = checked.sha256 if part.count == 1 else f"{part.name}={checked.sha256}"
        details += f" No checksum is recorded for this archive; pin it with --sha256 {pin}."
    return PartResult(name=part.name, status=status, archive=archive_path,
                      sha256=checked.sha256, size=checked.size, what=what, details=details)


@contextmanager
def staged_dataset(dataset_dir: Path) -> Iterator[Path]:
    """A hidden directory beside ``dataset_dir`` to build the dataset in; it replaces
    ``dataset_dir`` when the block ends, and is removed if the block fails, so a dataset
    directory is always whole. A full disk is one line, not a traceback."""
    staged = make_temp_dir(dataset_dir, "new")
    try:
        yield staged
        replace_directory(staged, dataset_dir)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise DeepPoseError(f"cannot write {dataset_dir}: {os_error_reason(e)}") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _fetch_result(dataset_dir: Path, parts: list[PartResult]) -> FetchResult:
    if len(parts) == 1:
        only = parts[0]
        return FetchResult(dataset_dir=dataset_dir, status=only.status, archive=only.archive,
                           sha256=only.sha256, size=only.size,
                           message=f"{only.what} into {dataset_dir} {only.details}", parts=parts)
    status = "downloaded" if any(p.status == "downloaded" for p in parts) \
        else "extracted from archive"
    message = " ".join(f"{p.name}: {p.message}" for p in parts) + \
        f" All {len(parts)} archives are unpacked into {dataset_dir}."
    return FetchResult(dataset_dir=dataset_dir, status=status, archive=None, sha256=None,
                       size=None, message=message, parts=parts)


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


class _BadArchive(DeepPoseError):
    """The file is not a usable copy of the archive.

    ``unusable`` marks files that can never work (not a zip, a web page, corrupt, hostile,
    missing the annotations): a cached download of that kind is deleted and fetched again.
    A size or checksum mismatch is not ``unusable``: the file may be fine and the expected
    value wrong, so it is kept for the user to judge. ``cut_short`` marks failures that a file
    which is merely incomplete would also show (no zip directory at its end, too few bytes).
    ``reason`` is a short phrase for combined messages.
    """

    def __init__(self, message: str, reason: str, *, unusable: bool = True,
                 cut_short: bool = False):
        super().__init__(message)
        self.reason = reason
        self.unusable = unusable
        self.cut_short = cut_short


def _normalise_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise DeepPoseError(f"--sha256 must be 64 hexadecimal digits, got {value!r}")
    return digest


def _looks_like_html(head: bytes, content_type: str = "") -> bool:
    """Whether a body is a web page (an error or landing page served with status 200)."""
    if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith(_HTML_STARTS)


def archive_kind(filename: str) -> str:
    """``tar`` or ``zip``, from an archive's file name (``.partial`` ignored)."""
    name = filename.lower().removesuffix(".partial")
    return "tar" if name.endswith(TAR_SUFFIXES) else "zip"


def _kind_of(head: bytes, filename: str) -> str:
    """``tar`` or ``zip`` from a file's first bytes, else from its name: a local copy may be
    called anything (``--archive images=copy.bin``)."""
    if head.startswith(_ZIP_SIGNATURES):
        return "zip"
    if head.startswith(_COMPRESSED_TAR_SIGNATURES) or head[257:262] == b"ustar":
        return "tar"
    return archive_kind(filename)


def _file_kind(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return _kind_of(f.read(512), path.name)
    except OSError:
        return archive_kind(path.name)


def _signature_problem(head: bytes, content_type: str = "", kind: str = "zip") -> str | None:
    """None when ``head`` starts like a ``kind`` archive, else a short description of what
    it is (a plain tar has "ustar" at byte 257; compressed ones their compressor's magic)."""
    if kind == "tar":
        if head.startswith(_COMPRESSED_TAR_SIGNATURES) or head[257:262] == b"ustar":
            return None
    elif head.startswith(_ZIP_SIGNATURES):
        return None
    if not head:
        return "an empty file"
    if _looks_like_html(head, content_type):
        return "a web page, not the archive"
    return f"not a valid {kind} archive (it does not start with a {kind} signature)"


def _check_archive(part: _Part, path: Path, pinned_sha256: str | None, *,
                   source_is_user_file: bool) -> _CheckedArchive:
    """Check ``path``'s zip signature, that its directory reads, and its expected size and sha256.

    A checksum given by the user (``pinned_sha256``) replaces the manifest's size and sha256,
    which describe only the official archive. Failures raise ``_BadArchive`` and keep the file.
    """
    if not path.exists():
        raise DeepPoseError(f"archive {path} does not exist")
    if not path.is_file():
        raise DeepPoseError(f"archive {path} is not a file")
    size = path.stat().st_size

    if source_is_user_file:
        label = str(path)
        keep = ""
    else:
        label = f"the downloaded {path.name.removesuffix('.partial')}"
        keep = f" (kept for inspection at {path}; delete it to download again)"

    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise DeepPoseError(f"cannot read {path}: {e.strerror or e}") from None
    kind = _kind_of(head, path.name)
    problem = _signature_problem(head, kind=kind)
    if problem is not None:
        raise _BadArchive(f"{label} is {problem}{keep}.", problem)
    try:
        if kind == "tar":
            with tarfile.open(path) as tf:
                tf.getmembers()  # reads every header: a cut-short file fails here
        else:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
    except (tarfile.TarError, zlib.error) as e:
        reason = f"not a valid tar archive ({_one_line(e)})"
        raise _BadArchive(f"{label} is {reason}{keep}.", reason, cut_short=True) from None
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        # A zip's directory is at its end, so a cut-short download fails here.
        reason = f"not a valid zip archive ({_one_line(e)})"
        raise _BadArchive(f"{label} is {reason}{keep}.", reason, cut_short=True) from None
    except OSError as e:
        raise DeepPoseError(f"cannot read {path}: {e.strerror or e}") from None

    actual = sha256_of(path)
    official = _official_sha256(part)
    expected = pinned_sha256 or official
    pin = actual if part.count == 1 else f"{part.name}={actual}"
    accept = f"; if you trust this copy, accept it with --sha256 {pin}" \
        if source_is_user_file else ""

    expected_size = int(part.spec.get("size", 0) or 0)
    if pinned_sha256 is None and expected_size > 0 and size != expected_size:
        raise _BadArchive(
            f"{label} has the wrong size: expected {expected_size} bytes, got {size} "
            f"(sha256 {actual}){keep}{accept}",
            f"{size} bytes instead of {expected_size}", unusable=False,
            cut_short=size < expected_size,
        )
    if expected and actual != expected:
        which = "--sha256" if pinned_sha256 else f"the official checksum of {part.title}"
        raise _BadArchive(
            f"{label} does not match {which}: expected sha256 {expected}, got {actual}"
            f"{keep}{accept if not pinned_sha256 else ''}",
            "wrong sha256", unusable=False,
        )
    return _CheckedArchive(sha256=actual, size=size, checksum_known=bool(expected))


def _official_sha256(part: _Part) -> str:
    value = str(part.spec.get("sha256", "") or "").strip().lower()
    if value and not _SHA256_RE.match(value):
        raise DeepPoseError(f"{part.where}: the sha256 of archive {part.name!r} must be 64 "
                            "hexadecimal digits")
    return value


def _extraction_limit(part: _Part, override: int | None) -> int:
    """The most bytes the archive may unpack to: argument, environment, manifest, default."""
    if override is not None:
        if int(override) <= 0:
            raise DeepPoseError(f"the extraction limit must be positive, got {override}")
        return int(override)
    env = os.environ.get(MAX_EXTRACT_ENV, "").strip()
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = 0.0
        if not (gib > 0 and math.isfinite(gib)):
            raise DeepPoseError(f"${MAX_EXTRACT_ENV} must be a positive number of GiB, "
                                f"got {env!r}")
        return int(gib * (1 << 30))
    value = part.spec.get("max_extracted_bytes", 0) or 0
    if value:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DeepPoseError(f"{part.where}: max_extracted_bytes of archive {part.name!r} "
                                f"must be a positive number of bytes")
        return value
    return DEFAULT_MAX_EXTRACTED_BYTES


def _human_bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------
# Download


def _check_url(url: str) -> None:
    """Refuse a URL that cannot be fetched, saying why (rather than "connection refused")."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port outside 0-65535
    except ValueError as e:
        raise DeepPoseError(f"invalid URL {url}: {_one_line(e)}") from None
    if parts.scheme.lower() not in ("http", "https", "ftp", "file") or not (
            parts.netloc or parts.scheme.lower() == "file"):
        raise DeepPoseError(f"invalid URL {url}: expected http://HOST/PATH (or https, ftp)")


def _stall_seconds() -> float:
    """The stall window: ``$DEEPPOSE_FETCH_STALL_SECONDS``, else :data:`STALL_SECONDS`."""
    text = os.environ.get(STALL_ENV, "").strip()
    if not text:
        return STALL_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise DeepPoseError(f"${STALL_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _download_cap(part: _Part, pinned_sha256: str | None, limit: int) -> tuple[int, str]:
    """The most bytes a download may take, and what that bound is: the manifest's size of
    the archive, else what an archive that unpacks to at most ``limit`` can hold."""
    expected = int(part.spec.get("size", 0) or 0)
    if expected > 0 and pinned_sha256 is None:
        return expected, f"the {expected} bytes the manifest gives for this archive"
    cap = limit + limit // 100 + (1 << 20)
    return cap, (f"{_human_bytes(cap)}, more than an archive that unpacks to at most "
                 f"{_human_bytes(limit)} can hold")


class _DownloadFailed(Exception):
    """One mirror failed; the message is a short reason for the combined error."""


class _Stalled(_DownloadFailed):
    """No progress within the stall window: worth another try, resuming."""


class _Oversized(_DownloadFailed):
    """The server sent more than the archive can be: its bytes are not the archive."""


class _ProgressWatch:
    """Counts the bytes of a download and raises :class:`_Stalled` when a window of
    ``seconds`` passes with fewer than :data:`STALL_MIN_BYTES` received."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.window_start = time.monotonic()
        self.count = 0

    def received(self, count: int) -> None:
        self.count += count
        now = time.monotonic()
        if now - self.window_start >= self.seconds:
            if self.count < STALL_MIN_BYTES:
                raise _Stalled(f"stalled: {self.count} bytes in {now - self.window_start:.0f} s, "
                               f"less than {STALL_MIN_BYTES // 1024} KiB")
            self.window_start, self.count = now, 0


@dataclass
class _Downloaded:
    """How a download ended: whether it continued earlier bytes and whether its length was known."""

    resumed: bool
    length_known: bool


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else f"{text}."


def _state_path(partial_path: Path) -> Path:
    """Beside ``<file>.partial``: the URL and validators that a resume must match."""
    return partial_path.with_name(partial_path.name + ".json")


def _read_state(partial_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_state_path(partial_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(partial_path: Path, url: str, headers: Any, length: int | None) -> None:
    state = {
        "url": url,
        "etag": headers.get("ETag") if headers is not None else None,
        "last_modified": headers.get("Last-Modified") if headers is not None else None,
        "length": length,
    }
    try:
        _state_path(partial_path).write_text(json.dumps(state, indent=2) + "\n",
                                             encoding="utf-8")
    except OSError as e:
        raise DeepPoseError(f"cannot write {_state_path(partial_path)}: "
                            f"{e.strerror or e}") from None


def _discard_partial(partial_path: Path) -> None:
    partial_path.unlink(missing_ok=True)
    _state_path(partial_path).unlink(missing_ok=True)


def _if_range(state: dict[str, Any] | None) -> str | None:
    """The If-Range value for a resume: a strong ETag, else Last-Modified (weak ETags may not)."""
    if not state:
        return None
    etag = state.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = state.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


def _download_and_unpack(part: _Part, urls: list[str], partial_path: Path, final_path: Path,
                         staged: Path, pinned_sha256: str | None, *, local: dict[str, Path],
                         limit: int, progress: bool) -> tuple[str, _CheckedArchive, int]:
    """Download from the first mirror whose file verifies and unpacks into ``staged``; return
    its URL, the checks and the file count.

    The ``.partial`` file takes its final name only after extraction succeeded. A mirror whose
    complete file is unusable is dropped (its bytes discarded) and the next one tried; a file of
    unknown length that looks cut short is kept for a resume.
    """
    failures: list[str] = []
    cap = _download_cap(part, pinned_sha256, limit)
    for candidate in urls:
        for attempt in range(2):  # a second attempt only after discarding spliced bytes
            try:
                got = _download_retrying_stalls(candidate, partial_path, progress, cap)
            except _DownloadFailed as e:
                failures.append(f"{candidate} ({_one_line(e)})")
                break
            try:
                checked = _check_archive(part, partial_path, pinned_sha256,
                                         source_is_user_file=False)
                files = _unpack(part, partial_path, staged, limit)
            except _BadArchive as e:
                if not got.length_known and e.cut_short:
                    size = partial_path.stat().st_size if partial_path.exists() else 0
                    raise DeepPoseError(
                        f"the download of {final_path.name} from {candidate} stopped after "
                        f"{size} bytes without the server saying how long the file is, and "
                        f"those bytes are not a complete archive; run the same command again "
                        f"to resume it, or delete {partial_path} to start over"
                    ) from None
                if not e.unusable:
                    raise
                _discard_partial(partial_path)
                if got.resumed and attempt == 0:
                    continue  # the earlier bytes were not this file's: once more from zero
                failures.append(f"{candidate} (served {e.reason})")
                break
            try:
                os.replace(partial_path, final_path)
            except OSError as e:
                raise DeepPoseError(f"cannot rename {partial_path} to {final_path}: "
                                    f"{e.strerror or e}") from None
            _state_path(partial_path).unlink(missing_ok=True)
            return candidate, checked, files
    raise _all_mirrors_failed(part, final_path, failures, partial_path, local)


def _download_retrying_stalls(url: str, partial_path: Path, progress: bool,
                              cap: tuple[int, str]) -> _Downloaded:
    """:func:`_download`, tried again (resuming) when it stalls, :data:`STALL_TRIES` times."""
    for attempt in range(1, STALL_TRIES + 1):
        try:
            return _download(url, partial_path, progress=progress, cap=cap)
        except _Stalled as e:
            if attempt == STALL_TRIES:
                raise _Stalled(f"{_one_line(e)}; {STALL_TRIES} tries") from None
    raise AssertionError("unreachable")


def _all_mirrors_failed(part: _Part, final_path: Path, failures: list[str],
                        partial_path: Path, local: dict[str, Path]) -> DeepPoseError:
    """Every mirror failed: say where a copy can be had and how to hand it over, naming every
    archive the command then needs (those not given with --archive nor already downloaded)."""
    manifest = part.manifest
    tried = "; ".join(failures)
    homepage = manifest.homepage
    where = f"get it from {homepage}" if homepage else "get a copy elsewhere"
    resume = ""
    if partial_path.exists() and partial_path.stat().st_size > 0:
        resume = (f" The {partial_path.stat().st_size} bytes already in {partial_path} "
                  f"are resumed next time.")
    options = []
    for other in dataset_parts(manifest):
        if other.name in local:
            options.append(f"--archive {local[other.name]}")
        elif other.name == part.name or not (final_path.parent / other.filename()).is_file():
            options.append(f"--archive PATH/TO/{other.filename()}")
    return DeepPoseError(
        f"could not download {final_path.name} from {tried}. If no mirror works (or this "
        f"machine is offline), {where} and run: deeppose fetch {manifest.name} "
        f"{' '.join(options)}{resume}"
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


def _open(url: str, start: int, if_range: str | None = None):
    """The server's response (status and headers read), within the stall window: urlopen
    runs in a thread, since headers trickling in byte by byte never time out a read."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
        if if_range:
            headers["If-Range"] = if_range
    request = urllib.request.Request(url, headers=headers)
    window = _stall_seconds()
    outcome: dict[str, Any] = {}
    abandoned = threading.Event()

    def connect() -> None:
        try:
            response = urllib.request.urlopen(request, timeout=min(SOCKET_TIMEOUT_S, window))
        except BaseException as e:  # handed to the caller
            outcome["error"] = e
            return
        outcome["response"] = response
        if abandoned.is_set():
            response.close()

    thread = threading.Thread(target=connect, name="deeppose-fetch-connect", daemon=True)
    thread.start()
    thread.join(window)
    if thread.is_alive():
        abandoned.set()
        raise _Stalled(f"stalled: no response within {window:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def _range_total(content_range: str | None) -> int | None:
    """The total size from ``Content-Range: bytes a-b/TOTAL`` or ``bytes */TOTAL``."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _download(url: str, partial_path: Path, *, progress: bool,
              cap: tuple[int, str] | None = None) -> _Downloaded:
    """Fetch ``url`` into ``partial_path``, resuming what it holds when that is safe.

    Bytes left by another URL are never continued. A resume sends If-Range with the first
    response's ETag or Last-Modified, so a server whose file changed answers with the whole new
    file (200) instead of the tail of it.
    """
    for _attempt in range(2):  # a second attempt only after discarding an unusable partial file
        start = partial_path.stat().st_size if partial_path.exists() else 0
        state = _read_state(partial_path) if start > 0 else None
        if start > 0 and state is not None and state.get("url") != url:
            _discard_partial(partial_path)  # another mirror's bytes
            start, state = 0, None
        if start == 0:
            _state_path(partial_path).unlink(missing_ok=True)
        validator = _if_range(state)
        try:
            response = _open(url, start, validator)
        except _DownloadFailed:
            raise
        except urllib.error.HTTPError as e:
            if e.code == 416 and start > 0:
                total = _range_total(e.headers.get("Content-Range") if e.headers else None)
                e.close()
                if total is None or total == start:
                    # The partial file already holds every byte (as far as the server says).
                    return _Downloaded(resumed=True, length_known=total is not None)
                _discard_partial(partial_path)  # longer than the remote file: not the same file
                continue
            raise _DownloadFailed(_network_reason(e)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if _timed_out(e):
                raise _Stalled(f"stalled: {_network_reason(e)}") from None
            raise _DownloadFailed(_network_reason(e)) from None

        with response:
            status = getattr(response, "status", 200)
            content_range = response.headers.get("Content-Range")
            length_header = response.headers.get("Content-Length")
            remaining = int(length_header) if length_header and length_header.isdigit() else None
            if status == 206:
                if _range_start(content_range) != start:
                    # The server answered some other range: start over.
                    _discard_partial(partial_path)
                    continue
                total = _range_total(content_range)
                if total is None and remaining is not None:
                    total = start + remaining
                known = state.get("length") if state else None
                if validator is None and known and total is not None and total != known:
                    # No validator to guard the resume, and the size changed: a new file.
                    _discard_partial(partial_path)
                    continue
                offset = start
            else:
                offset = 0  # the server ignored Range (or If-Range failed) and sent the whole file
                total = remaining
            head = b""
            if offset == 0:
                head = _read_head(response)
                problem = _signature_problem(head, response.headers.get("Content-Type", ""),
                                             archive_kind(partial_path.name))
                if problem is not None:
                    if start == 0:
                        _discard_partial(partial_path)
                    raise _DownloadFailed(
                        "the server returned a web page, not the archive"
                        if "web page" in problem else f"the server returned {problem}")
                _write_state(partial_path, url, response.headers, total)
            try:
                _copy_response(response, partial_path, offset, total, progress=progress,
                               head=head, cap=cap)
            except _Oversized:
                _discard_partial(partial_path)  # whatever it is, it is not the archive
                raise
        return _Downloaded(resumed=offset > 0, length_known=total is not None)
    raise _DownloadFailed("the server's answers to a resumed download were inconsistent")


def _timed_out(error: BaseException) -> bool:
    reason = getattr(error, "reason", None)
    return isinstance(error, (socket.timeout, TimeoutError)) or \
        isinstance(reason, (socket.timeout, TimeoutError))


def _read_head(response) -> bytes:
    """The body's first bytes, enough to recognise a zip signature or a web page."""
    head = b""
    watch = _ProgressWatch(_stall_seconds())
    try:
        while len(head) < 512:
            chunk = response.read1(512 - len(head))
            if not chunk:
                break
            head += chunk
            if len(head) < 512:
                watch.received(len(chunk))
    except (http.client.HTTPException, OSError, ValueError) as e:
        if _timed_out(e):
            raise _Stalled(f"stalled: {_network_reason(e)} after {len(head)} bytes") from None
        raise _DownloadFailed(f"{_network_reason(e)} after {len(head)} bytes") from None
    return head


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
                   progress: bool, head: bytes = b"",
                   cap: tuple[int, str] | None = None) -> None:
    """Write ``head``, then the body, at ``offset`` of ``partial_path``; raise if it ends early,
    stalls (:class:`_Stalled`) or passes ``cap`` = (most bytes, what that bound is)."""
    written = offset
    mode = "r+b" if offset > 0 else "wb"
    most, bound = cap if cap is not None else (None, "")
    if most is not None and total is not None and total > most:
        raise _Oversized(f"the server announced {total} bytes, more than {bound}")
    watch = _ProgressWatch(_stall_seconds())
    with _progress_bar(progress) as bar:
        task = bar.add_task(partial_path.name.removesuffix(".partial"), total=total,
                            completed=offset)
        try:
            with open(partial_path, mode) as out:
                out.seek(offset)
                out.truncate()
                chunk = head
                while True:
                    if not chunk:
                        # read1: whatever arrived, so a trickle is seen between reads
                        chunk = response.read1(CHUNK_SIZE)
                        if not chunk:
                            break
                        watch.received(len(chunk))
                    if most is not None and written + len(chunk) > most:
                        raise _Oversized(f"the server sent more than {bound}")
                    try:
                        out.write(chunk)
                    except OSError as e:  # a full disk is not the server's failure
                        raise DeepPoseError(f"cannot write {partial_path}: "
                                            f"{os_error_reason(e)}") from None
                    written += len(chunk)
                    bar.update(task, completed=written)
                    chunk = b""
        except (http.client.HTTPException, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.filename == str(partial_path):
                raise DeepPoseError(f"cannot write {partial_path}: {e.strerror or e}") from None
            if _timed_out(e):
                raise _Stalled(f"stalled: {_network_reason(e)} after {written} bytes") from None
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
        raise _BadArchive(f"archive member {name!r} is a symbolic link; refusing to extract",
                          "a symbolic link member")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _BadArchive(f"archive member {name!r} is not a regular file; refusing to extract",
                          "a special-file member")
    if "\x00" in name:
        raise _BadArchive(f"archive member {name!r} has a NUL in its name; refusing to extract",
                          "a member name with a NUL")
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        raise _BadArchive(f"archive member {name!r} has an absolute path; refusing to extract",
                          "a member with an absolute path")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise _BadArchive(f"archive member {name!r} points outside the dataset directory; "
                          f"refusing to extract", "a member outside the dataset directory")
    if any(_DRIVE_RE.match(p) for p in parts):
        raise _BadArchive(f"archive member {name!r} has a drive letter; refusing to extract",
                          "a member with a drive letter")
    return parts


def _declared_size(members: list[tuple[zipfile.ZipInfo, list[str]]]) -> int:
    """What the archive's directory says its files unpack to."""
    return sum(info.file_size for info, _parts in members if not info.is_dir())


def _too_big(archive_path: Path, amount: str, limit: int) -> DeepPoseError:
    return DeepPoseError(
        f"archive {archive_path} {amount}, more than the limit of {_human_bytes(limit)}; "
        f"refusing to extract it (if the archive is trusted, allow more with "
        f"--max-extract-gib or ${MAX_EXTRACT_ENV})"
    )


def _check_expansion(archive_path: Path, declared: int,
                     members: list[tuple[str, int, int]]) -> None:
    """Refuse an archive, before anything is written, whose members ((name, size, stored
    size) each) or whole content (``declared`` bytes) expand more than
    :data:`MAX_EXPANSION_RATIO` to one, even within the size bound: dataset images barely
    compress, and what expands a thousandfold is a decompression bomb."""
    def refuse(what: str, size: int, stored: int) -> _BadArchive:
        return _BadArchive(
            f"archive {archive_path}: {what} expands {size / max(stored, 1):.0f}:1 "
            f"({_human_bytes(size)} from {_human_bytes(stored)}), more than the "
            f"{MAX_EXPANSION_RATIO}:1 any dataset file reaches (a decompression bomb?); "
            f"refusing to extract it",
            f"a member that expands more than {MAX_EXPANSION_RATIO}:1")

    for name, size, stored in members:
        if size > RATIO_FLOOR_BYTES and size > MAX_EXPANSION_RATIO * stored:
            raise refuse(f"member {name!r}", size, stored)
    archive_size = archive_path.stat().st_size
    if declared > RATIO_FLOOR_BYTES and declared > MAX_EXPANSION_RATIO * archive_size:
        raise refuse("its content", declared, archive_size)


def _strips_top_level(entries: list[tuple[list[str], bool]], annotations: str) -> bool:
    """Whether an archive's members ((path parts, is a directory) each) all sit in one
    top-level directory that is not the dataset itself: it is stripped on extraction, so
    ``lspet_dataset/joints.mat`` and ``joints.mat`` archives unpack alike."""
    if any("/".join(parts) == annotations for parts, _is_dir in entries):
        return False
    top_levels = {parts[0] for parts, _is_dir in entries if parts}
    return len(top_levels) == 1 and all(len(parts) > 1 or is_dir for parts, is_dir in entries)


def _extract_zip(archive_path: Path, target: Path, annotations: str,
                 limit: int = DEFAULT_MAX_EXTRACTED_BYTES) -> int:
    """Unpack ``archive_path`` into the empty directory ``target``; return the file count.

    Every member is checked before anything is written, and each destination is checked
    again against ``target`` after resolving, so a hostile archive writes nothing at all.
    The sizes in the archive's directory must fit in ``limit``, and so must the bytes actually
    written, counted as they stream, since a directory can understate them.
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
                raise _BadArchive(f"archive {archive_path} is empty", "an empty archive")

            declared = _declared_size(members)
            if declared > limit:
                raise _too_big(archive_path, f"would unpack to {_human_bytes(declared)}", limit)
            _check_expansion(archive_path, declared,
                             [(i.filename, i.file_size, i.compress_size)
                              for i, _parts in members if not i.is_dir()])

            strip = _strips_top_level([(parts, info.is_dir()) for info, parts in members],
                                      annotations)

            target_resolved = target.resolve()
            count = 0
            total = 0
            for info, parts in members:
                relative = parts[1:] if strip else parts
                if not relative:
                    continue
                destination = target.joinpath(*relative)
                if not destination.resolve().is_relative_to(target_resolved):
                    raise _BadArchive(f"archive member {info.filename!r} points outside the "
                                      f"dataset directory; refusing to extract",
                                      "a member outside the dataset directory")
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as source, open(destination, "xb") as out:
                    while chunk := source.read(CHUNK_SIZE):
                        written += len(chunk)
                        total += len(chunk)
                        if total > limit:
                            raise _too_big(archive_path, "unpacks to more than its directory "
                                           "declares", limit)
                        if written > info.file_size:
                            raise _BadArchive(
                                f"archive member {info.filename!r} holds more than the "
                                f"{info.file_size} bytes its header declares; refusing to "
                                f"extract", "a member larger than declared")
                        out.write(chunk)
                count += 1
    except zipfile.BadZipFile as e:
        reason = f"not a valid zip archive ({_one_line(e)})"
        raise _BadArchive(f"{archive_path} is {reason}", reason) from None
    except (zlib.error, EOFError) as e:
        reason = f"corrupt ({_one_line(e)})"
        raise _BadArchive(f"{archive_path} is {reason}", reason) from None
    except NotImplementedError as e:
        reason = f"an unsupported compression ({_one_line(e)})"
        raise _BadArchive(f"{archive_path} uses {reason}", reason) from None
    except RuntimeError as e:  # encrypted members
        raise _BadArchive(f"cannot extract {archive_path}: {_one_line(e)}",
                          "encrypted members") from None
    except FileExistsError as e:
        raise _BadArchive(f"archive {archive_path} holds {e.filename} twice",
                          "a member stored twice") from None
    except OSError as e:
        raise DeepPoseError(f"cannot extract {archive_path}: {e.strerror or e}") from None

    return count


def _extract_tar(archive_path: Path, target: Path, annotations: str,
                 limit: int = DEFAULT_MAX_EXTRACTED_BYTES) -> int:
    """Unpack a tar archive into the empty directory ``target``; return the file count.

    Only regular files and directories are taken, through ``tarfile``'s ``data`` filter
    (no links, devices, absolute paths or ``..``); their sizes (which a tar states exactly,
    its data being stored at that length) must fit in ``limit`` before anything is written.
    A single top-level directory is stripped, as for zip archives.
    """
    if not hasattr(tarfile, "data_filter"):
        raise DeepPoseError("tar archives need Python 3.11.4 or later (tarfile's data filter)")
    try:
        with tarfile.open(archive_path) as tf:
            members = [m for m in tf.getmembers()
                       if (m.isfile() or m.isdir()) and m.name.strip("/")
                       and m.name.split("/")[0] != "__MACOSX"]
            if not any(m.isfile() for m in members):
                raise _BadArchive(f"archive {archive_path} is empty", "an empty archive")
            declared = sum(m.size for m in members if m.isfile())
            if declared > limit:
                raise _too_big(archive_path, f"would unpack to {_human_bytes(declared)}", limit)
            _check_expansion(archive_path, declared, [])
            named = [(m, [p for p in m.name.split("/") if p not in ("", ".")]) for m in members]
            strip = _strips_top_level([(parts, m.isdir()) for m, parts in named], annotations)
            count = 0
            for member, parts in named:
                relative = parts[1:] if strip else parts
                if not relative:
                    continue
                try:
                    tf.extract(member.replace(name="/".join(relative), deep=False), target,
                               filter="data")
                except tarfile.FilterError as e:
                    raise _BadArchive(f"archive member {member.name!r} is refused: "
                                      f"{_one_line(e)}", "a member outside the dataset "
                                      "directory") from None
                count += member.isfile()
    except (tarfile.TarError, zlib.error, EOFError) as e:
        reason = f"not a valid tar archive ({_one_line(e)})"
        raise _BadArchive(f"{archive_path} is {reason}", reason) from None
    return count


def _unpack(part: _Part, archive_path: Path, staged: Path, limit: int) -> int:
    """Extract a verified archive into ``staged`` (in its ``into`` subdirectory); return the
    file count.

    It is extracted into a directory of its own first, so a failure leaves ``staged`` as it
    was, and its entries are then moved in; two archives may not hold the same file.
    """
    extract = _extract_tar if _file_kind(archive_path) == "tar" else _extract_zip
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=staged))
    try:
        files = extract(archive_path, scratch, part.contains, limit)
        if part.contains and not (scratch / part.contains).is_file():
            raise _BadArchive(f"archive {archive_path} has no {part.contains}; is it the "
                              f"right file?", f"an archive without {part.contains}")
        target = staged.joinpath(*part.into)
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(scratch.iterdir()):
            _merge(entry, target / entry.name, part)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def _merge(source: Path, destination: Path, part: _Part) -> None:
    """Move ``source`` to ``destination``, merging directories that two archives share."""
    if source.is_dir() and destination.is_dir():
        for entry in sorted(source.iterdir()):
            _merge(entry, destination / entry.name, part)
        return
    if destination.exists():
        raise DeepPoseError(f"{part.manifest.name}'s {part.name} archive holds "
                            f"{destination.name}, which another of its archives holds too")
    os.replace(source, destination)


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

    with staged_dataset(dataset_dir) as staged:
        generate_dataset(staged, num_images=num_images, seed=seed, image_size=image_size)
        _write_marker(staged, dataset=manifest.name, source="generated", sha256=None, size=None,
                      generator=dict(manifest.generator))
    return FetchResult(
        dataset_dir=dataset_dir,
        status="generated",
        archive=None,
        sha256=None,
        size=None,
        message=f"Generated {num_images} {manifest.name} images (seed {seed}) into {dataset_dir}.",
    )
