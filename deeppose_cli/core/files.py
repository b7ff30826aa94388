"""Writing files so that an interruption never leaves half of one, checksumming them, and
telling the model formats apart by content."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from .errors import DeepPoseError


def printable(text: str | os.PathLike) -> str:
    """``text`` (a path, or a message holding one) with the bytes of a file name that is not
    valid UTF-8 written as escapes (``bad\\xff.jpg``), for a plot title or a terminal that
    cannot take Python's surrogate escapes."""
    return os.fsencode(os.fspath(text)).decode("utf-8", "backslashreplace")


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary names carry their writer (a hash of the host name and the process id), so a
# later write can tell the leftovers of a killed process from a write still in progress.
_TEMP_MARK = re.compile(r"\.tmp-([0-9a-f]{8})-(\d+)-")
# A leftover from another host is only judged by its age.
FOREIGN_TEMP_AGE_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name``'s replacement, written by this process."""
    return f".{name}.tmp-{_host_tag()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """Whether ``path`` is a temporary file or directory whose writer is gone: a process of
    this host that no longer runs, or another host's, untouched for a day."""
    match = _TEMP_MARK.search(path.name)
    if not match:
        return False
    tag, pid = match.group(1), int(match.group(2))
    if tag == _host_tag():
        return pid != os.getpid() and not _process_alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_TEMP_AGE_S
    except OSError:
        return False


_swept: set[str] = set()


def remove_stale_temps(directory: Path) -> None:
    """Delete what killed writers left in ``directory`` (SIGKILL skips every clean-up).

    Once per directory and process: new leftovers only come from processes killed since,
    and a directory of many files is not listed again at every write. Best effort: a
    leftover that cannot be removed stays."""
    key = os.path.abspath(directory)
    if key in _swept:
        return
    _swept.add(key)
    try:
        candidates = [Path(entry.path) for entry in os.scandir(directory)
                      if entry.name.startswith(".") and _TEMP_MARK.search(entry.name)]
    except OSError:
        return
    for candidate in candidates:
        if is_stale_temp(candidate):
            _remove_tree(candidate)


class WriteError(DeepPoseError):
    """A file the file system refused to write; ``reason`` is why, without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = Path(path), reason


def os_error_reason(error: OSError) -> str:
    """An OSError in a few words ("No space left on device", "Read-only file system")."""
    return error.strerror or str(error) or type(error).__name__


def check_writable(directory: Path) -> None:
    """Fail now, in one line, if files cannot be created in ``directory`` (made if missing):
    before a long computation whose result would otherwise be lost at the end."""
    directory = Path(directory)
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise DeepPoseError(f"cannot write to {directory}: {ancestor} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("probe"), dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DeepPoseError(f"cannot write to {directory}: {os_error_reason(e)}") from None


def make_directory(directory: Path) -> None:
    """``mkdir -p`` with a one-line error (a file in the way, a read-only file system)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DeepPoseError(f"cannot create {directory}: a file of that name is in the way") \
            from None
    except OSError as e:
        raise DeepPoseError(f"cannot create {directory}: {os_error_reason(e)}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    An interrupted save leaves the previous file intact instead of half a file, and the
    temporary files of writers that were killed are removed first. The file gets the mode a
    plain ``open`` would give it (0666 less the umask): ``mkstemp`` creates 0600, which would
    hide runs and datasets from the rest of a group that shares them. A write the file system
    refuses (full, read-only) is a one-line :class:`DeepPoseError` naming ``path``.
    """
    path = Path(path)
    make_directory(path.parent)
    remove_stale_temps(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.stem), suffix=path.suffix,
                                   dir=path.parent)
    except OSError as e:
        raise WriteError(path, os_error_reason(e)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, os_error_reason(e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(beside: Path, purpose: str = "new") -> Path:
    """A fresh hidden directory beside ``beside`` (to build its replacement in and rename),
    with the mode ``mkdir`` would give it (``mkdtemp`` makes it 0700 whatever the umask); the
    leftovers of killed writers are removed first."""
    beside = Path(beside)
    name = f"{beside.name}.{purpose}"
    make_directory(beside.parent)
    remove_stale_temps(beside.parent)
    try:
        path = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=beside.parent))
        os.chmod(path, 0o777 & ~current_umask())
    except OSError as e:
        raise DeepPoseError(f"cannot create a directory beside {beside}: "
                            f"{os_error_reason(e)}") from None
    return path


def replace_directory(staged: Path, target: Path) -> None:
    """Move the complete directory ``staged`` to ``target``, replacing what is there only
    once the new one is in: readers see the old directory or the new one, never a mix.

    (Two renames: the old one moves to a hidden name, the new one takes its place; a
    concurrent replacement of the same target is retried rather than merged.)"""
    staged, target = Path(staged), Path(target)
    for _attempt in range(10):
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f"{temp_prefix(target.name + '.old')}{os.urandom(4).hex()}")
            try:
                os.rename(target, old)
            except FileNotFoundError:
                old = None  # another writer moved it first
        try:
            os.rename(staged, target)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (target.exists()):
                if old is not None:
                    _remove_tree(old)
                continue  # another writer put its copy in between: replace that one
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            _remove_tree(old)
        return
    raise OSError(errno.EBUSY, f"{target} keeps being replaced by another process")


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


class ErrorRecordingWriter:
    """A binary file wrapper that keeps the first ``OSError`` of its writes: a writer that
    wraps errors in its own (torch's "unexpected pos") loses the reason (a full disk), and
    this gives it back."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. NaN and infinity become ``null``: JSON has
    neither (Python would write ``NaN``/``Infinity``), and a file other tools cannot parse is
    worse than a missing value."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    atomic_write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_npz(path: Path) -> bool:
    """A NumPy ``.npz`` (what Chainer saves) is a zip of ``.npy`` members; a torch file is a
    zip too, but of pickles and raw storages."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)
