"""Evaluating a cascade on an index file: PCKh (where the skeleton names a head segment),
PCK of the box, PDJ and PCP per stage beside the mean-pose floor, the PDJ-curve plot, and
per-image predictions in image pixels. The dataset's headline metrics (its manifest's
``[evaluation] headline``) come first in the table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import DeepPoseError
from ..core.records import PoseRecord
from ..core.files import (atomic_write, check_writable, make_temp_dir, os_error_reason,
                          printable, replace_directory, write_json, WriteError)
from ..core.geometry import denormalize_pose
from ..core.manifests import DatasetManifest
from ..core.metrics import RateCurve, head_sizes, pck_box, pckh, pcp, pdj


@dataclass
class StageScores:
    name: str           # "mean pose", "stage 1", "stages 1-2", ...
    predictions: np.ndarray  # (N, J, 2) image pixels
    pcp: dict[str, float]
    pdj: RateCurve
    pck: RateCurve      # of the person box
    pckh: RateCurve | None = None   # None: the dataset has no head size
    groups: dict[str, tuple[int, ...]] | None = None  # the manifest's joint groups

    def metric(self, name: str) -> float:
        """A headline metric by name: ``pckh@0.5``, ``pck@0.2``, ``pdj@0.1``, ``pdj@0.2``,
        ``pdj_auc``, ``pcp`` (strict PCP over every limb); the curves' ones may end in
        ``/GROUP`` (that joint group only, e.g. ``pdj@0.2/wrists``)."""
        base, _, group = name.partition("/")
        if base == "pcp":
            return self.pcp["mean"]
        kind, _, alpha = base.partition("@")
        curve = {"pckh": self.pckh, "pck": self.pck, "pdj": self.pdj, "pdj_auc": self.pdj}[kind]
        if curve is None:
            return float("nan")
        if group:
            curve = curve.group((self.groups or {})[group])
        return curve.auc if kind == "pdj_auc" else curve.at(float(alpha))[0]


def metric_label(name: str) -> str:
    """A metric's column heading: ``pckh@0.5`` -> ``PCKh@.5``, ``pdj@0.2/wrists`` ->
    ``PDJ@.2 wrists``."""
    base, _, group = name.partition("/")
    kind, _, alpha = base.partition("@")
    label = {"pckh": "PCKh", "pck": "PCK", "pdj": "PDJ", "pdj_auc": "AUC", "pcp": "PCP"}[kind]
    if alpha:
        label += "@" + alpha.removeprefix("0")
    return f"{label} {group}" if group else label


def summary_metrics(rows: Sequence[StageScores], manifest: DatasetManifest) -> list[str]:
    """The table's metric columns: the headline first, then PCKh@0.5 (where there are head
    sizes), PCK@0.2, PDJ@0.1, PDJ@0.2, its AUC and each joint group's PDJ@0.2."""
    rest = (["pckh@0.5"] if rows[0].pckh is not None else []) + \
        ["pck@0.2", "pdj@0.1", "pdj@0.2", "pdj_auc"] + \
        [f"pdj@0.2/{group}" for group in manifest.joint_groups]
    headline = list(manifest.headline)
    return headline + [m for m in rest if m not in headline]


def per_joint_metric(rows: Sequence[StageScores], manifest: DatasetManifest
                     ) -> tuple[str, Any]:
    """The per-joint table's metric: the headline's curve (PDJ@0.2 for a PCP headline), as
    (name, row -> per-joint values)."""
    for metric in manifest.headline:
        base = metric.partition("/")[0]
        if base in ("pckh@0.5", "pck@0.2", "pdj@0.1", "pdj@0.2") and \
                not (base == "pckh@0.5" and rows[0].pckh is None):
            kind, _, alpha = base.partition("@")
            return base, lambda row, kind=kind, alpha=float(alpha): \
                getattr(row, kind).at(alpha)[1]
    return "pdj@0.2", lambda row: row.pdj.at(0.2)[1]


def stage_label(k: int) -> str:
    return "stage 1" if k == 1 else "stages " + "-".join(str(i) for i in range(1, k + 1))


