"""The ``deeppose`` command line: thin commands that parse, call the library and print.

The group is chained, so ``deeppose fetch lspet index lspet train-stage 1 evaluate`` runs the
commands in order; each command leaves what it produced (dataset, index files, run directory)
in a shared :class:`ChainState` where the next command takes its defaults from. Heavy imports
(torch, chainer, cv2) happen inside command bodies so ``deeppose --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from . import __version__
from .errors import DeepPoseError

DATASETS = ("lsp", "lspet", "synthetic")


@dataclass
class ChainState:
    """What earlier commands of one chained call produced."""

    dataset: str | None = None
    root: Path | None = None
    index_files: dict[str, Path] = field(default_factory=dict)
    run_dir: Path | None = None


class DeepPoseGroup(click.Group):
    """Turns a :class:`DeepPoseError` into ``Error: <message>`` and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeepPoseError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def console():
    from rich.console import Console

    return Console(highlight=False)


def data_root(root: str | None, state: ChainState) -> Path:
    if root:
        return Path(root)
    if state.root is not None:
        return state.root
    from .fetch import default_data_root

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


@main.command()
def info() -> None:
    """Print versions of the toolkit's dependencies and the devices each framework can use."""
    from .environment import describe_environment

    out = console()
    from rich.table import Table

    table = Table(title="deeppose environment", show_header=True)
    table.add_column("component")
    table.add_column("version / devices")
    for name, value in describe_environment():
        table.add_row(name, value)
    out.print(table)


@main.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--root", type=click.Path(file_okay=False),
              help="Data root (default ./data, or $DEEPPOSE_DATA).")
@click.option("--url", help="Download from this URL instead of the manifest's.")
@click.option("--archive", type=click.Path(dir_okay=False),
              help="Use this local copy of the archive instead of downloading.")
@click.option("--sha256", help="Accept an archive with this checksum.")
@click.option("--force", is_flag=True, help="Fetch again even if the dataset is complete.")
@click.pass_obj
def fetch(state: ChainState, dataset: str, root: str | None, url: str | None,
          archive: str | None, sha256: str | None, force: bool) -> None:
    """Download (or generate) DATASET and unpack it under the data root."""
    from .fetch import fetch_dataset
    from .manifests import load_dataset_manifest

    root_path = data_root(root, state)
    if archive is not None and not Path(archive).is_file():
        raise DeepPoseError(f"archive {archive} not found")
    result = fetch_dataset(load_dataset_manifest(dataset), root_path, url=url,
                           archive=Path(archive) if archive else None, sha256=sha256,
                           force=force, progress=sys.stderr.isatty())
    console().print(result.message)
    console().print(f"dataset: {result.dataset_dir}")
    state.dataset, state.root = dataset, root_path


@main.command()
@click.argument("dataset", type=click.Choice(DATASETS), required=False)
@click.option("--root", type=click.Path(file_okay=False),
              help="Data root (default ./data, or $DEEPPOSE_DATA).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction held out for validation (default: the manifest's).")
@click.option("--seed", type=int, help="Seed of the train/val split (default: the manifest's).")
@click.option("--box-margin", type=click.FloatRange(0.0, 2.0), default=0.2, show_default=True,
              help="Person box margin around the visible joints, as a fraction of its side.")
@click.pass_obj
def index(state: ChainState, dataset: str | None, root: str | None, val_fraction: float | None,
          seed: int | None, box_margin: float) -> None:
    """Parse DATASET's annotations into JSON Lines index files (train/val/test)."""
    from rich.table import Table

    from .annotations import build_index
    from .manifests import load_dataset_manifest

    dataset = dataset or state.dataset or "lsp"
    root_path = data_root(root, state)
    manifest = load_dataset_manifest(dataset)
    report = build_index(manifest, root_path / dataset, val_fraction=val_fraction, seed=seed,
                         box_margin=box_margin)
    table = Table(title=f"{dataset} index")
    table.add_column("split")
    table.add_column("images", justify="right")
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
    state.dataset, state.root, state.index_files = dataset, root_path, files


def run() -> None:
    """Console-script entry point."""
    main(prog_name="deeppose")


if __name__ == "__main__":
    run()
