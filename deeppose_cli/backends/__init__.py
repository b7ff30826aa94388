"""The frameworks deeppose trains with, behind one interface, and a registry that imports
each only when it is first asked for.

A backend is a module providing what :class:`Backend` lists: it adds the model, loss,
optimizer loop and model files to the framework-free core, and nothing else. The registry
knows every backend's name and model suffix without importing it, so ``deeppose --help``,
the CLI's choices and the framework-free core never pull in torch or chainer. Adding a
framework is one module here plus one line in :data:`_MODULES`.
"""

from __future__ import annotations

import zipfile
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import DeepPoseError
from ..files import is_npz

if TYPE_CHECKING:  # numpy only for the annotations: the CLI reads FRAMEWORKS at start-up
    import numpy as np

# name -> (training/model module, benchmark harness module, model file suffix)
_MODULES: dict[str, tuple[str, str, str]] = {
    "chainer": ("chainer_backend", "chainer_bench", ".npz"),
    "pytorch": ("torch_backend", "torch_bench", ".pt"),
}
FRAMEWORKS: tuple[str, ...] = tuple(_MODULES)
MODEL_SUFFIX: dict[str, str] = {name: entry[2] for name, entry in _MODULES.items()}


class Backend(Protocol):
    """What a framework's backend module provides."""

    FRAMEWORK: str

    def devices(self) -> str:
        """The devices this framework can use here, for `deeppose info`."""

    def check_device(self, device: str) -> None:
        """Raise a one-line error when ``device`` cannot be used (before any file is touched)."""

    def train(self, config: Any, train_set: Any, val_set: Any, run: Any, *,
              torso_pair: tuple[int, int], resume: bool = False, show_progress: bool = True,
              init_params: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Train one stage into ``run`` and return its summary (iterations, final_loss,
        images_per_second, val)."""

    def load_regressor(self, model_path: Path, meta: dict,
                       device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
        """A function from a batch of network inputs to normalized joints."""

    def read_params(self, model_path: Path) -> dict[str, np.ndarray]:
        """A model file's parameters under the canonical names of ``weights.py``."""

    def write_model(self, params: dict[str, np.ndarray], meta: dict, path: Path) -> None:
        """Save canonical parameters as this framework's model file."""


def check_framework(name: str) -> str:
    if name not in _MODULES:
        raise DeepPoseError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {name!r}")
    return name


def get_backend(name: str) -> Backend:
    """The backend module of framework ``name`` (importing it imports the framework)."""
    return import_module(f"{__name__}.{_MODULES[check_framework(name)][0]}")


def get_harness(name: str) -> type:
    """The benchmark harness class of framework ``name``."""
    return import_module(f"{__name__}.{_MODULES[check_framework(name)][1]}").Harness


def framework_of_model_file(path: Path) -> str | None:
    """Which framework wrote a model file, told by content, not by suffix (None: neither).

    A Chainer ``.npz`` is a zip of ``.npy`` members; ``torch.save`` writes a zip whose
    records sit under ``<name>/data.pkl``, or (legacy) a bare pickle.
    """
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
