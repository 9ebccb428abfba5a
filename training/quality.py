"""How good a job's model is on its evaluation set: the metrics rank 0 logs to the job's run.

``eval_*`` compare the predictions with the clicks; with simulated traffic, the true click
probabilities (``--truth``) give the oracle AUC the model's AUC is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.metrics import roc_auc
from training.outcome import JobFailed


def load_truth(path: Path) -> dict[str, float]:
    """sample id -> true click probability, from `recsys simulate --truth` or traffic.synthetic.write_truth."""
    import orjson

    from feature_repo.contract import sample_id

    truth: dict[str, float] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                sid = row.get("sample_id") or sample_id(row["request_id"], row["item_id"])
                truth[sid] = float(row["probability"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise JobFailed(f"truth file {path}, line {number}: {type(exc).__name__}: {exc}") from None
    return truth


NOT_EVALUABLE = "not_evaluable"
EVALUATED = "evaluated"


def not_evaluable_reason(positives: int, negatives: int, min_positives: int, min_negatives: int) -> str | None:
    """Why an evaluation set of these class counts gives no AUC worth comparing; None when it does.

    One class gives no AUC at all (NaN); a few clicks give one that moves by more than the
    gate's tolerance when one sample changes sides.
    """
    if positives < min_positives or negatives < min_negatives:
        return (
            f"evaluation set has {positives} clicks and {negatives} non-clicks; "
            f"an AUC needs at least {min_positives} and {min_negatives} (RECSYS_GATE_MIN_EVAL_POSITIVES/_NEGATIVES)"
        )
    return None


def eval_metrics(
    predictions: np.ndarray, labels: np.ndarray, min_positives: int = 1, min_negatives: int = 1
) -> tuple[dict[str, float], str | None]:
    """Finite metrics of the evaluation set, and the reason it is not evaluable (None when it is).

    Never NaN: MLflow stores a NaN metric but its UI and searches hide it, and Airflow cannot
    return one from a task. A set below the minimum counts gets no AUC (and no calibration
    without clicks); ``eval_positives`` / ``eval_negatives`` always say what it held.
    """
    p = np.clip(predictions.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    positives = int((y > 0.5).sum())
    negatives = int(len(y) - positives)
    metrics = {"eval_positives": float(positives), "eval_negatives": float(negatives)}
    if len(y) == 0:
        return metrics, "empty evaluation set"
    ctr = float(y.mean())
    metrics.update(
        {
            "eval_log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
            "eval_ctr": ctr,
            "eval_mean_prediction": float(p.mean()),
        }
    )
    if ctr > 0:
        metrics["eval_calibration"] = float(p.mean() / ctr)
    reason = not_evaluable_reason(positives, negatives, min_positives, min_negatives)
    if reason is None:
        metrics["eval_auc"] = roc_auc(p, y)
    return metrics, reason


def oracle_metrics(truth: dict[str, float], sample_ids: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """AUC of the true probabilities on the evaluation samples the truth knows, and their share."""
    known = [i for i, sid in enumerate(sample_ids) if sid in truth]
    if not known:
        return {}
    probs = np.array([truth[sample_ids[i]] for i in known])
    found = {"eval_oracle_coverage": len(known) / len(sample_ids)}
    auc = roc_auc(probs, labels[known])
    if np.isfinite(auc):  # one class among the known samples: no oracle AUC, rather than a NaN metric
        found["eval_oracle_auc"] = auc
    return found
