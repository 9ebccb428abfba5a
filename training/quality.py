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


def eval_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = np.clip(predictions.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    ctr = float(y.mean())
    return {
        "eval_auc": roc_auc(p, y),
        "eval_log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
        "eval_calibration": float(p.mean() / ctr) if ctr > 0 else float("nan"),
        "eval_ctr": ctr,
        "eval_mean_prediction": float(p.mean()),
    }


def oracle_metrics(truth: dict[str, float], sample_ids: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """AUC of the true probabilities on the evaluation samples the truth knows, and their share."""
    known = [i for i, sid in enumerate(sample_ids) if sid in truth]
    if not known:
        return {}
    probs = np.array([truth[sample_ids[i]] for i in known])
    return {"eval_oracle_auc": roc_auc(probs, labels[known]), "eval_oracle_coverage": len(known) / len(sample_ids)}
