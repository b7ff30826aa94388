"""What `deeppose info` reports: dependency versions and usable devices per framework."""

from __future__ import annotations

import platform

from ..engines import FRAMEWORKS


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as e:  # an optional dependency may be absent or broken
        return f"not installed ({type(e).__name__})" if not isinstance(e, ImportError) else "not installed"
    return getattr(module, "__version__", "unknown")


def framework_devices(framework: str) -> str:
    """The devices ``framework``'s backend can use, or why it cannot be imported."""
    from ..engines import get_engine

    try:
        return get_engine(framework).devices()
    except ImportError:
        return "not installed"


def describe_environment() -> list[tuple[str, str]]:
    from .. import __version__
    from ..engines.chainer_compat import import_chainer

    try:
        chainer_version = import_chainer().__version__
    except ImportError:
        chainer_version = "not installed"
    import cv2

    return [
        ("deeppose", __version__),
        ("python", platform.python_version()),
        ("numpy", _version("numpy")),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("chainer", chainer_version),
        ("cupy", _version("cupy")),
        ("opencv", cv2.__version__),
        # the export extra (deeppose export --format onnx, running ONNX exports)
        ("onnx", _version("onnx")),
        ("onnxscript", _version("onnxscript")),
        ("onnxruntime", _version("onnxruntime")),
        *((f"{'torch' if name == 'pytorch' else name} devices", framework_devices(name))
          for name in FRAMEWORKS),
        ("onnxruntime providers", onnxruntime_providers()),
    ]


def onnxruntime_providers() -> str:
    """The execution providers onnxruntime offers here (CUDA needs onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return ", ".join(onnxruntime.get_available_providers())