def mean_pose_predictions(mean_pose: Sequence[Sequence[float]],
                          records: Sequence[PoseRecord]) -> np.ndarray:
    """The mean training pose placed in each record's person box."""
    boxes = np.stack([r.box for r in records])
    return denormalize_pose(np.broadcast_to(np.asarray(mean_pose), (len(records),) +
                                            np.asarray(mean_pose).shape), boxes)


def score(name: str, predictions: np.ndarray, records: Sequence[PoseRecord],
          manifest: DatasetManifest) -> StageScores:
    gt = np.stack([r.joints for r in records])
    visible = np.stack([r.visible for r in records])
    boxes = np.stack([r.box for r in records])
    heads = head_sizes(gt, visible, [r.head_size for r in records], manifest.head_segment)
    head_curve = (pckh(predictions, gt, visible, heads, excluded=manifest.pckh_excludes)
                  if np.isfinite(heads).any() else None)
    pdj_curve = pdj(predictions, gt, visible, manifest.torso_diameter)
    return StageScores(name, predictions, pcp(predictions, gt, visible, manifest.limbs),
                       pdj_curve, pck_box(predictions, gt, visible, boxes), head_curve,
                       manifest.joint_groups)


def evaluate_predictions(per_stage: Sequence[np.ndarray], mean_pose, records, manifest
                         ) -> list[StageScores]:
    """Rows: the mean-pose baseline, then one per cascade depth."""
    rows = [score("mean pose", mean_pose_predictions(mean_pose, records), records, manifest)]
    rows += [score(stage_label(k), p, records, manifest) for k, p in enumerate(per_stage, 1)]
    return rows


def _per_joint(curve: RateCurve, alpha: float, names: Sequence[str]) -> dict[str, float | None]:
    return dict(zip(names, [None if np.isnan(v) else float(v) for v in curve.at(alpha)[1]]))


def _curve(curve: RateCurve) -> dict[str, list[float]]:
    return {"alpha": curve.alphas.round(4).tolist(), "mean": curve.mean.round(6).tolist()}


