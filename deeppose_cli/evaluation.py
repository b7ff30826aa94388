"""Evaluating a cascade on an index file: PCP and PDJ per stage beside the mean-pose floor,
the PDJ-curve plot, and per-image predictions in image pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .annotations import PoseRecord
from .files import atomic_write, atomic_write_text
from .geometry import denormalize_pose
from .manifests import DatasetManifest
from .metrics import PDJResult, pcp, pdj


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


def write_json(path: Path, obj: Any) -> None:
    def clean(value):
        if isinstance(value, float) and np.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    atomic_write_text(Path(path), json.dumps(clean(obj), indent=2) + "\n")


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
