"""The pose losses both backends implement, by name (recipe key ``loss``).

* ``l2``: mean over visible joints of the squared 2-D error, DeepPose's loss;
* ``l1``: mean over visible joints of |dx| + |dy|. Its gradient does not grow with the error,
  so the few grossly wrong (or wrongly annotated: LSPET's labels come from crowd workers)
  joints of a batch do not dominate it, and uncertain joints are pulled to the median of
  their plausible positions rather than the mean, which keeps regression off the mean pose.
"""

from __future__ import annotations

from .errors import DeepPoseError

NORMS = ("l2", "l1")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise DeepPoseError(f"loss must be one of {', '.join(NORMS)}, got {norm!r}")
