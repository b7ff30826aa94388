"""The ``deeppose`` command line: thin commands that parse, call the library and print.

The group is chained, so ``deeppose fetch lspet index lspet train-stage 1 evaluate`` runs the
commands in order; each command leaves what it produced (dataset, index files, run directory)
in a shared :class:`ChainState` where the next command takes its defaults from. Heavy imports
(torch, chainer, cv2) happen inside command bodies so ``deeppose --help`` stays instant.
"""

from __future__ import annotations

import errno
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from . import __version__
from .core.errors import DeepPoseError
from .core.exports import EXPORT_FORMATS
from .core.settings import BY_NAME, PRECISIONS, SETTINGS, Setting, recipe_defaults
from .engines import FRAMEWORKS



class DatasetName(click.Choice):
    """A dataset with a manifest: the package's, those in ``$DEEPPOSE_MANIFESTS`` and those
    ``index --coco`` generated under the data root, looked up when the command line is parsed
    (so a manifest added there is a valid choice). A generated dataset under another root is
    found through the ``--root`` options of the command line, and one that an earlier command
    of the same chain creates (``index --coco ... --name NAME``) through its ``--name``."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self):
        from .core.manifests import dataset_names

        return tuple(dataset_names())

    @choices.setter
    def choices(self, _value) -> None:
        pass

    def convert(self, value, param, ctx):
        from .core.manifests import dataset_names

        argv = ctx.meta.get(ARGV_KEY, []) if ctx is not None else []
        names = dataset_names([Path(v) for v in _option_values(argv, "--root")])
        if value in names or value in _option_values(argv, "--name"):
            return value
        self.fail(f"{value!r} is not one of {', '.join(map(repr, names))}.", param, ctx)


#: Where the group keeps its whole command line (``Context.meta`` is shared by subcommands).
ARGV_KEY = "deeppose.argv"


def _option_values(argv: list[str], option: str) -> list[str]:
    """The values given to ``option`` anywhere in ``argv`` (``--opt V`` or ``--opt=V``)."""
    values = []
    for k, token in enumerate(argv):
        if token == option and k + 1 < len(argv):
            values.append(argv[k + 1])
        elif token.startswith(option + "="):
            values.append(token[len(option) + 1:])
    return values


@dataclass
class ChainState:
    """What earlier commands of one chained call produced."""

    dataset: str | None = None
    root: Path | None = None
    run_dir: Path | None = None
    framework: str | None = None


def chain_split(command: click.Command, args: list[str], names: set[str]) -> int:
    """Where ``command``'s own tokens end and the next chained command begins.

    Walks the tokens as the command's parser will read them: the value of an option is
    never a command name, and neither is a required positional argument still waiting for
    its value (``deeppose predict info`` predicts on a file named ``info``). A command name
    starts the next command only where the command could end: after its options' values,
    once its required arguments are given (an optional or variadic argument stops there;
    write ``./info`` for a second file named like a command). After ``--`` every token is
    the command's own.
    """
    takes_value = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                takes_value[opt] = not (param.is_flag or param.count)
    slots = [[param, 0] for param in command.params if isinstance(param, click.Argument)]
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return len(args)
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            i += 2 if takes_value.get(name) and "=" not in token else 1
            continue
        open_slot = next((slot for slot in slots
                          if slot[0].nargs == -1 or slot[1] < slot[0].nargs), None)
        waiting = open_slot is not None and open_slot[1] == 0 and \
            getattr(open_slot[0], "chain_required", open_slot[0].required)
        if token in names and not waiting:
            return i
        if open_slot is None:
            return i  # more positionals than the command takes: click reports it
        open_slot[1] += 1
        i += 1
    return len(args)


class FirstValueArgument(click.Argument):
    """An argument click may leave empty (``predict --camera 0`` has no SOURCE) whose first
    token is still never read as the next chained command (:func:`chain_split`)."""

    chain_required = True


class ChainedCommand(click.Command):
    """A command of the chained group whose options may follow its arguments.

    Click parses chained commands without interspersed options, so
    ``deeppose train-stage 1 --framework chainer`` would fail; instead each command takes its
    own tokens (:func:`chain_split`) and parses them normally.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        names = set(ctx.parent.command.commands) if ctx.parent is not None else set()
        cut = chain_split(self, args, names)
        own, rest = args[:cut], args[cut:]
        ctx.allow_interspersed_args = True
        super().parse_args(ctx, own)
        ctx.args = ctx.args + rest
        return ctx.args


class SettingValue(click.ParamType):
    """A command-line value checked against its setting's declaration (type, finite,
    bounds), so ``--rotation nan`` is refused as click refuses any bad option."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.name = setting.kind.__name__

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            raw = value
        else:
            try:
                raw = int(value) if self.setting.kind is int else float(value)
            except ValueError:
                self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        try:
            return self.setting.check(raw)
        except DeepPoseError as e:  # "--rotation must be ..." -> "must be ..."
            self.fail(str(e).removeprefix(f"{self.setting.option} "), param, ctx)


def _stage_recipes() -> dict[int, dict]:
    """The packaged stage recipes (for option help texts; small TOML files)."""
    from .core.settings import stage_recipes

    try:
        return stage_recipes()
    except DeepPoseError:
        return {}


def setting_options(names):
    """Click options for the settings ``names``, from their declarations: type, bounds or
    choices, help, and each stage recipe's value shown in the help."""
    recipes = _stage_recipes()

    def decorate(command):
        for name in reversed(list(names)):
            setting = BY_NAME[name]
            help_text = f"{setting.help} ({recipe_defaults(recipes, setting)})"
            if setting.kind is bool:
                option = click.option(setting.switch, setting.name, default=None,
                                      help=help_text)
            elif setting.choices:
                option = click.option(setting.option, setting.name,
                                      type=click.Choice(setting.choices), help=help_text)
            elif setting.kind is str:
                option = click.option(setting.option, setting.name, help=help_text)
            else:
                option = click.option(setting.option, setting.name,
                                      type=SettingValue(setting),
                                      metavar=setting.kind.__name__.upper(), help=help_text)
            command = option(command)
        return command

    return decorate


