"""The pose losses both backends implement, by name (recipe key ``loss``).

* ``l2``: mean over visible joints of the squared 2-D error, DeepPose's loss;
* ``l1``: mean over visible joints of |dx| + |dy|. Its gradient does not grow with the error,
  so the few grossly wrong (or wrongly annotated: LSPET's labels come from crowd workers)
  joints of a batch do not dominate it, and uncertain joints are pulled to the median of
  their plausible positions rather than the mean, which keeps regression off the mean pose.
* ``laplace``: mean over visible joints of the negative log-likelihood of the true x and y
  under Laplace distributions centred on the prediction, whose scales the network predicts
  too (its ``uncertainty`` output layer): per coordinate ``|d| / b + log(2 b)``. This is L1
  with a learned weight ``1 / b`` for every joint of every image, so joints the network cannot
  place (hidden, blurred, mislabelled) weigh less and the ones it can place weigh more (the
  Laplace baseline of residual log-likelihood estimation, Li et al., ICCV 2021).
"""

from __future__ import annotations

import math

from .errors import DeepPoseError
from .settings import LOSSES as NORMS

EXPLICIT_NORMS = ("l2", "l1")  # the losses with a hand-written backward (--explicit-backward)
# The predicted log scale is clipped to this range before use, so a joint the network has
# learnt exactly on a training image cannot drive its weight 1 / b to infinity.
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 4.0
LOG_2 = math.log(2.0)


def check_norm(norm: str, explicit: bool = False) -> None:
    known = EXPLICIT_NORMS if explicit else NORMS
    if norm not in known:
        what = "loss with --explicit-backward" if explicit else "loss"
        raise DeepPoseError(f"{what} must be one of {', '.join(known)}, got {norm!r}")


def predicts_uncertainty(norm: str) -> bool:
    """Whether a network trained with this loss has the log-scale output layer."""
    return norm == "laplace"


def check_uncertainty_outputs(width: int, num_joints: int) -> None:
    if width != 4 * num_joints:
        raise DeepPoseError(f"the laplace loss needs 4 * num_joints outputs (coordinates, then "
                            f"log scales), got {width} for {num_joints} joints")
