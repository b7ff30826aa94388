"""What `deeppose info` reports: dependency versions and usable devices per framework."""

from __future__ import annotations

import platform


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as e:  # an optional dependency may be absent or broken
        return f"not installed ({type(e).__name__})" if not isinstance(e, ImportError) else "not installed"
    return getattr(module, "__version__", "unknown")


def torch_devices() -> str:
    try:
        import torch
    except ImportError:
        return "not installed"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
    return ", ".join(devices)


def chainer_devices() -> str:
    from .backends.chainer_compat import import_chainer

    try:
        chainer = import_chainer()
    except ImportError:
        return "not installed"
    devices = ["cpu (@numpy)"]
    cuda = chainer.backends.cuda
    if cuda.available:
        count = cuda.cupy.cuda.runtime.getDeviceCount()
        devices += [f"@cupy:{i}" for i in range(count)]
    return ", ".join(devices)


def describe_environment() -> list[tuple[str, str]]:
    from . import __version__
    from .backends.chainer_compat import import_chainer

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
        ("torch devices", torch_devices()),
        ("chainer devices", chainer_devices()),
    ]
