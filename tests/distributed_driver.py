"""One process of a distributed test run (tests/test_distributed.py starts it under torchrun
or mpiexec): trains a tiny stage 1 from a JSON description in argv[1], then saves the
weights this process ended with, so the test can compare the processes.

The description: ``framework``, ``index`` (an index directory), ``out``, ``dump`` (where
``rank<R>.npz`` goes), ``overrides`` (recipe values), ``resume``, and optionally ``die``:
``{"rank": R, "step": S}`` makes process R exit abruptly (code 3) at its S-th step of this
session, as a crashed process would (with ``"raise": true``, raise a DeepPoseError instead).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    spec = json.loads(sys.argv[1])
    import numpy as np

    from conftest import tiny_config
    from deeppose_cli.core.distributed import discover
    from deeppose_cli.core.errors import DeepPoseError
    from deeppose_cli.engines import get_engine
    from deeppose_cli.training.stages import train_stage

    framework = spec["framework"]
    engine_module = get_engine(framework)
    engine_class = engine_module.Engine
    world = discover()
    die = spec.get("die")
    steps = [0]
    real_step, real_close = engine_class.step, engine_class.close

    def step(self, batch):
        steps[0] += 1
        if die and world.rank == die["rank"] and steps[0] == die["step"]:
            if die.get("raise"):
                raise DeepPoseError("a simulated failure")
            sys.stderr.flush()
            os._exit(3)
        return real_step(self, batch)

    def close(self, failed=False):  # every process, after training: keep its weights
        params = {name.replace("/", "__"): value for name, value in
                  _params(framework, self.model).items()}
        Path(spec["dump"]).mkdir(parents=True, exist_ok=True)
        np.savez(Path(spec["dump"]) / f"rank{world.rank}.npz", **params)
        real_close(self, failed)

    engine_class.step, engine_class.close = step, close
    config = tiny_config(framework, Path(spec["index"]), Path(spec["out"]),
                         **spec.get("overrides", {}))
    train_stage(config, resume=spec.get("resume", False), show_progress=False)


def _params(framework: str, model):
    if framework == "pytorch":
        from deeppose_cli.engines.torch_model import to_numpy_params
    else:
        from deeppose_cli.engines.chainer_model import to_numpy_params
    return to_numpy_params(model)


if __name__ == "__main__":
    main()
