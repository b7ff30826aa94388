"""deeppose: cascaded DeepPose human pose regression under Chainer and PyTorch.

The package is layered (docs/design.md#layers): a framework-free ``core`` (geometry, images,
settings, metrics, the cascade), ``data`` (index files, the sample pipeline, fetch),
``engines`` (one small engine per framework behind a registry), ``training`` (the one
training loop, run directories), ``apps`` (evaluate, predict, benchmark, ...) and ``cli``.
Nothing imported here pulls in NumPy, torch, chainer or cv2.
"""

__version__ = "0.1.0"

# The Python API of `deeppose predict` (docs/predict.md#python-api), imported on first use
# so that `import deeppose_cli` stays light.
_API = {"PoseModel", "PoseResult", "Person", "predict"}


def __getattr__(name: str):
    if name in _API:
        from .apps import predict as _predict

        return getattr(_predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
