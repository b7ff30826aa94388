"""Training on several processes, the framework-free part (docs/distributed.md).

A run started by a launcher (``torchrun`` for PyTorch, ``mpiexec`` for Chainer) has one
process per device. This module finds out from the launcher's environment which process
this is (:func:`discover`), refuses a framework started by the other framework's launcher,
and holds the rules every engine follows, so they are written once:

* ``--batch-size`` is the *global* batch: the run's plan, its sampler and its learning
  rates are those of a one-process run, and each process trains on its contiguous share
  (:func:`shard`) of every batch of the same ``RunSampler``;
* each process weighs its loss by its share of the batch's visible joints
  (:func:`loss_weight`), so the mean of the processes' gradients (what DDP and ChainerMN
  all-reduce) is the gradient of the one-process loss over the whole batch;
* in a run of several processes, dropout draws from a seed of (seed, iteration, rank)
  (:func:`step_seed`): a resumed run draws exactly what an uninterrupted one drew, with no
  per-process random state to save;
* process 0 alone writes the run directory (:attr:`World.is_writer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import DeepPoseError

DISTRIBUTED_EXTRA = "pip install -e '.[distributed]' (or pip install 'deeppose[distributed]')"

# The launcher each framework trains under when it runs on several processes.
LAUNCHERS = {"pytorch": "torchrun", "chainer": "mpiexec"}

# (rank, size, local rank) variables: MPICH/Hydra and Intel MPI (PMI), Open MPI, MVAPICH,
# Slurm's PMIx; the first pair found names the process.
MPI_VARIABLES = (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                 ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
                 ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"))


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str | None = None   # "torchrun", "mpiexec" or None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run directory (logs, checkpoints, the model)."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


SINGLE = World()


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DeepPoseError(f"the launcher set {name}={value!r}, which is not a whole "
                            "number") from None


def discover(environ: Mapping[str, str] | None = None) -> World:
    """The world the launcher started this process in, from its environment: torchrun's
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else an MPI launcher's variables, else one
    process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = World(_int(environ, "RANK"), _int(environ, "WORLD_SIZE"),
                      _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
                      "torchrun")
    else:
        world = SINGLE
        for rank, size, local in MPI_VARIABLES:
            if rank in environ and size in environ:
                world = World(_int(environ, rank), _int(environ, size),
                              _int(environ, local) if local in environ else 0, "mpiexec")
                break
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise DeepPoseError(f"the launcher says this is rank {world.rank} of {world.size}")
    return world


def check_launcher(world: World, framework: str) -> None:
    """Refuse a framework started on several processes by the other framework's launcher,
    before any file is touched."""
    if not world.distributed:
        return
    wanted = LAUNCHERS[framework]
    if world.launcher != wanted:
        other = next(name for name, launcher in LAUNCHERS.items() if launcher == world.launcher)
        raise DeepPoseError(f"--framework {framework} trains on several processes under "
                            f"{wanted}, but this process was started by {world.launcher} "
                            f"({world.size} processes): start it with {wanted} or use "
                            f"--framework {other}")


def check_plan(world: World, batch_size: int, num_samples: int, iterations_per_epoch: int
               ) -> None:
    """Every process must get at least one image of every batch (the last batch of an
    epoch may be smaller than ``batch_size``)."""
    if not world.distributed:
        return
    last = num_samples - (iterations_per_epoch - 1) * batch_size
    smallest = min(batch_size, last)
    if smallest < world.size:
        raise DeepPoseError(f"--batch-size {batch_size} is the batch of all {world.size} "
                            f"processes together, and a batch of {smallest} image(s) (the last "
                            f"of each epoch on {num_samples} images) cannot give each one at "
                            "least one: use a larger --batch-size or fewer processes")


def process_device(world: World, device: str) -> str:
    """The device this process trains on: ``--device cuda`` is the device of its local rank
    when several processes run (an explicit ``cuda:N`` is refused there); else ``device``."""
    if not world.distributed or device == "cpu":
        return device
    if device != "cuda":
        raise DeepPoseError(f"--device {device} with {world.size} processes: each process "
                            "uses the CUDA device of its local rank, so pass --device cuda")
    return f"cuda:{world.local_rank}"


def shard(keys: Sequence[Any], rank: int, size: int) -> list[Any]:
    """Process ``rank``'s contiguous share of one global batch (sizes differ by at most 1)."""
    n = len(keys)
    return list(keys[rank * n // size:(rank + 1) * n // size])


def loss_weight(local_count: Any, total_count: Any, size: int) -> Any:
    """The factor on one process's loss, a mean over its ``local_count`` visible joints (of
    ``total_count`` in the whole batch), that makes the mean over ``size`` processes of
    the weighted gradients the gradient of the loss over the whole batch::

        size * max(local_count, 1) / max(total_count, 1)

    (the losses divide by ``max(count, 1)``). Plain arithmetic, so it works on numbers and
    on any framework's arrays."""
    return size * (local_count + (local_count < 0.5)) / (total_count + (total_count < 0.5))


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The random seed of one process's step in a run of several processes (dropout)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


# What a launcher sets in the processes it starts; a launcher started from inside such a
# process (the benchmark's scaling runs) must not inherit them.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", *(name for names in MPI_VARIABLES for name in names))


def find_mpiexec(python: str) -> str | None:
    """``mpiexec`` beside the interpreter ``python`` (the mpich wheel's), else on PATH."""
    import shutil
    from pathlib import Path

    beside = Path(python).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def launch_command(framework: str, processes: int, python: str) -> list[str]:
    """The command that starts ``python`` on ``processes`` processes under ``framework``'s
    launcher (the arguments for ``python`` follow it); a one-line DeepPoseError when that
    launcher cannot run here."""
    import importlib.util

    if framework == "pytorch":
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(processes)]
    if importlib.util.find_spec("mpi4py") is None:
        raise DeepPoseError(f"no mpi4py (ChainerMN needs it): {DISTRIBUTED_EXTRA}")
    mpiexec = find_mpiexec(python)
    if mpiexec is None:
        raise DeepPoseError(f"no mpiexec beside {python} or on PATH: {DISTRIBUTED_EXTRA}")
    return [mpiexec, "-n", str(processes), python]
