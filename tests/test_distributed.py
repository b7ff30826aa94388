"""Training on several processes (docs/distributed.md): the framework-free rules (who is
which process, each process's share of a batch, the loss weights that make the averaged
gradient the one-process one), the refusals, and real 2-process runs under torchrun (gloo,
CPU) and mpiexec (ChainerMN, skipped without mpiexec and mpi4py): one writer, a complete
log, the same weights in every process, the one-process result, exact resume, resume on
another number of processes, and a process that dies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import subset_index, tiny_config
from deeppose_cli.core.distributed import (World, check_launcher, check_plan, discover,
                                           loss_weight, process_device, shard, step_seed)
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.data.pipeline import RunSampler
from deeppose_cli.engines import get_engine
from deeppose_cli.training.rundir import RunDirectory, staging_path
from deeppose_cli.training.stages import train_stage1

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "distributed_driver.py"
ROOT = TESTS.parent
# 20 training images in global batches of 6: 4 iterations per epoch, the last of 2 images
# (one per process), 3 epochs, a checkpoint every 3 iterations.
RUN = dict(input_size=67, width=0.0625, batch_size=6, epochs=3, checkpoint_every=3,
           lr_schedule="cosine", lr_warmup=2, optimizer="Adam", lr=1e-3)
LAUNCH_TIMEOUT = 300  # seconds: a hung run fails the test instead of hanging it


def mpiexec() -> str | None:
    """mpiexec beside this interpreter (the mpich wheel's) or on PATH, when mpi4py is there."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="needs mpiexec and mpi4py (the "
                               "distributed extra: pip install -e '.[distributed]')")


@pytest.fixture(scope="module")
def index(synthetic_dataset, tmp_path_factory):
    _, index_dir = synthetic_dataset
    return subset_index(index_dir, tmp_path_factory.mktemp("distributed"), 20, 6)


def launch(framework: str, args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``args`` (a script and its arguments, or ``-m deeppose_cli ...``) on ``processes``
    processes under the framework's launcher, one compute thread each."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE"):
        env.pop(name, None)
    if framework == "pytorch":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(processes)]
    else:
        command = [mpiexec(), "-n", str(processes), sys.executable]
    return subprocess.run(command + args, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT)


def driver(framework: str, index: Path, out: Path, dump: Path, processes: int = 2,
           **spec) -> subprocess.CompletedProcess:
    spec = {"framework": framework, "index": str(index), "out": str(out), "dump": str(dump),
            **spec}
    spec.setdefault("overrides", RUN)
    return launch(framework, [str(DRIVER), json.dumps(spec)], processes)


def rank_params(dump: Path, rank: int) -> dict[str, np.ndarray]:
    with np.load(dump / f"rank{rank}.npz") as npz:
        return {name.replace("__", "/"): npz[name] for name in npz.files}


def model_params(framework: str, run_dir: Path) -> dict[str, np.ndarray]:
    return get_engine(framework).read_params(RunDirectory(run_dir).model_path)


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a
                                                         if not np.array_equal(a[k], b[k])]


def assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def two_processes_train_what_one_does(framework: str, index: Path, tmp_path: Path) -> None:
    """Without dropout, a 2-process run (``tmp_path/two``) holds the same weights in both
    processes, process 0 wrote them, and a 1-process run of the same global batch
    (``tmp_path/one``) ends there up to the order of float sums."""
    plain = {**RUN, "dropout": 0.0}
    result = driver(framework, index, tmp_path / "two", tmp_path / "dump", overrides=plain)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [rank_params(tmp_path / "dump", r) for r in (0, 1)]
    assert_equal(ranks[0], ranks[1])
    assert_equal(model_params(framework, tmp_path / "two"), ranks[0])
    train_stage1(tiny_config(framework, index, tmp_path / "one", **plain), show_progress=False)
    assert_close(ranks[0], model_params(framework, tmp_path / "one"), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the rules


def test_discover_reads_each_launcher():
    assert discover({}) == World()
    assert discover({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == \
        World(1, 4, 1, "torchrun")
    assert discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}) == \
        World(1, 2, 1, "mpiexec")
    assert discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == \
        World(0, 2, 0, "mpiexec")
    with pytest.raises(DeepPoseError, match="rank 2 of 2"):
        discover({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DeepPoseError, match="not a whole number"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_a_framework_under_the_other_launcher_and_explicit_devices_are_refused():
    check_launcher(World(0, 2, 0, "torchrun"), "pytorch")
    check_launcher(World(0, 1, 0, "torchrun"), "chainer")  # one process: nothing to join
    with pytest.raises(DeepPoseError, match="chainer trains on several processes under "
                       "mpiexec, but this process was started by torchrun"):
        check_launcher(World(0, 2, 0, "torchrun"), "chainer")
    with pytest.raises(DeepPoseError, match="use --framework chainer"):
        check_launcher(World(1, 2, 0, "mpiexec"), "pytorch")
    assert process_device(World(1, 2, 1, "torchrun"), "cuda") == "cuda:1"
    assert process_device(World(1, 2, 1, "torchrun"), "cpu") == "cpu"
    assert process_device(World(), "cuda:3") == "cuda:3"
    with pytest.raises(DeepPoseError, match="pass --device cuda"):
        process_device(World(1, 2, 1, "torchrun"), "cuda:0")


@pytest.mark.parametrize("size", (2, 3, 5))
def test_the_shares_of_a_batch_are_the_batch(size):
    whole = RunSampler(23, 7, seed=3, iterations_per_epoch=4, total_iterations=10)
    parts = [RunSampler(23, 7, 3, 4, 10, rank=r, world_size=size) for r in range(size)]
    for iteration, batch in enumerate(whole, 1):
        shares = [p.batch(iteration) for p in parts]
        assert sum(shares, []) == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard(list(range(5)), 1, 2) == [2, 3, 4]


def test_the_weighted_losses_average_to_the_whole_batch_loss():
    """Each process's loss divides by its own visible joints; weighted, their mean (what the
    averaged gradients are the gradient of) is the loss over the whole batch."""
    rng = np.random.default_rng(0)
    for size in (2, 3):
        for _ in range(20):
            errors = rng.random(12)
            visible = rng.random(12) < 0.5
            visible[: rng.integers(0, 4)] = False  # a process may have no visible joint
            whole = (errors * visible).sum() / max(visible.sum(), 1)
            parts = [shard(list(range(12)), r, size) for r in range(size)]
            counts = [visible[p].sum() for p in parts]
            losses = [(errors[p] * visible[p]).sum() / max(visible[p].sum(), 1) for p in parts]
            total = sum(counts)
            mean = np.mean([loss_weight(c, total, size) * x for c, x in zip(counts, losses)])
            assert mean == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_the_plan_gives_every_process_an_image_of_every_batch():
    check_plan(World(0, 2), batch_size=6, num_samples=20, iterations_per_epoch=4)  # last: 2
    with pytest.raises(DeepPoseError, match="a batch of 1 image"):
        check_plan(World(0, 2), batch_size=6, num_samples=19, iterations_per_epoch=4)
    with pytest.raises(DeepPoseError, match="--batch-size 2 is the batch of all 3"):
        check_plan(World(0, 3), batch_size=2, num_samples=20, iterations_per_epoch=10)
    check_plan(World(), batch_size=6, num_samples=19, iterations_per_epoch=4)
    assert step_seed(0, 1, 0) != step_seed(0, 1, 1) != step_seed(0, 2, 1)


def test_the_cli_refuses_chainer_under_torchrun_in_one_line(index, tmp_path, monkeypatch):
    from deeppose_cli.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train-stage", "1", "--framework", "chainer", "--dataset", "synthetic",
        "--train", str(index / "train.jsonl"), "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: rank 0 of 2: --framework chainer trains on several processes under mpiexec, "
        "but this process was started by torchrun (2 processes): start it with mpiexec or "
        "use --framework pytorch")
    assert not out.exists()


def test_chainer_without_mpi4py_names_the_extra(index, tmp_path, monkeypatch):
    engine = get_engine("chainer")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    config = tiny_config("chainer", index, tmp_path / "run", **RUN)
    with pytest.raises(DeepPoseError, match=r"install the distributed extra with pip install "
                       r"-e '\.\[distributed\]'"):
        engine.Engine(config, 14, None, world=World(0, 2, 0, "mpiexec"))


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_trains_one_run_with_one_writer(index, tmp_path):
    """The documented command: exit 0, process 0 alone reports and writes, the log has every
    logged iteration once, recipe.json and run.json record the processes."""
    out = tmp_path / "run"
    result = launch("pytorch", [
        "-m", "deeppose_cli", "train-stage", "1", "--dataset", "synthetic",
        "--train", str(index / "train.jsonl"), "--val", str(index / "val.jsonl"),
        "--out", str(out), "--input-size", "67", "--width", "0.0625", "--batch-size", "6",
        "--epochs", "3", "--checkpoint-every", "5", "--quiet"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished 12 iterations") == 1, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]
    run = RunDirectory(out)
    meta = run.meta()
    assert meta["complete"] and meta["processes"] == 2 and meta["batch_size_per_process"] == 3
    recipe = json.loads(run.recipe_path.read_text())
    assert recipe["batch_size"] == 6 and recipe["processes"] == 2
    log = run.read_log()
    assert [r["iteration"] for r in log if "loss" in r] == [10, 12]
    assert [r["iteration"] for r in log if "val_loss" in r] == [4, 8, 12]
    assert run.model_path.is_file() and run.checkpoint_path.is_file()


@pytest.mark.slow
def test_two_processes_train_what_one_does(index, tmp_path):
    """Without dropout and batch norm, 2 processes with the global batch 6 end where one
    process with batch 6 ends, up to the order of float sums; every process holds the same
    weights, and process 0 wrote them."""
    two_processes_train_what_one_does("pytorch", index, tmp_path)
    losses = [[r["loss"] for r in RunDirectory(tmp_path / d).read_log() if "loss" in r]
              for d in ("two", "one")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


@pytest.mark.slow
def test_a_dying_process_fails_the_run_and_its_checkpoint_resumes_exactly(index, tmp_path):
    """A process that dies at step 5 ends the run (non-zero, in bounded time); the earlier
    run in --out is untouched, the unfinished one keeps its checkpoint of iteration 3, and
    resumed on 2 processes it ends bit-identical to an uninterrupted 2-process run (dropout
    on: it draws from (seed, iteration, rank))."""
    full = driver("pytorch", index, tmp_path / "full", tmp_path / "dump-full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    train_stage1(tiny_config("pytorch", index, out, **{**RUN, "epochs": 1}),
                 show_progress=False)
    earlier = (out / "model.pt").read_bytes()

    started = time.monotonic()
    died = driver("pytorch", index, out, tmp_path / "dump-died", die={"rank": 1, "step": 5})
    assert died.returncode != 0
    assert time.monotonic() - started < LAUNCH_TIMEOUT
    assert (out / "model.pt").read_bytes() == earlier and RunDirectory(out).meta()["complete"]
    staged = RunDirectory(staging_path(out))
    assert not staged.meta()["complete"] and not staged.model_path.exists()
    assert get_engine("pytorch").Engine(tiny_config("pytorch", index, out, **RUN), 14) \
        .load_checkpoint(staged.checkpoint_path) == 3

    resumed = driver("pytorch", index, out, tmp_path / "dump-resumed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not staging_path(out).exists()
    assert_equal(model_params("pytorch", out), model_params("pytorch", tmp_path / "full"))
    logged = [r["iteration"] for r in RunDirectory(out).read_log() if "loss" in r]
    assert logged == [10, 12]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(index, tmp_path):
    """Another number of processes resumes a checkpoint too: the weights and optimizer state
    are every process's; without dropout it ends where the 2-process run ends, up to float
    sums."""
    plain = {**RUN, "dropout": 0.0}
    full = driver("pytorch", index, tmp_path / "full", tmp_path / "dump-full", overrides=plain)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    died = driver("pytorch", index, out, tmp_path / "dump", overrides=plain,
                  die={"rank": 0, "step": 8})
    assert died.returncode != 0
    _, summary = train_stage1(tiny_config("pytorch", index, out, **plain), resume=True,
                              show_progress=False)
    assert summary["iterations"] == 12
    assert "processes" not in RunDirectory(out).meta()
    assert_close(model_params("pytorch", out), model_params("pytorch", tmp_path / "full"),
                 rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two(index, tmp_path, monkeypatch):
    """The reverse: a one-process run stopped after its checkpoint of iteration 6 finishes
    on 2 processes where the one-process run ends (without dropout, up to float sums)."""
    plain = {**RUN, "dropout": 0.0}
    train_stage1(tiny_config("pytorch", index, tmp_path / "full", **plain),
                 show_progress=False)
    engine_class = get_engine("pytorch").Engine
    real_save = engine_class.save_checkpoint

    def save_then_stop(self, path, iteration):
        real_save(self, path, iteration)
        if iteration == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine_class, "save_checkpoint", save_then_stop)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_stage1(tiny_config("pytorch", index, out, **plain), show_progress=False)
    monkeypatch.undo()
    resumed = driver("pytorch", index, out, tmp_path / "dump", overrides=plain, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RunDirectory(out).meta()["processes"] == 2
    assert [r["iteration"] for r in RunDirectory(out).read_log() if "loss" in r] == [10, 12]
    assert_close(model_params("pytorch", out), model_params("pytorch", tmp_path / "full"),
                 rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- mpiexec


@pytest.mark.slow
@needs_mpi
def test_mpiexec_trains_chainer_on_two_processes(index, tmp_path):
    """ChainerMN: the same weights in both processes, what one process trains (without
    dropout), one writer, a complete log."""
    two_processes_train_what_one_does("chainer", index, tmp_path)
    meta = RunDirectory(tmp_path / "two").meta()
    assert meta["complete"] and meta["processes"] == 2
    log = RunDirectory(tmp_path / "two").read_log()
    assert [r["iteration"] for r in log if "loss" in r] == [10, 12]


@pytest.mark.slow
@needs_mpi
def test_mpiexec_a_failing_process_ends_the_run(index, tmp_path):
    """A process that raises (and so cannot finalize MPI while the other waits for it) ends
    the whole run, non-zero, with its checkpoint resumable; resumed on 2 processes it ends
    bit-identical to an uninterrupted run."""
    full = driver("chainer", index, tmp_path / "full", tmp_path / "dump-full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    died = driver("chainer", index, out, tmp_path / "dump", die={"rank": 1, "step": 5,
                                                                  "raise": True})
    assert died.returncode != 0 and "a simulated failure" in died.stderr
    assert not RunDirectory(out).meta()["complete"]
    resumed = driver("chainer", index, out, tmp_path / "dump-resumed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_equal(model_params("chainer", out), model_params("chainer", tmp_path / "full"))
