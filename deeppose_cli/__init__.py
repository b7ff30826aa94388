"""deeppose: cascaded DeepPose human pose regression under Chainer and PyTorch.

The package is layered (docs/design.md#layers): a framework-free ``core`` (geometry, images,
settings, metrics, the cascade), ``data`` (index files, the sample pipeline, fetch),
``engines`` (one small engine per framework behind a registry), ``training`` (the one
training loop, run directories), ``apps`` (evaluate, predict, benchmark, ...) and ``cli``.
Nothing imported here pulls in NumPy, torch, chainer or cv2.
"""

__version__ = "0.1.0"