def metrics_json(rows: Sequence[StageScores], manifest: DatasetManifest,
                 extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    out["headline"] = list(manifest.headline)
    out["rows"] = []
    names = manifest.joint_names
    for row in rows:
        entry: dict[str, Any] = {
            "name": row.name,
            "headline": {metric: row.metric(metric) for metric in manifest.headline},
            "pcp": row.pcp,
            "pdj@0.1": row.pdj.at(0.1)[0],
            "pdj@0.2": row.pdj.at(0.2)[0],
            "pdj@0.2_per_joint": _per_joint(row.pdj, 0.2, names),
            "pdj_auc": row.pdj.auc,
            "pdj_curve": _curve(row.pdj),
            "pck@0.2": row.pck.at(0.2)[0],
            "pck@0.2_per_joint": _per_joint(row.pck, 0.2, names),
            "pck_curve": _curve(row.pck),
        }
        if row.pckh is not None:
            entry.update({"pckh@0.5": row.pckh.at(0.5)[0],
                          "pckh@0.5_per_joint": _per_joint(row.pckh, 0.5, names),
                          "pckh_curve": _curve(row.pckh)})
        if row.groups:
            entry["pdj_groups"] = {group: {"pdj@0.2": row.pdj.group(joints).at(0.2)[0],
                                           **_curve(row.pdj.group(joints))}
                                   for group, joints in row.groups.items()}
        out["rows"].append(entry)
    return out


def plot_pdj(rows: Sequence[StageScores], path: Path, title: str) -> None:
    """All stages' mean PDJ curves (and the baseline's) in one PNG; beside them the PCKh
    curves where the dataset has head sizes, and each joint group's PDJ curves (FLIC's elbows
    and wrists, as the DeepPose paper plots them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("PDJ", "fraction of torso diameter", lambda row: row.pdj)]
    if rows[0].pckh is not None:
        panels.append(("PCKh", "fraction of head size", lambda row: row.pckh))
    for group, joints in (rows[0].groups or {}).items():
        panels.append((f"PDJ, {group}", "fraction of torso diameter",
                       lambda row, joints=joints: row.pdj.group(joints)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (name, unit, curve_of) in zip(axes[0], panels):
        for row in rows:
            curve = curve_of(row)
            style = "--" if row.name == "mean pose" else "-"
            ax.plot(curve.alphas, curve.mean, style, label=f"{row.name} (AUC {curve.auc:.3f})")
        ax.set_xlabel(f"normalized distance to true joint ({unit})")
        ax.set_ylabel(f"detection rate ({name.split(',')[0]})")
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(printable(title if len(panels) == 1 else f"{title}: {name}"))
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def predictions_json(records: Sequence[PoseRecord], per_stage: Sequence[np.ndarray],
                     joint_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image predictions in image pixels, final stage first-class, every stage kept."""
    out = []
    for n, record in enumerate(records):
        stages = [[[round(float(x), 2), round(float(y), 2)] for x, y in p[n]] for p in per_stage]
        out.append({
            "id": record.id, "image": str(record.image),
            "keypoints": [{"name": name, "x": xy[0], "y": xy[1]}
                          for name, xy in zip(joint_names, stages[-1])],
            "stages": stages,
        })
    return out


@dataclass
class RefinementReport:
    """What one refinement stage did on an index file.

    On the cascade's real predictions: per joint, the fraction of visible joints it moved
    closer to the truth and the fraction it moved farther away. On its own crops (boxes drawn
    from its displacement statistics, and boxes centred on the truth): its error in torso
    diameters beside keeping the box centre (``err_none``), i.e. not refining at all.
    """

    stage: int
    closer: np.ndarray    # (J,)
    farther: np.ndarray   # (J,)
    crops: dict[str, float]  # err, err_none, closer, err_centred, loss; empty unless asked

    def to_json(self, joint_names: Sequence[str]) -> dict[str, Any]:
        return {"stage": self.stage,
                "moved_closer": dict(zip(joint_names, self.closer.round(4).tolist())),
                "moved_farther": dict(zip(joint_names, self.farther.round(4).tolist())),
                "moved_closer_mean": float(self.closer.mean()),
                "moved_farther_mean": float(self.farther.mean()),
                "crops": self.crops}


def refinement_reports(stage_dirs: Sequence[Path | None], cascade,
                       per_stage: Sequence[np.ndarray], records: Sequence[PoseRecord],
                       manifest: DatasetManifest, batch_size: int = 64, on_crops: bool = False,
                       image_cache_gib: float = 2.0) -> list[RefinementReport]:
    """A :class:`RefinementReport` for each stage >= 2 of a cascade; ``stage_dirs`` are the
    run directories of stages 1..S (for each stage's ``displacement.json``), None for a
    stage without one (an exported stage: no crop statistics then).

    How often a stage moved the cascade's joints closer comes from the predictions already
    made, at no cost. With ``on_crops`` each stage is also run on its own simulated boxes and
    on boxes centred on the truth: two more forward passes per visible joint and image (of
    the same order as the cascade itself), so it is asked for, not done by default; each
    image is decoded once (``image_cache_gib``) rather than once per joint."""
    from ..core.cascade import DisplacementStatistics, moved_closer
    from ..data.refinement import RefinementDataset
    from ..data.pipeline import Augmentation, ImageCache
    from ..training.reporting import validation_metrics

    images = ImageCache.of_gib(image_cache_gib) if on_crops else None

    gt = np.stack([r.joints for r in records])
    visible = np.stack([r.visible for r in records])
    reports = []
    for k in range(1, len(cascade)):
        closer, farther = moved_closer(per_stage[k - 1], per_stage[k], gt, visible)
        crops: dict[str, float] = {}
        stats_path = None if stage_dirs[k] is None else Path(stage_dirs[k]) / "displacement.json"
        if on_crops and stats_path is not None and stats_path.is_file():
            stage = cascade[k]
            stats = DisplacementStatistics.from_json(json.loads(stats_path.read_text()))
            recipe_path = Path(stage_dirs[k]) / "recipe.json"
            recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
            crops_set = RefinementDataset(records, stats, stage.sigma, stage.input_size,
                                          manifest.flip_permutation, manifest.torso_diameter,
                                          Augmentation.none(),
                                          sampling=recipe.get("displacement_sampling", "normal"),
                                          images=images)
            crops = {key: float(v) for key, v in
                     validation_metrics(stage.predictor, crops_set, batch_size).items()}
        reports.append(RefinementReport(k + 1, closer, farther, crops))
    return reports


@dataclass
class RunSeen:
    """Which run an evaluation read: the directory's identity and its run.json."""

    identity: tuple[int, int] | None
    meta: bytes


def run_seen(lock, run_dir: Path) -> RunSeen:
    """What :func:`EvaluationOutput.write` compares against: read while ``lock`` (the run's
    :class:`~deeppose_cli.training.rundir.RunReadLock`) is held."""
    try:
        meta = (Path(run_dir) / "run.json").read_bytes()
    except OSError:
        meta = b""
    return RunSeen(lock.identity, meta)


class EvaluationOutput:
    """The files of one evaluation: ``metrics.json``, ``pdj.png`` and ``predictions.json``,
    in ``RUN/eval/`` (``eval_dir`` for a run that must not be written to, such as a packaged
    cascade) unless given elsewhere.

    Entered before anything is computed, it checks that every destination can be written
    (and builds the new ``eval/`` in a hidden directory beside it), so a read-only run or a
    file in the way fails in seconds, not after the evaluation. :meth:`write` replaces
    ``eval/`` as one unit, and only if the run it evaluated is still the one at RUN_DIR.
    """

    NAMES = {"metrics": "metrics.json", "plot": "pdj.png", "predictions": "predictions.json"}

    def __init__(self, run_dir: Path, metrics: Path | None = None, plot: Path | None = None,
                 predictions: Path | None = None, eval_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.eval_dir = Path(eval_dir) if eval_dir is not None else self.run_dir / "eval"
        given = {"metrics": metrics, "plot": plot, "predictions": predictions}
        self.custom = {key: Path(path) for key, path in given.items()
                       if path is not None and Path(path).resolve() != self._default(key).resolve()}
        self.staged: Path | None = None

    def _default(self, key: str) -> Path:
        return self.eval_dir / self.NAMES[key]

    def path(self, key: str) -> Path:
        """Where the file ``key`` ends up."""
        return self.custom.get(key, self._default(key))

    def __enter__(self) -> "EvaluationOutput":
        for path in self.custom.values():
            check_writable(path.parent)
            if path.is_dir():
                raise DeepPoseError(f"cannot write {path}: it is a directory")
        if len(self.custom) < len(self.NAMES):
            self.staged = make_temp_dir(self.eval_dir, "new")
        return self

    def __exit__(self, *exc) -> None:
        if self.staged is not None and self.staged.exists():
            import shutil

            shutil.rmtree(self.staged, ignore_errors=True)

    def write(self, seen: RunSeen, metrics: dict[str, Any], plot: Any,
              predictions: list[dict[str, Any]]) -> None:
        """Write the evaluation: ``plot(path)`` draws the PDJ curves. Refused, writing
        nothing, when the run at RUN_DIR was retrained meanwhile (its ``eval/`` would
        describe a model it does not hold)."""
        from ..training.rundir import RunReadLock

        writers = {"metrics": lambda path: write_json(path, metrics),
                   "plot": plot,
                   "predictions": lambda path: write_json(path, predictions)}
        with RunReadLock(self.run_dir) as lock:
            if run_seen(lock, self.run_dir) != seen:
                raise DeepPoseError(f"{self.run_dir} was replaced (retrained) while it was "
                                    "being evaluated; nothing was written: evaluate it again")
            for key, write in writers.items():
                if key not in self.custom:
                    _write_or_say_why(write, self.staged / self.NAMES[key], self.path(key))
            if self.staged is not None:
                try:
                    replace_directory(self.staged, self.eval_dir)
                except OSError as e:
                    raise DeepPoseError(f"cannot write {self.eval_dir}: "
                                        f"{os_error_reason(e)}") from None
                self.staged = None
        for key, path in self.custom.items():
            _write_or_say_why(writers[key], path, path)


def _write_or_say_why(write, path: Path, shown: Path) -> None:
    """``write(path)``, a refusal of the file system becoming one line about ``shown``."""
    try:
        write(path)
    except WriteError as e:
        raise DeepPoseError(f"cannot write {shown}: {e.reason}") from None
    except OSError as e:
        raise DeepPoseError(f"cannot write {shown}: {os_error_reason(e)}") from None
