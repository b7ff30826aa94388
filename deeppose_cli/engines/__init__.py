"""The frameworks deeppose trains with, and a registry that imports each only when asked.

An engine module (``torch_engine``, ``chainer_engine``) provides what :class:`EngineModule`
lists: the :class:`~deeppose_cli.engines.base.Engine` class the one training loop drives,
and the framework's model files. The registry knows every engine's name, model suffix and
precisions without importing it, so ``deeppose --help``, the CLI's choices and the
framework-free core never pull in NumPy, torch or chainer. Adding a framework is one module
here plus one entry in :data:`ENGINES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import DeepPoseError
from ..core.exports import EXPORT_FORMATS


@dataclass(frozen=True)
class EngineInfo:
    """What the registry knows about a framework without importing it."""

    module: str                    # the engine module in this package
    reference: str                 # the benchmark's bare-framework reference module
    model_suffix: str              # model and checkpoint files
    precisions: tuple[str, ...]    # training-step arithmetic it supports


ENGINES: dict[str, EngineInfo] = {
    "chainer": EngineInfo("chainer_engine", "chainer_reference", ".npz", ("fp32", "fp16")),
    "pytorch": EngineInfo("torch_engine", "torch_reference", ".pt", ("fp32", "bf16", "fp16")),
}
FRAMEWORKS: tuple[str, ...] = tuple(ENGINES)
MODEL_SUFFIX: dict[str, str] = {name: info.model_suffix for name, info in ENGINES.items()}
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for info in ENGINES.values()
                                                  for p in info.precisions))


class EngineModule(Protocol):
    """What a framework's engine module provides."""

    FRAMEWORK: str
    Engine: type  # engines.base.Engine: built from (config, num_joints, init_params)

    def devices(self) -> str:
        """The devices this framework can use here, for `deeppose info`."""

    def check_device(self, device: str) -> None:
        """Raise a one-line error when ``device`` cannot be used (before any file is touched)."""

    def load_predictor(self, model_path: Path, meta: dict, device: str = "cpu") -> Any:
        """A :class:`~deeppose_cli.core.predictor.Predictor` from a model file."""

    def read_params(self, model_path: Path) -> dict[str, Any]:
        """A model file's parameters under the canonical names of ``core.weights``."""

    def write_model(self, params: dict[str, Any], meta: dict, path: Path,
                    dtype: Any = ...) -> None:
        """Save canonical parameters as this framework's model file."""


def check_framework(name: str) -> str:
    if name not in ENGINES:
        raise DeepPoseError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {name!r}")
    return name


def check_precision(framework: str, precision: str) -> str:
    """A precision ``framework`` supports, or a one-line error saying which it does."""
    supported = ENGINES[check_framework(framework)].precisions
    if precision not in supported:
        raise DeepPoseError(f"{framework} has no {precision} arithmetic: use --precision "
                            f"{' or '.join(supported)} with --framework {framework}")
    return precision


def get_engine(name: str) -> EngineModule:
    """The engine module of framework ``name`` (importing it imports the framework)."""
    return import_module(f"{__name__}.{ENGINES[check_framework(name)].module}")


def get_reference(name: str) -> Any:
    """The benchmark's bare-framework reference module of framework ``name``."""
    return import_module(f"{__name__}.{ENGINES[check_framework(name)].reference}")


@dataclass(frozen=True)
class ExportRuntimeInfo:
    """What the registry knows about an export format without importing its module."""

    module: str                  # the module that writes and runs its graphs
    run_needs: tuple[str, ...]   # optional packages (the ``export`` extra) running needs
    write_needs: tuple[str, ...]  # ... and writing


EXPORT_RUNTIMES: dict[str, ExportRuntimeInfo] = {
    # writing: torch's ONNX exporter (onnxscript) and the checker (onnx); every written
    # graph is run once by onnxruntime before the export is published
    "onnx": ExportRuntimeInfo("onnx_runtime", ("onnxruntime",),
                              ("onnx", "onnxscript", "onnxruntime")),
    "torchscript": ExportRuntimeInfo("torchscript", (), ()),
}
assert tuple(EXPORT_RUNTIMES) == EXPORT_FORMATS
EXPORT_EXTRA = "pip install -e '.[export]' (or pip install 'deeppose[export]')"


class ExportRuntime(Protocol):
    """What an export format's module provides."""

    FORMAT: str

    def write_stage(self, graph: Any, example: Any, path: Path, opset: int | None) -> None:
        """Write a stage graph (``engines.export_graph``) to ``path``, batch dynamic."""

    def load_predictor(self, path: Path, stage: Any, num_joints: int, device: str = "cpu") -> Any:
        """A :class:`~deeppose_cli.core.predictor.Predictor` of an exported stage file."""


def check_export_format(name: str) -> str:
    if name not in EXPORT_RUNTIMES:
        raise DeepPoseError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, "
                            f"got {name!r}")
    return name


def get_export_runtime(name: str, writing: bool = False) -> ExportRuntime:
    """The module that runs (and with ``writing``, writes) format ``name``'s graphs; a
    one-line error naming the extra to install when an optional package is missing."""
    info = EXPORT_RUNTIMES[check_export_format(name)]
    for package in info.write_needs if writing else info.run_needs:
        try:
            import_module(package)
        except ImportError:
            raise DeepPoseError(f"{'exporting to' if writing else 'running'} {name} needs the "
                                f"package {package}, which is not installed: install the "
                                f"export extra with {EXPORT_EXTRA}") from None
    return import_module(f"{__name__}.{info.module}")


def framework_of_model_file(path: Path) -> str | None:
    """Which framework wrote a model file, told by content, not by suffix (None: neither).

    A Chainer ``.npz`` is a zip of ``.npy`` members; ``torch.save`` writes a zip whose
    records sit under ``<name>/data.pkl``, or (legacy) a bare pickle.
    """
    import zipfile

    from ..core.files import is_npz  # hashlib, tempfile: not at `--help` time

    path = Path(path)
    if is_npz(path):
        return "chainer"
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return "pytorch" if any(n == "data.pkl" or n.endswith("/data.pkl")
                                    for n in names) else None
        with open(path, "rb") as f:
            return "pytorch" if f.read(1) == b"\x80" else None  # pickle protocol 2+
    except (zipfile.BadZipFile, OSError):
        return None