TRAIN_SETTINGS = [s.name for s in SETTINGS]
AUGMENTATION_SETTINGS = [s.name for s in SETTINGS if s.group == "augmentation"]
# what the benchmark's timed step and data path depend on
BENCHMARK_SETTINGS = ([s.name for s in SETTINGS if s.group in ("network", "optimizer",
                                                                "augmentation")]
                      + ["loss", "batch_size", "image_cache_gib"])

# What the file system answers when a write cannot happen (full, over quota, read-only, no
# permission, a file too large): the user's to fix, so one line, whichever write met it.
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.EFBIG}


class DeepPoseGroup(click.Group):
    """Turns a :class:`DeepPoseError` into ``Error: <message>`` and its exit code."""

    command_class = ChainedCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeepPoseError as e:
            error = click.ClickException(process_prefix() + str(e))
            error.exit_code = e.exit_code
            raise error from None
        except OSError as e:
            if e.errno not in FILE_SYSTEM_ERRORS:
                raise  # anything else is a bug, and keeps its traceback
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def process_prefix() -> str:
    """``rank R of N: `` in a process of a distributed run (docs/distributed.md), else ''."""
    from .core.distributed import discover

    try:
        world = discover()
    except DeepPoseError:
        return ""
    return f"{world.describe()}: " if world.distributed else ""


def console():
    """Rich console; when output is not a terminal, wide enough for the metric tables."""
    from rich.console import Console

    # soft_wrap: paths and checksums in messages stay on one line, so they can be copied.
    out = Console(highlight=False, soft_wrap=True)
    return out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=120)


def data_root(root: str | None, state: ChainState) -> Path:
    if root:
        return Path(root)
    if state.root is not None:
        return state.root
    from .data.fetch import default_data_root

    return default_data_root()


