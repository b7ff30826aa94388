"""Chainer imports where NumPy has no ``numpy.distutils`` (Python >= 3.12), on any Python."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockNumpyDistutils:  # what Python >= 3.12 sees: NumPy ships no numpy.distutils
        def find_spec(self, name, path=None, target=None):
            if name == "numpy.distutils" or name.startswith("numpy.distutils."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, BlockNumpyDistutils())

    import numpy as np
    from deeppose_cli.engines.chainer_compat import import_chainer

    chainer = import_chainer()
    import chainer.links as L

    link = L.Linear(3, 2)
    y = link(np.ones((4, 3), dtype=np.float32))
    assert y.shape == (4, 2), y.shape
    y.grad = np.ones_like(y.array)
    y.backward()
    assert link.W.grad.shape == (2, 3)
    print("ok", chainer.__version__)
    """
)


def test_import_chainer_without_numpy_distutils() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok 7."), proc.stdout
