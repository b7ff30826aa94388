"""One run directory as training writes it: its files, how a retrain replaces it only on
success, and the lock that keeps one process per ``--out``. ``runs.py`` finds finished
runs and loads them as cascades."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..engines import FRAMEWORKS, MODEL_SUFFIX
from ..core.errors import DeepPoseError
from ..core.files import (atomic_write, atomic_write_text, os_error_reason, printable,
                          write_json)
from ..core.weights import ARCHITECTURES


def run_meta_problem(meta: Any) -> str | None:
    """What makes a parsed run.json unusable (None when the keys every reader needs are
    there), so a damaged or foreign file gets one clear line rather than a KeyError later."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, found {type(meta).__name__}"
    if meta.get("framework") not in FRAMEWORKS:
        return f"framework must be one of {', '.join(FRAMEWORKS)}, found {meta.get('framework')!r}"
    stage = meta.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 1:
        return f"stage must be a positive integer, found {stage!r}"
    if not isinstance(meta.get("model_file"), str) or "/" in meta["model_file"] \
            or "\\" in meta["model_file"] or meta["model_file"] in ("", ".", ".."):
        return f"model_file must be a file name, found {meta.get('model_file')!r}"
    if meta.get("architecture", "alexnet") not in ARCHITECTURES:
        return (f"architecture must be one of {', '.join(ARCHITECTURES)}, found "
                f"{meta['architecture']!r}")
    for key in ("num_joints", "input_size"):
        if key in meta and (not isinstance(meta[key], int) or meta[key] < 1):
            return f"{key} must be a positive integer, found {meta[key]!r}"
    chain = meta.get("chain", [])
    if not isinstance(chain, list) or not all(
            isinstance(e, dict) and isinstance(e.get("dir"), str) for e in chain):
        return "chain must be a list of {\"dir\": ...} entries"
    for number, entry in enumerate(chain, 1):
        problem = chain_dir_problem(entry["dir"])
        if problem:
            return f"chain entry {number} ({entry['dir']!r}) {problem}"
    return None


def chain_dir_problem(directory: str) -> str | None:
    """Why a chain entry's ``dir`` may not be used, or None: it must name a directory inside
    the run (``chain/stage1``), never an absolute path or one that climbs out with ``..``,
    or reading the run would load, and converting it write, files anywhere."""
    if not directory or directory.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", directory):
        return "must be a path inside the run directory, not an absolute one"
    parts = re.split(r"[/\\]", directory)
    if ".." in parts:
        return "points outside the run directory"
    if "\x00" in directory or all(p in ("", ".") for p in parts):
        return "must name a directory inside the run directory"
    return None


