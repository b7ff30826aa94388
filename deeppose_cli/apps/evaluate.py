"""Evaluating a cascade on an index file: PCP and PDJ per stage beside the mean-pose floor,
the PDJ-curve plot, and per-image predictions in image pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.records import PoseRecord
from ..core.files import atomic_write
from ..core.geometry import denormalize_pose
from ..core.manifests import DatasetManifest
from ..core.metrics import PDJResult, pcp, pdj


@dataclass
class StageScores:
    name: str           # "mean pose", "stage 1", "stages 1-2", ...
    predictions: np.ndarray  # (N, J, 2) image pixels
    pcp: dict[str, float]
    pdj: PDJResult


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
    return StageScores(name, predictions, pcp(predictions, gt, visible, manifest.limbs),
                       pdj(predictions, gt, visible, manifest.torso_diameter))


def evaluate_predictions(per_stage: Sequence[np.ndarray], mean_pose, records, manifest
                         ) -> list[StageScores]:
    """Rows: the mean-pose baseline, then one per cascade depth."""
    rows = [score("mean pose", mean_pose_predictions(mean_pose, records), records, manifest)]
    rows += [score(stage_label(k), p, records, manifest) for k, p in enumerate(per_stage, 1)]
    return rows


def metrics_json(rows: Sequence[StageScores], manifest: DatasetManifest,
                 extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    out["rows"] = []
    for row in rows:
        mean02, per_joint02 = row.pdj.at(0.2)
        out["rows"].append({
            "name": row.name,
            "pcp": row.pcp,
            "pdj@0.1": row.pdj.at(0.1)[0],
            "pdj@0.2": mean02,
            "pdj@0.2_per_joint": dict(zip(manifest.joint_names,
                                          [None if np.isnan(v) else float(v) for v in per_joint02])),
            "pdj_auc": row.pdj.auc,
            "pdj_curve": {"alpha": row.pdj.alphas.round(4).tolist(),
                          "mean": row.pdj.mean.round(6).tolist()},
        })
    return out


def plot_pdj(rows: Sequence[StageScores], path: Path, title: str) -> None:
    """All stages' mean PDJ curves (and the baseline's) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        style = "--" if row.name == "mean pose" else "-"
        ax.plot(row.pdj.alphas, row.pdj.mean, style, label=f"{row.name} (AUC {row.pdj.auc:.3f})")
    ax.set_xlabel("normalized distance to true joint (fraction of torso diameter)")
    ax.set_ylabel("detection rate (PDJ)")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
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
    crops: dict[str, float]  # err, err_none, closer, err_centred, loss; empty without statistics

    def to_json(self, joint_names: Sequence[str]) -> dict[str, Any]:
        return {"stage": self.stage,
                "moved_closer": dict(zip(joint_names, self.closer.round(4).tolist())),
                "moved_farther": dict(zip(joint_names, self.farther.round(4).tolist())),
                "moved_closer_mean": float(self.closer.mean()),
                "moved_farther_mean": float(self.farther.mean()),
                "crops": self.crops}


def refinement_reports(stage_dirs: Sequence[Path | None], cascade,
                       per_stage: Sequence[np.ndarray], records: Sequence[PoseRecord],
                       manifest: DatasetManifest, batch_size: int = 64
                       ) -> list[RefinementReport]:
    """A :class:`RefinementReport` for each stage >= 2 of a cascade; ``stage_dirs`` are the
    run directories of stages 1..S (for each stage's ``displacement.json``), None for a
    stage without one (an exported stage: no crop statistics then)."""
    from ..core.cascade import DisplacementStatistics, moved_closer
    from ..data.refinement import RefinementDataset
    from ..data.pipeline import Augmentation
    from ..training.reporting import validation_metrics

    gt = np.stack([r.joints for r in records])
    visible = np.stack([r.visible for r in records])
    reports = []
    for k in range(1, len(cascade)):
        closer, farther = moved_closer(per_stage[k - 1], per_stage[k], gt, visible)
        crops: dict[str, float] = {}
        stats_path = None if stage_dirs[k] is None else Path(stage_dirs[k]) / "displacement.json"
        if stats_path is not None and stats_path.is_file():
            stage = cascade[k]
            stats = DisplacementStatistics.from_json(json.loads(stats_path.read_text()))
            recipe_path = Path(stage_dirs[k]) / "recipe.json"
            recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
            crops_set = RefinementDataset(records, stats, stage.sigma, stage.input_size,
                                          manifest.flip_permutation, manifest.torso_diameter,
                                          Augmentation.none(),
                                          sampling=recipe.get("displacement_sampling", "normal"))
            crops = {key: float(v) for key, v in
                     validation_metrics(stage.predictor, crops_set, batch_size).items()}
        reports.append(RefinementReport(k + 1, closer, farther, crops))
    return reports
