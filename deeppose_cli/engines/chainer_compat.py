"""The single entry point for importing Chainer.

Chainer 7.8.1 (the last release) predates NumPy 2: at import time it reads ``np.sctypes``
(``chainer/functions/array/as_strided.py``) and ``F.resize_images`` uses ``np.float``; both
were removed in NumPy 2.0. ``import_chainer`` puts these two aliases back before Chainer's
first import, and hides the two deprecation warnings its environment check raises on every
import (``pkg_resources`` and ``numpy.distutils``), which say nothing about the user's run.

That check (``chainer/_environment_check.py``) also does ``import numpy.distutils.system_info``
and, on macOS only, calls its ``get_info('blas_opt')`` to warn about Accelerate. NumPy has no
``numpy.distutils`` on Python >= 3.12, so ``import chainer`` fails there with
ModuleNotFoundError. Where the real module cannot be imported, a stand-in whose ``get_info``
finds no BLAS is registered instead (the check then passes, as on Linux).

Every module that needs Chainer calls ``chainer = import_chainer()`` (or imports this module
before ``import chainer``), so the shim is applied exactly once, in one place.
"""

from __future__ import annotations

import sys
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


def _provide_numpy_distutils() -> None:
    """Register a ``numpy.distutils.system_info`` stand-in where the real one is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated where it still exists
            import numpy.distutils.system_info  # noqa: F401
        return
    except ImportError:
        pass
    doc = "Stand-in for Chainer 7's environment check (deeppose_cli.backends.chainer_compat)."
    distutils = ModuleType("numpy.distutils", doc)
    system_info = ModuleType("numpy.distutils.system_info", doc)
    system_info.get_info = lambda name, notfound_action=0: {}  # numpy's "nothing found"
    distutils.system_info = system_info
    np.distutils = distutils
    sys.modules.update({distutils.__name__: distutils, system_info.__name__: system_info})


def _apply_shims() -> None:
    _restore_numpy_aliases()
    _provide_numpy_distutils()


def import_chainer() -> ModuleType:
    """Return the ``chainer`` module, importing it on NumPy 2 without errors or noise."""
    _apply_shims()
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
_apply_shims()