@click.group(cls=DeepPoseGroup, chain=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeppose")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Cascaded DeepPose human pose regression under Chainer and PyTorch.

    Commands chain: each one's output (dataset, index files, run directory) is the next
    one's default input, e.g. `deeppose fetch synthetic index synthetic`.
    """
    ctx.obj = ChainState()
    from .core.image_headers import bound_opencv_decoding

    bound_opencv_decoding()
    # File names that are not valid UTF-8 print with escapes rather than stop the command.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


@main.command()
@click.option("--devices", is_flag=True,
              help="Also list the devices each framework can use (imports the frameworks).")
def info(devices: bool) -> None:
    """Print the versions of the toolkit's dependencies (and, with --devices, the devices
    each framework can use)."""
    from rich.table import Table

    from .apps.info import describe_environment

    table = Table(title="deeppose environment", show_header=True)
    table.add_column("component")
    table.add_column("version / devices")
    for name, value in describe_environment(devices):
        table.add_row(name, value)
    out = console()
    out.print(table)
    if not devices:
        out.print("devices: deeppose info --devices")


@main.command()
@click.argument("dataset", type=DatasetName())
@click.option("--root", type=click.Path(file_okay=False),
              help="Data root (default ./data, or $DEEPPOSE_DATA).")
@click.option("--url", help="Download from this URL instead of the manifest's (a dataset of "
              "one archive).")
@click.option("--archive", "archives", multiple=True, metavar="[NAME=]FILE",
              help="Use this local copy of an archive instead of downloading it. Repeat for "
              "a dataset of several archives (e.g. MPII's images and annotations); NAME= says "
              "which archive a FILE is when its file name does not.")
@click.option("--sha256", "checksums", multiple=True, metavar="[NAME=]HEX",
              help="Accept an archive with this checksum (NAME=HEX for a dataset of several "
              "archives).")
@click.option("--force", is_flag=True, help="Fetch again even if the dataset is complete.")
@click.option("--max-extract-gib", type=click.FloatRange(0, min_open=True),
              help="Refuse archives that unpack to more than this (default: the manifest's "
              "bound, else 8 GiB; or $DEEPPOSE_MAX_EXTRACT_GIB).")
@click.pass_obj
def fetch(state: ChainState, dataset: str, root: str | None, url: str | None,
          archives: tuple[str, ...], checksums: tuple[str, ...], force: bool,
          max_extract_gib: float | None) -> None:
    """Download (or generate) DATASET and unpack it under the data root."""
    from .data.fetch import assign_archives, assign_checksums, fetch_dataset
    from .core.manifests import load_dataset_manifest

    root_path = data_root(root, state)
    manifest = load_dataset_manifest(dataset, [root_path])
    local = assign_archives(manifest, list(archives))
    for path in local.values():
        if not path.is_file():
            raise DeepPoseError(f"archive {path} not found")
    result = fetch_dataset(manifest, root_path, url=url, archives=local,
                           checksums=assign_checksums(manifest, list(checksums)),
                           force=force, progress=sys.stderr.isatty(),
                           max_extract_bytes=(int(max_extract_gib * 2**30)
                                              if max_extract_gib else None))
    console().print(result.message)
    console().print(f"dataset: {result.dataset_dir}")
    state.dataset, state.root = dataset, root_path


@main.command()
@click.argument("dataset", type=DatasetName(), required=False)
@click.option("--root", type=click.Path(file_okay=False),
              help="Data root (default ./data, or $DEEPPOSE_DATA).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction held out for validation (default: the manifest's).")
@click.option("--seed", type=int, help="Seed of the train/val split (default: the manifest's).")
@click.option("--box-margin", type=click.FloatRange(0.0, 2.0), default=0.2, show_default=True,
              help="Person box margin around the visible joints, as a fraction of its side "
              "(datasets whose annotations give no box).")
@click.option("--min-keypoints", type=click.IntRange(1),
              help="Index only people with at least this many labelled joints (default: the "
              "skeleton's min_visible; --coco: 1).")
@click.option("--coco", "coco_files", multiple=True, metavar="[SPLIT=]FILE",
              help="Index a COCO-format keypoint JSON file as a new dataset (--name): one "
              "file is split into train and val by --val-fraction (default 0.1) and --seed; "
              "or repeat with train=FILE, val=FILE, test=FILE.")
@click.option("--images", "image_dirs", multiple=True, metavar="[SPLIT=]DIR",
              help="--coco: the directory its file_name entries are in (one for all files, "
              "or SPLIT=DIR each).")
@click.option("--name", help="--coco: the new dataset's name (ROOT/NAME holds its manifest, "
              "skeleton and index files).")
@click.option("--category", help="--coco: the keypoint category to read (default: the only "
              "one with keypoints).")
@click.pass_obj
def index(state: ChainState, dataset: str | None, root: str | None, val_fraction: float | None,
          seed: int | None, box_margin: float, min_keypoints: int | None,
          coco_files: tuple[str, ...], image_dirs: tuple[str, ...], name: str | None,
          category: str | None) -> None:
    """Parse DATASET's annotations into JSON Lines index files (train/val/test), or write a
    COCO-format keypoint dataset as a new dataset (--coco FILE --images DIR --name NAME)."""
    from rich.table import Table

    from .data.annotations import build_index
    from .core.manifests import load_dataset_manifest

    root_path = data_root(root, state)
    if coco_files:
        from .data.coco import coco_sources, write_coco_dataset

        if not name or dataset:
            raise DeepPoseError("--coco writes a new dataset: give it --name NAME (and no "
                                "DATASET argument)")
        manifest = write_coco_dataset(name, root_path, coco_sources(coco_files, image_dirs),
                                      category=category, min_keypoints=min_keypoints or 1,
                                      val_fraction=val_fraction, seed=seed)
        dataset = name
        console().print(f"wrote {manifest.path} ({manifest.num_joints} keypoints, "
                        f"{len(manifest.flip_pairs)} left/right pairs, headline metric "
                        f"{', '.join(manifest.headline)})")
    else:
        if image_dirs or name or category:
            raise DeepPoseError("--images, --name and --category go with --coco FILE")
        dataset = dataset or state.dataset or "lsp"
        manifest = load_dataset_manifest(dataset, [root_path])
    report = build_index(manifest, root_path / dataset, val_fraction=val_fraction, seed=seed,
                         box_margin=box_margin, min_visible=min_keypoints)
    table = Table(title=f"{dataset} index")
    table.add_column("split")
    table.add_column("people", justify="right")
    table.add_column("file")
    files = report.files()
    for split, count in report.counts.items():
        table.add_row(split, str(count), str(files.get(split, "-")))
    for reason, count in sorted(report.skipped_reasons.items()):
        table.add_row("skipped", str(count), reason)
    out = console()
    out.print(table)
    if report.skipped:
        out.print(f"skipped records listed in {report.index_dir / 'skipped.jsonl'}")
    state.dataset, state.root = dataset, root_path


def _index_dir(state: ChainState, root: str | None, dataset: str) -> Path:
    return data_root(root, state) / dataset / "index"


@main.command("train-stage")
@click.argument("stage", type=click.IntRange(1, 9))
@click.option("--framework", type=click.Choice(FRAMEWORKS),
              help="Default: the previous train-stage of this call, else pytorch.")
@click.option("--dataset", type=DatasetName(),
              help="Dataset whose index to train on (default: from the chain, else lsp).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root of --dataset.")
@click.option("--train", "train_index", type=click.Path(dir_okay=False),
              help="Training index file (JSONL); overrides --dataset's.")
@click.option("--val", "val_index", type=click.Path(dir_okay=False),
              help="Validation index file (JSONL).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Run directory (default runs/<dataset>/stage<N>-<framework>).")
@click.option("--previous", type=click.Path(file_okay=False),
              help="Stage >= 2: run directory of stage N-1 (default: the latest one).")
@click.option("--resume", is_flag=True, help="Continue from the run directory's checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@setting_options(TRAIN_SETTINGS)
@click.pass_obj
def train_stage(state: ChainState, stage: int, framework: str | None, dataset: str | None,
                root: str | None, train_index: str | None, val_index: str | None,
                resume: bool, quiet: bool, previous: str | None, out: str | None,
                **overrides) -> None:
    """Train cascade stage STAGE (1: person crops; 2+: refine the previous stage).

    Every setting's value comes from the stage recipe (stages/stage<N>.toml) unless its
    option is given; docs/options.md lists them all."""
    from .core.distributed import discover
    from .training.stages import resolve_train_config, resume_hint, train_stage as run_training

    framework = framework or state.framework or "pytorch"
    config = resolve_train_config(
        stage, framework, out=out, dataset=dataset, default_dataset=state.dataset or "lsp",
        index_dir_of=lambda name: _index_dir(state, root, name), train_index=train_index,
        val_index=val_index, previous=previous, chained_run=state.run_dir, resume=resume,
        overrides={k: v for k, v in overrides.items() if v is not None})
    out, dataset = config.out, config.dataset
    world = discover()
    out_console = console()
    if world.is_writer:
        processes = f", {world.size} processes" if world.distributed else ""
        out_console.print(f"training stage {stage} ({framework}{processes}) on "
                          f"{config.train_index} -> {out}")
    try:
        run, summary = run_training(config, resume=resume, show_progress=not quiet)
    except KeyboardInterrupt:
        if world.is_writer:
            click.echo(f"Interrupted; {resume_hint(config)}", err=True)
        raise click.exceptions.Exit(130) from None
    state.run_dir, state.framework, state.dataset = run.path, framework, dataset
    state.root = data_root(root, state)  # a later stage of the chain trains on the same data
    if not world.is_writer:  # process 0 reports the run
        return
    val = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("val", {}).items())
    speed = (f", {summary['images_per_second']:.1f} images/s"
             if summary.get("images_per_second") else "")
    out_console.print(f"finished {summary['iterations']} iterations: loss "
                      f"{summary['final_loss']:.4g}{speed}" + (f"; validation {val}" if val else ""))
    out_console.print(f"run directory: {run.path} (model {run.model_path.name}, log "
                      f"{run.log_path.name}, loss curve loss.png)")


@main.command("show-augmentation")
@click.option("--dataset", type=DatasetName(),
              help="Dataset whose training index to sample (default: from the chain, else lsp).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root of --dataset.")
@click.option("--index", "index_file", type=click.Path(dir_okay=False),
              help="Index file to sample (overrides --dataset's training index).")
@click.option("--count", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Number of samples in the grid.")
@click.option("--epoch", type=click.IntRange(0), default=0, show_default=True,
              help="Draw the augmentation of this epoch.")
@setting_options(["seed", "input_size", "epochs", "max_iterations", "batch_size"]
                 + AUGMENTATION_SETTINGS)
@click.option("--out", type=click.Path(dir_okay=False), default="augmentation.png",
              show_default=True, help="PNG to write.")
@click.pass_obj
def show_augmentation(state: ChainState, dataset: str | None, root: str | None,
                      index_file: str | None, count: int, epoch: int, out: str,
                      **overrides) -> None:
    """Write a PNG grid of augmented stage-1 training samples with their target joints
    (hollow rings: labelled joints the sample does not train on)."""
    from .apps.drawing import augmentation_grid
    from .core.files import atomic_write
    from .core.manifests import load_dataset_manifest, load_stage_recipe
    from .training.stages import augmentation_preview_dataset

    dataset = dataset or state.dataset or "lsp"
    if index_file is None:
        index_file = str(_index_dir(state, root, dataset) / "train.jsonl")
    from .core.settings import check_recipe

    recipe = load_stage_recipe(1)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    recipe = check_recipe(recipe)
    manifest = load_dataset_manifest(dataset, [data_root(root, state)])
    samples = augmentation_preview_dataset(Path(index_file), recipe, manifest)
    grid = augmentation_grid(samples, range(min(count, len(samples))), epoch, manifest.skeleton)

    import cv2

    def write(tmp: Path) -> None:
        ok, data = cv2.imencode(".png", grid)
        tmp.write_bytes(data.tobytes())

    atomic_write(Path(out), write)
    console().print(f"{min(count, len(samples))} augmented samples of {index_file} "
                    f"(epoch {epoch}): {out}")


def _default_eval_index(run_dir: Path, state: ChainState) -> Path:
    """The dataset test split, else its val split, of the run (or the run an export came
    from): next to its training index, else under the data root (a packaged or moved run
    was trained elsewhere)."""
    from .training.runs import model_meta, training_index

    train_index = training_index(run_dir)
    dataset = model_meta(run_dir).get("dataset")
    places = ([train_index.parent] if train_index else []) + \
        ([data_root(None, state) / dataset / "index"] if dataset else [])
    for index_dir in places:
        for split in ("test", "val"):
            if (index_dir / f"{split}.jsonl").is_file():
                return index_dir / f"{split}.jsonl"
    where = " or ".join(str(p) for p in places) or f"the records of {run_dir}"
    fetch = f"run `deeppose fetch {dataset} index {dataset}`, or " if dataset else ""
    raise DeepPoseError(f"no test.jsonl or val.jsonl in {where}: {fetch}pass --index FILE")


@main.command()
@click.option("--model", "model_dir",
              help="Run directory, export, or packaged cascade (default: the chain's, else "
                   "the latest run under runs/, else the pretrained lspet-small).")
@click.option("--index", "index_file", type=click.Path(dir_okay=False),
              help="Index file to evaluate on (default: the dataset's test split, else val).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write metrics here (default RUN_DIR/eval/metrics.json).")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="PDJ-curve PNG (default RUN_DIR/eval/pdj.png).")
@click.option("--save-predictions", type=click.Path(dir_okay=False),
              help="Per-image predictions (default RUN_DIR/eval/predictions.json).")
@click.option("--stages", type=click.IntRange(1), help="Evaluate stages 1..K only.")
@click.option("--flip-test/--no-flip-test", default=None,
              help="Average each crop's prediction with its mirror image's (default: on for "
                   "every stage trained on mirrored images, as the recipes do).")
@click.option("--flip-weights", type=click.Choice(["scales", "equal"]), default="scales",
              show_default=True,
              help="scales: weight the two views of a coordinate by the inverse variance of "
                   "their predicted Laplace scales (stages trained with the laplace loss); "
                   "equal: the plain mean.")
@click.option("--refinement-crops", is_flag=True,
              help="Also run each refinement stage on its own simulated boxes and on boxes "
                   "centred on the truth (its error beside not refining; two more forward "
                   "passes per joint and image).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_obj
def evaluate(state: ChainState, model_dir: str | None, index_file: str | None,
             json_out: str | None, plot: str | None, save_predictions: str | None,
             stages: int | None, flip_test: bool | None, flip_weights: str, device: str,
             refinement_crops: bool) -> None:
    """PCP and PDJ of every cascade stage beside the mean-pose baseline."""
    from .data.annotations import read_index
    from .core.cascade import run_cascade_on_records, with_flip_test
    from .apps.evaluate import (EvaluationOutput, evaluate_predictions, metrics_json,
                                plot_pdj, predictions_json, refinement_reports, run_seen)
    from .core.manifests import run_manifest
    from .training.rundir import RunReadLock
    from .training.runs import (load_cascade, model_meta, packaged_eval_dir, resolve_model,
                                stage_directories)

    run_dir, note = resolve_model(model_dir, state.run_dir)
    if note:
        console().print(note)
    run_meta = model_meta(run_dir)  # a clear error for a directory that is not a run
    index_path = Path(index_file) if index_file else _default_eval_index(run_dir, state)
    records = read_index(index_path, run_meta.get("num_joints"))
    output = EvaluationOutput(run_dir, json_out and Path(json_out), plot and Path(plot),
                              save_predictions and Path(save_predictions),
                              eval_dir=packaged_eval_dir(run_dir))
    with output:  # every destination checked writable before the evaluation runs
        with RunReadLock(run_dir) as lock:  # one run, even if a retrain publishes meanwhile
            seen = run_seen(lock, run_dir)
            cascade, meta = load_cascade(run_dir, device, stages)
            stage_dirs = stage_directories(run_dir)[:len(cascade)]
        manifest = run_manifest(meta)
        cascade = with_flip_test(cascade, manifest.flip_permutation, flip_test, flip_weights)
        flipped = [stage.stage for stage in cascade if stage.flip_test]
        started = time.perf_counter()
        per_stage = run_cascade_on_records(cascade, records, manifest.torso_diameter)
        seconds = time.perf_counter() - started  # loading, cropping and every stage's forward
        rows = evaluate_predictions(per_stage, meta["mean_pose"], records, manifest)
        refinements = refinement_reports(stage_dirs, cascade, per_stage, records, manifest,
                                         on_crops=refinement_crops)
        title = f"{meta['dataset']}: {index_path.name} ({len(records)} images)"
        output.write(seen, metrics_json(rows, manifest, {
            "run": str(run_dir), "index": str(index_path), "images": len(records),
            "flip_test": bool(flipped), "flip_test_stages": flipped, "flip_weights": flip_weights,
            "seconds": round(seconds, 6),
            "images_per_second": round(len(records) / seconds, 2) if seconds > 0 else None,
            "refinement": [r.to_json(manifest.joint_names) for r in refinements]}),
            lambda path: plot_pdj(rows, path, title),
            predictions_json(records, per_stage, manifest.joint_names))
    _print_evaluation(rows, manifest, f"{run_dir} on {index_path} ({len(records)} images, "
                      f"{len(records) / max(seconds, 1e-9):.1f} images/s through the cascade; test-time flip: "
                      f"{_stage_list(flipped)})")
    if refinements:
        _print_refinements(refinements, manifest)
    console().print(f"metrics: {output.path('metrics')}\nPDJ curves: {output.path('plot')}\n"
                    f"predictions: {output.path('predictions')}")
    state.run_dir = Path(run_dir)


PCP_SHORT = {"upper_arms": "u.arm", "lower_arms": "l.arm", "upper_legs": "u.leg",
             "lower_legs": "l.leg", "head": "head", "torso": "torso", "mean": "PCP"}


def _stage_list(stages: list[int]) -> str:
    return ("stage " if len(stages) == 1 else "stages ") + ", ".join(map(str, stages)) if stages else "off"


def _print_evaluation(rows, manifest, title: str) -> None:
    import math

    from rich.table import Table

    from .apps.evaluate import metric_label, per_joint_metric, summary_metrics

    def pct(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    metrics = summary_metrics(rows, manifest)
    categories = [c for c in rows[0].pcp if c != "mean"]
    categories += ["mean"] if categories and "pcp" not in metrics else []
    headline = ", ".join(metric_label(m) for m in manifest.headline)
    table = Table(title=f"{title}\n{manifest.title}: headline {headline}; then the other "
                  "metrics" + ("; strict PCP@0.5 per limb category" if categories else "")
                  + " (%)")
    table.add_column("model", no_wrap=True)
    for metric in metrics:
        table.add_column(metric_label(metric), justify="right")
    for c in categories:
        table.add_column(PCP_SHORT.get(c, c), justify="right")
    for row in rows:
        table.add_row(row.name, *[pct(row.metric(m)) for m in metrics],
                      *[pct(row.pcp[c]) for c in categories])
    joint_metric, values_of = per_joint_metric(rows, manifest)
    joints = Table(title=f"{metric_label(joint_metric)} per joint (%)")
    joints.add_column("joint", no_wrap=True)
    for row in rows:
        joints.add_column(row.name, justify="right")
    per_joint = [values_of(row) for row in rows]
    for j, name in enumerate(manifest.joint_names):
        joints.add_row(name, *[pct(float(p[j])) for p in per_joint])
    out = console()
    out.print(table)
    out.print(joints)


def _print_refinements(reports, manifest) -> None:
    """Per refinement stage: how often it moved each joint closer / farther, and its error on
    its own crops (torso diameters) beside not refining."""
    from rich.table import Table

    out = console()
    crops = Table(title="refinement stages on their own crops (error in torso diameters)")
    for column in ("stage", "simulated boxes", "no refinement", "moved closer",
                   "boxes centred on truth"):
        crops.add_column(column, justify="right")
    for r in reports:
        c = r.crops
        crops.add_row(str(r.stage), *(f"{c[k]:.3f}" if k in c else "-"
                                      for k in ("err", "err_none", "closer", "err_centred")))
    moved = Table(title="refinement on the cascade's predictions: joints moved closer / farther")
    moved.add_column("joint")
    for r in reports:
        moved.add_column(f"stage {r.stage}", justify="right")
    for j, name in enumerate(manifest.joint_names):
        moved.add_row(name, *(f"{100 * r.closer[j]:.0f}% / {100 * r.farther[j]:.0f}%"
                              for r in reports))
    moved.add_row("mean", *(f"{100 * r.closer.mean():.0f}% / {100 * r.farther.mean():.0f}%"
                            for r in reports))
    out.print(crops)
    out.print(moved)


def _parse_bbox(text: str | None):
    if text is None:
        return None
    from .core.geometry import MAX_PIXEL_COORDINATE, MIN_BOX_SIDE

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) and abs(v) <= MAX_PIXEL_COORDINATE
                                   for v in values) or min(values[2:]) < MIN_BOX_SIDE:
        raise DeepPoseError(f"--bbox must be X,Y,W,H: four finite numbers of pixels (at most "
                            f"{MAX_PIXEL_COORDINATE:.0e}) with W and H at least "
                            f"{MIN_BOX_SIDE:g} pixel, got {text!r}")
    return values


@main.command()
@click.argument("sources", nargs=-1, type=click.Path(), cls=FirstValueArgument)
@click.option("--model", "model_dir",
              help="Run directory, export, or packaged cascade (default: the chain's, else "
                   "the latest run under runs/, else the pretrained lspet-small).")
@click.option("--camera", type=click.IntRange(0),
              help="Also read camera N (0: the first) until Ctrl-C, after the SOURCEs.")
@click.option("--max-frames", type=click.IntRange(1),
              help="Predict at most this many frames of each video and of the camera.")
@click.option("--recursive", is_flag=True, help="Search folders' subfolders too (and ** in "
                                                  "patterns).")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True,
              help="Predict every N-th frame of a video.")
@click.option("--detector", type=click.Choice(["none", "hog", "torchvision"]), default="none",
              show_default=True,
              help="How people are found: none (the whole image is the person), hog "
                   "(OpenCV's people detector) or torchvision (Faster R-CNN on COCO).")
@click.option("--detector-weights", type=click.Path(dir_okay=False),
              help="State dict file of the torchvision detector (default: torchvision's COCO "
                   "weights, downloaded into its cache on first use).")
@click.option("--boxes", "boxes_file", type=click.Path(dir_okay=False),
              help="Person boxes per image: COCO detection results JSON or CSV "
                   "(docs/predict.md#boxes-files).")
@click.option("--bbox", help="One crop X,Y,W,H in pixels, used as given on every image.")
@click.option("--min-score", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Keep detections and boxes scoring at least this.")
@click.option("--max-people", type=click.IntRange(1),
              help="At most this many people per image (the best scoring).")
@click.option("--draw", is_flag=True,
              help="Write each image with boxes and skeletons drawn, and each video as a "
                   "drawn video.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="predictions",
              show_default=True, help="Where --draw writes images and videos.")
@click.option("--save-json", type=click.Path(dir_okay=False),
              help="Write COCO keypoint results (JSON) to this file.")
@click.option("--save-csv", type=click.Path(dir_okay=False),
              help="Write one CSV row per image or frame, person and joint to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the poses as JSON.")
@click.option("--stages", type=click.IntRange(1), help="Run stages 1..K only.")
@click.option("--flip-test/--no-flip-test", default=None,
              help="Average each crop's prediction with its mirror image's (default: on for "
                   "every stage trained on mirrored images, as the recipes do).")
@click.option("--flip-weights", type=click.Choice(["scales", "equal"]), default="scales",
              show_default=True,
              help="scales: weight the two views of a coordinate by the inverse variance of "
                   "their predicted Laplace scales (stages trained with the laplace loss); "
                   "equal: the plain mean.")
@click.option("--device", default="cpu", show_default=True)
@click.pass_obj
def predict(state: ChainState, sources: tuple[str, ...], model_dir: str | None,
            camera: int | None, max_frames: int | None, recursive: bool, every: int,
            detector: str, detector_weights: str | None,
            boxes_file: str | None, bbox: str | None, min_score: float,
            max_people: int | None, draw: bool, out_dir: str, save_json: str | None,
            save_csv: str | None, as_json: bool, stages: int | None,
            flip_test: bool | None, flip_weights: str, device: str) -> None:
    """Predict poses on image files, folders, glob patterns, @LIST files, videos and a
    camera (docs/predict.md)."""
    import json

    if not sources and camera is None:
        raise click.UsageError("give at least one SOURCE, or --camera N")

    from .apps.predict import PoseModel, legacy_json, run_predict
    from .core.files import printable

    box = _parse_bbox(bbox)
    from .training.runs import resolve_model

    run_dir, note = resolve_model(model_dir, state.run_dir)
    if note:
        click.echo(note, err=True)
    model = PoseModel(run_dir, stages=stages, device=device, flip_test=flip_test,
                      flip_weights=flip_weights, detector=detector,
                      detector_weights=detector_weights, min_score=min_score,
                      max_people=max_people, bbox=box, boxes=boxes_file)
    summary = run_predict(model, sources, recursive=recursive, every=every,
                          draw_dir=Path(out_dir) if draw else None,
                          save_json=save_json and Path(save_json),
                          save_csv=save_csv and Path(save_csv),
                          progress=not as_json and sys.stderr.isatty(),
                          camera=camera, max_frames=max_frames)
    results = summary.results
    out = console()
    if as_json:
        click.echo(json.dumps([e for r in results for e in legacy_json(r)], indent=2))
    elif len(results) <= 20:
        from rich.table import Table

        for r in results:
            where = printable(r.source) + ("" if r.frame is None else f" frame {r.frame}")
            for k, p in enumerate(r.people):
                who = "" if len(r.people) == 1 else f" person {k + 1}"
                table = Table(title=f"{where}{who} (box {p.box_text})")
                table.add_column("joint")
                table.add_column("x", justify="right")
                table.add_column("y", justify="right")
                if p.confidence is not None:
                    table.add_column("confidence", justify="right")
                for j, (name, (x, y)) in enumerate(zip(r.joint_names, p.joints)):
                    extra = [] if p.confidence is None else [f"{p.confidence[j]:.2f}"]
                    table.add_row(name, f"{x:.1f}", f"{y:.1f}", *extra)
                out.print(table)
    for path in summary.drawn:
        click.echo(f"drawn: {printable(path)}", err=as_json)
    for target in (save_json, save_csv):
        if target:
            click.echo(f"written: {target}", err=as_json)
    if not as_json:  # --json: stdout is the JSON, stderr only the errors
        people = sum(len(r.people) for r in results)
        rate = len(results) / summary.seconds if summary.seconds > 0 else float("inf")
        click.echo(f"{len(results)} images/frames, {people} people, {rate:.1f} images/s"
                   + (f"; {summary.frames_without_people} with no person found"
                      if summary.frames_without_people else ""), err=True)
    for failure in summary.failures:
        click.echo(f"Error: {failure}", err=True)
    if summary.failures:
        click.get_current_context().exit(2)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--to", "framework", type=click.Choice(FRAMEWORKS), required=True)
@click.option("--out", type=click.Path(file_okay=False),
              help="Output run directory (default RUN_DIR-<framework>; for a packaged "
                   "cascade runs/NAME-<framework>).")
@click.option("--half", is_flag=True,
              help="Store the weights as float16: half the size; joints move by up to about "
                   "a pixel (docs/model-card.md; measure it with evaluate).")
@click.pass_obj
def convert(state: ChainState, run_dir: str, framework: str, out: str | None,
            half: bool) -> None:
    """Convert a run's weights (every stage of its cascade) to a framework's model files.
    RUN_DIR may name a packaged cascade (lspet-small)."""
    from .apps.convert import convert_run
    from .training.runs import packaged_output_dir, run_or_packaged

    source = run_or_packaged(run_dir)
    target = (Path(out) if out else packaged_output_dir(source, framework)
              or Path(f"{run_dir.rstrip('/')}-{framework}"))
    convert_run(source, framework, target, half=half)
    console().print(f"converted {run_dir} to {framework}: {target}")
    state.run_dir = target


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--format", "model_format", default="onnx", show_default=True,
              help=f"{' or '.join(EXPORT_FORMATS)} (onnx needs the export extra: "
                   "pip install -e '.[export]').")
@click.option("--out", type=click.Path(file_okay=False),
              help="Export directory (default RUN_DIR-<format>; for a packaged cascade "
                   "runs/NAME-<format>); an earlier export there is replaced.")
@click.option("--opset", type=click.IntRange(18), help="ONNX opset (default 20).")
@click.option("--flip-test/--no-flip-test", default=None,
              help="Build the test-time flip into every stage's graph, or into none "
                   "(default: into each stage trained on mirrored images, as predict does).")
@click.pass_obj
def export(state: ChainState, run_dir: str | None, model_format: str, out: str | None,
           opset: int | None, flip_test: bool | None) -> None:
    """Export every stage of RUN_DIR's cascade as ONNX or TorchScript graphs with a
    cascade.json, to run without deeppose (docs/export.md). RUN_DIR may name a packaged
    cascade (lspet-small)."""
    from .apps.export import export_run
    from .training.runs import latest_run, packaged_output_dir, run_or_packaged

    source = run_or_packaged(run_dir) if run_dir else (state.run_dir or latest_run())
    target = Path(out) if out else packaged_output_dir(source, model_format)
    result = export_run(source, model_format, target, opset, flip_test)
    out_console = console()
    for stage, (name, size) in zip(result.description.stages, result.sizes().items()):
        flip = "flip test in graph" if stage.flip_in_graph else "no flip test in graph"
        out_console.print(f"stage {stage.stage} ({stage.source_framework}): {name}, "
                          f"{size / 2**20:.1f} MiB, {flip}")
    out_console.print(f"exported {source} to {model_format}: {result.out}")
    state.run_dir = result.out


BENCHMARK_SECTIONS = ("compute", "overhead", "pipeline", "cascade", "cli", "scaling")


@main.command()
@click.option("--framework", "frameworks", type=click.Choice(FRAMEWORKS),
              multiple=True, help="Repeat to choose (default: both).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-batch-log2", type=click.IntRange(0, 12),
              help="Time batch sizes 2^0..2^K (default 5 on cpu, 8 on cuda).")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Timed repetitions of each measurement.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed repetitions before each measurement.")
@click.option("--dataset", type=DatasetName(),
              help="Dataset whose train split feeds the pipeline test (default: from the "
                   "chain, else lsp).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root of --dataset.")
@click.option("--index", "index_file", type=click.Path(dir_okay=False),
              help="Training index (JSONL) for the pipeline test; overrides --dataset's.")
@click.option("--iterations", type=click.IntRange(2), default=20, show_default=True,
              help="Timed steps per mode of the pipeline and overhead tests.")
@click.option("--workers", type=click.IntRange(0), multiple=True,
              help="Data-loading workers of the pipeline test; repeat to compare (default: "
                   "0 and 2).")
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Training-step arithmetic; repeat to time several (default: fp32). The "
                   "pipeline test uses the first.")
@click.option("--stages", type=click.IntRange(1, 9), default=3, show_default=True,
              help="Cascade depth of the predict-latency test.")
@click.option("--processes", type=click.IntRange(2), multiple=True,
              help="Run the scaling section (only when given: it launches real trainings): "
                   "train-stage 1 on 1 and on N processes under torchrun / mpiexec, one "
                   "thread (cpu) or one device (cuda) each; repeat to compare several N.")
@click.option("--scaling-iterations", type=click.IntRange(20), default=40, show_default=True,
              help="Iterations of each scaling run (images/s from its log, the first 10 "
                   "left out).")
@click.option("--skip", type=click.Choice(BENCHMARK_SECTIONS), multiple=True,
              help="Leave a section out (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/benchmark",
              show_default=True, help="Directory for benchmark.json and the charts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write the JSON here instead of OUT/benchmark.json.")
@setting_options(BENCHMARK_SETTINGS)
@click.pass_obj
def benchmark(state: ChainState, frameworks: tuple[str, ...], device: str,
              max_batch_log2: int | None, dataset: str | None, root: str | None,
              index_file: str | None, iterations: int, stages: int,
              processes: tuple[int, ...], scaling_iterations: int,
              skip: tuple[str, ...], out: str, json_out: str | None, **settings) -> None:
    """Time both frameworks: step vs batch size, pipeline efficiency, cascade latency;
    with --processes, training images/s on 1 vs N processes.

    The step timed is the one train-stage runs for the stage-1 recipe with the same
    recipe options (network, loss, optimizer, augmentation, batch size)."""
    from .apps.benchmark import BenchmarkSettings, plot_charts, run_benchmark
    from .core.files import write_json
    from .core.config import parse_device

    dataset = dataset or state.dataset or "lsp"
    sections = tuple(s for s in BENCHMARK_SECTIONS if s not in skip
                     and (s != "scaling" or processes))
    if index_file is None:
        candidate = _index_dir(state, root, dataset) / "train.jsonl"
        if candidate.is_file():
            index_file = str(candidate)
        elif "pipeline" in sections:
            raise DeepPoseError(f"{candidate} not found: run `deeppose fetch {dataset} index "
                                f"{dataset}` first, pass --index FILE, or --skip pipeline")
    elif not Path(index_file).is_file():
        raise DeepPoseError(f"index file {index_file} not found")
    if max_batch_log2 is None:
        max_batch_log2 = 5 if parse_device(device)[0] == "cpu" else 8
    for axis in ("precisions", "workers"):  # not given: the settings' defaults
        if not settings.get(axis):
            settings.pop(axis, None)
    recipe = {name: settings.pop(name) for name in BENCHMARK_SETTINGS
              if settings.get(name) is not None}
    for name in BENCHMARK_SETTINGS:
        settings.pop(name, None)
    config = BenchmarkSettings(frameworks=frameworks or FRAMEWORKS, device=device, recipe=recipe,
                               max_batch_log2=max_batch_log2, dataset=dataset, index=index_file,
                               pipeline_iterations=iterations, cascade_stages=stages,
                               sections=sections, scaling_iterations=scaling_iterations,
                               **({"processes": processes} if processes else {}), **settings)
    out_console = console()
    result = run_benchmark(config, log=lambda message: out_console.print(f"  {message}"))
    _print_benchmark(result)
    json_path = write_json(Path(json_out) if json_out else Path(out) / "benchmark.json", result)
    charts = plot_charts(result, Path(out))
    out_console.print(f"results: {json_path}" + "".join(f"\nchart: {c}" for c in charts))


def _print_benchmark(result: dict) -> None:
    from rich.table import Table

    from .apps.benchmark import report_tables

    out = console()
    for item in report_tables(result):
        if isinstance(item, str):
            out.print(item)
            continue
        table = Table(title=item.title)
        for k, name in enumerate(item.columns):
            table.add_column(name, justify="right" if k >= item.right_from else "left")
        for row in item.rows:
            table.add_row(*[f"[bold red]{cell}[/]" if k == item.alert_column
                            and cell.startswith(("no", "invalid")) else cell
                            for k, cell in enumerate(row)])
        out.print(table)


def run() -> None:
    """Console-script entry point."""
    main(prog_name="deeppose")


if __name__ == "__main__":
    run()
