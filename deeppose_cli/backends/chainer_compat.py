"""The single entry point for importing Chainer.

Chainer 7.8.1 (the last release) predates NumPy 2: at import time it reads ``np.sctypes``
(``chainer/functions/array/as_strided.py``) and ``F.resize_images`` uses ``np.float``; both
were removed in NumPy 2.0. ``import_chainer`` puts these two aliases back before Chainer's
first import, and hides the two deprecation warnings its environment check raises on every
import (``pkg_resources`` and ``numpy.distutils``), which say nothing about the user's run.

Every module that needs Chainer calls ``chainer = import_chainer()`` (or imports this module
before ``import chainer``), so the shim is applied exactly once, in one place.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np


def _restore_numpy_aliases() -> None:
    """Re-add the NumPy 1.x names Chainer 7 reads; a no-op where NumPy still has them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy 1.2x warns on access to deprecated aliases
        if not hasattr(np, "sctypes"):
            np.sctypes = {
                "int": [np.int8, np.int16, np.int32, np.int64],
                "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
                "float": [np.float16, np.float32, np.float64, np.longdouble],
                "complex": [np.complex64, np.complex128, np.clongdouble],
                "others": [bool, object, bytes, str, np.void],
            }
        if not hasattr(np, "float"):
            np.float = float


def import_chainer() -> ModuleType:
    """Return the ``chainer`` module, importing it on NumPy 2 without errors or noise."""
    _restore_numpy_aliases()
    with warnings.catch_warnings():
        # Raised by chainer._environment_check on every import; neither is actionable.
        warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*numpy\.distutils", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Deprecated call to `pkg_resources", category=DeprecationWarning)
        import chainer
        import chainer.functions  # noqa: F401  (the modules that read np.sctypes)
        import chainer.links  # noqa: F401
    return chainer


# Importing this module is enough to make a following plain ``import chainer`` work.
_restore_numpy_aliases()
