"""deeppose: cascaded DeepPose human pose regression under Chainer and PyTorch.

The package is split into a framework-free core (geometry, data pipeline, metrics, cascade
logic, dataset handling) and two thin backends (``deeppose_cli.backends.torch_backend`` and
``deeppose_cli.backends.chainer_backend``) that add only the model, loss, training loop and
save/load. Nothing imported here pulls in torch, chainer or cv2.
"""

__version__ = "0.1.0"