class RunDirectory:
    """The files of one training run::

        recipe.json     resolved TrainConfig
        run.json        what inference needs: framework, stage, model file, joints, mean pose,
                        and for stage >= 2 sigma, displacement statistics and the earlier stages
        log.jsonl       one record per logged iteration / validation
        loss.png        loss curve
        checkpoint.*    latest checkpoint (model + optimizer + iteration), written atomically
        model.*         final model in the framework's native format (.pt / .npz)
    """

    def __init__(self, path: Path | str, framework: str | None = None):
        self.path = Path(path)
        self.framework = framework

    @property
    def suffix(self) -> str:
        return MODEL_SUFFIX[self.framework or self.meta()["framework"]]

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.json"

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / f"checkpoint{self.suffix}"

    @property
    def model_path(self) -> Path:
        return self.path / f"model{self.suffix}"

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            raise DeepPoseError(f"{self.path} is not a deeppose run directory (no run.json)")
        try:
            meta = json.loads(self.meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeepPoseError(f"{self.meta_path} is corrupt: {e}") from None
        problem = run_meta_problem(meta)
        if problem:
            raise DeepPoseError(f"{self.meta_path} is not a valid run description: {problem}")
        return meta

    def append_log(self, record: dict[str, Any]) -> None:
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise DeepPoseError(f"cannot write {self.log_path}: {os_error_reason(e)}") from None

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def truncate_log(self, iteration: int) -> None:
        """Drop log records after ``iteration`` (a resumed run redoes them)."""
        kept = [r for r in self.read_log() if r.get("iteration", 0) <= iteration]
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot_loss(self) -> Path | None:
        """``loss.png`` (see :func:`loss_figure`), or None before anything was logged."""
        records = self.read_log()
        if not any("loss" in r for r in records):
            return None
        import matplotlib.pyplot as plt

        fig = loss_figure(records, self._recipe().get("loss", ""), printable(self.path.name))
        target = self.path / "loss.png"
        atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        return target

    def _recipe(self) -> dict[str, Any]:
        try:
            recipe = json.loads(self.recipe_path.read_text())
        except (OSError, ValueError):
            return {}
        return recipe if isinstance(recipe, dict) else {}


LOSS_NAMES = {"l2": "squared error", "l1": "absolute error",
              "laplace": "Laplace negative log-likelihood"}


def loss_figure(records: list[dict[str, Any]], loss: str, title: str):
    """The training loss, named after the run's loss and on a log axis unless it can be
    negative (the laplace likelihood is), and beside it the validations: their masked squared
    error, and PDJ@0.2 or a refinement stage's error where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    fig, (ax, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(*zip(*train), label="train")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{loss} loss: {LOSS_NAMES[loss]}" if loss in LOSS_NAMES else "training loss")
    if min(v for _, v in train) > 0:
        ax.set_yscale("log")
    ax.set_title(f"{title}: training loss")
    for key, label in (("val_loss", "masked squared error (normalized)"),
                       ("val_pdj@0.2", "PDJ@0.2"), ("val_err", "error (torso diameters)")):
        points = [(r["iteration"], r[key]) for r in records if key in r]
        if points:
            ax_val.plot(*zip(*points), "o-", label=label)
    ax_val.set_xlabel("iteration")
    ax_val.set_title("validation")
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend()
    fig.tight_layout()
    return fig


def staging_path(out: Path) -> Path:
    """Where a run that replaces the run at ``out`` trains until it has succeeded (beside
    the directory ``out`` resolves to, so a symbolic link ``--out`` keeps pointing at it)."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".next")


def resume_directory(out: Path) -> Path:
    """The directory ``--resume --out OUT`` continues: an unfinished replacement of OUT
    (``OUT.next``) when there is one with a checkpoint, else OUT itself."""
    out = Path(out)
    staged = staging_path(out)
    if any((staged / f"checkpoint{suffix}").is_file() for suffix in MODEL_SUFFIX.values()):
        return staged
    return out


def is_run_directory(path: Path) -> bool:
    return any((path / name).is_file() for name in
               ("run.json", "recipe.json", *(f"checkpoint{s}" for s in MODEL_SUFFIX.values())))


def _flock(fd: int, operation: int) -> bool:
    """``flock``, or False where the file system does not support it on a directory."""
    import fcntl

    try:
        fcntl.flock(fd, operation)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def publish_run(run: RunDirectory, out: Path) -> RunDirectory:
    """Put a finished run at ``out``: a run trained beside an earlier one (``OUT.next``)
    replaces it now, and only now.

    The swap holds the earlier directory's lock exclusively, so it waits for a reader that
    is loading that run (:class:`RunReadLock`), and a reader never sees half of each."""
    import fcntl

    given = Path(out)
    out = given.resolve()
    if run.path.resolve() == out:
        return run
    retired = out.with_name(f".{out.name}.replaced")
    if retired.exists():
        shutil.rmtree(retired)
    if out.exists():
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _flock(fd, fcntl.LOCK_EX)
            os.rename(out, retired)
            os.rename(run.path, out)
        finally:
            os.close(fd)  # drops the lock
    else:
        os.rename(run.path, out)
    shutil.rmtree(retired, ignore_errors=True)
    return RunDirectory(given, run.framework)


class RunReadLock:
    """A shared lock on a run directory while it is read, against :func:`publish_run`
    swapping a retrained run in halfway (it takes the same lock exclusively).

    ``identity`` is the (device, inode) of the directory that was locked: a reader that lets
    go while it computes and comes back to write (``evaluate``) compares it to learn whether
    the run it read is still the one at that path.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.identity: tuple[int, int] | None = None

    def __enter__(self) -> "RunReadLock":
        import fcntl

        for _attempt in range(100):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                return self  # nothing to lock: reading it says what is wrong
            except OSError as e:
                raise DeepPoseError(f"cannot open run directory {self.path}: "
                                    f"{os_error_reason(e)}") from None
            _flock(fd, fcntl.LOCK_SH)
            try:
                current = _identity(os.stat(self.path))
            except OSError:
                current = None
            if current == _identity(os.fstat(fd)):
                self.fd, self.identity = fd, current
                return self
            os.close(fd)  # swapped while we waited: lock the run now at that path
        raise DeepPoseError(f"{self.path} keeps being replaced; try again")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


class RunLock:
    """Exclusive use of one ``--out`` by one training process.

    An advisory ``flock`` on ``.OUT.lock`` beside the run directory (beside, so swapping the
    directory in :func:`publish_run` never moves it). The kernel drops the lock when its
    process ends however it ends, so there are no stale locks to clean up. The file names
    the holder, which the refusal of a second run quotes.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        # The directory a symbolic link --out leads to: two runs reaching one directory by
        # two names must meet at one lock.
        self.path = lock_path(self.out.resolve())
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise DeepPoseError(f"cannot write to {self.path.parent} (for the lock of "
                                f"{self.out}): {os_error_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise DeepPoseError(f"{self.out} is in use by another training run ({holder}); "
                                "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(["deeppose", *sys.argv[1:]])[:300]
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: "
                     f"{command}".encode("utf-8", "surrogateescape"))
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


