"""What `deeppose info` reports: dependency versions, and the devices each framework can use.

Versions come from the installed distributions' metadata, so `deeppose info` imports no
framework and answers at once; probing devices imports the frameworks (seconds) and is
done only when asked (``--devices``) and by the benchmark, which records it.
"""

from __future__ import annotations

import platform
from importlib import metadata

from ..engines import FRAMEWORKS

# distribution names of what the toolkit runs on (cupy: any of its CUDA builds)
DISTRIBUTIONS = ("numpy", "torch", "torchvision", "chainer", "opencv-python-headless",
                 "opencv-contrib-python-headless", "scipy",
                 # the export extra (deeppose export, running exported models)
                 "onnx", "onnxscript", "onnxruntime",
                 # the distributed extra (ChainerMN)
                 "mpi4py", "mpich")


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cupy_version() -> str | None:
    """CuPy's version, whichever CUDA build (``cupy-cuda13x``, ...) is installed."""
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda"):
            return f"{dist.version} ({name})"
    return None


def framework_devices(framework: str) -> str:
    """The devices ``framework``'s engine can use, or why it cannot be imported."""
    from ..engines import get_engine

    try:
        return get_engine(framework).devices()
    except ImportError as e:
        return f"not usable ({e})"


def describe_environment(devices: bool = True) -> list[tuple[str, str]]:
    """(component, version or devices) rows; ``devices`` probes each framework's devices."""
    from .. import __version__

    rows = [("deeppose", __version__), ("python", platform.python_version())]
    rows += [(name, version) for name in DISTRIBUTIONS
             if (version := installed_version(name)) is not None]
    rows.append(("cupy", cupy_version() or "not installed"))
    if devices:
        rows += [(f"{'torch' if name == 'pytorch' else name} devices", framework_devices(name))
                 for name in FRAMEWORKS]
        rows.append(("onnxruntime providers", onnxruntime_providers()))
    return rows


def onnxruntime_providers() -> str:
    """The execution providers onnxruntime offers here (CUDA needs onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return "not installed (pip install -e '.[export]')"
    return ", ".join(onnxruntime.get_available_providers())
