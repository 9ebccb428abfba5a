"""The promotion gate: a challenger becomes champion unless it is worse on the same evaluation set.

Both AUCs come from one evaluation set: the challenger's held-out window. The challenger's
own AUC is the trainer's ``eval_auc`` metric on its run; the champion's AUC on that same set
is logged on the challenger's run by the evaluate task as ``champion_eval_auc``, together with
the tag ``recsys_champion_version`` naming the champion version it scored. The gate refuses to
compare numbers from different evaluation sets or from a champion that changed meanwhile.

Promotion moves the MLflow registry alias ``champion`` (idempotent: moving it to the version
it already points at changes nothing) and tags the versions ``role=champion`` / ``role=retired``.

The rows move with the alias (``training.lifecycle.served``): a job's rows stay staged until
``promote_challenger`` copies them into the parameter service, before the alias moves; a
refused challenger's staged rows are dropped, so it changes no served score.

A challenger whose evaluation set is *not evaluable* (one class, or fewer clicks or non-clicks
than ``RECSYS_GATE_MIN_EVAL_POSITIVES`` / ``_NEGATIVES``: the trainer tags its run
``eval_status=not_evaluable`` with an ``eval_reason`` and logs no ``eval_auc``) is refused with
that reason, never compared. A refused challenger's run is marked ``recsys_window=carried``: the
next job trains on its window again (``training.tracking.Tracking.window_start``).

The functions of a client take an ``MlflowClient``; ``gate_challenger`` and ``promote_challenger``
are the lifecycle's steps, on the settings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from core.settings import Settings
from training.lifecycle import LifecycleError
from training.lifecycle.registry import CHAMPION, champion_version, client_for
from training.quality import NOT_EVALUABLE, not_evaluable_reason
from training.tracking import TAG_EVAL_REASON, TAG_EVAL_STATUS, carry_window

CHALLENGER_METRIC = "eval_auc"
CHAMPION_METRIC = "champion_eval_auc"
# the challenger scored beside the champion (same evaluation set, same code path, each with its rows); preferred
# over the trainer's own eval_auc when present
RESCORED_METRIC = "challenger_eval_auc_rescored"
TAG_CHAMPION_VERSION = "recsys_champion_version"
TAG_GATE = "recsys_gate"
TAG_GATE_REASON = "recsys_gate_reason"  # on the challenger's run, when refused

log = logging.getLogger(__name__)


class GateError(LifecycleError):
    """The gate cannot decide (missing metric, evaluation of another champion, unknown version)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_version: str
    challenger_auc: float | None  # None: not evaluable
    champion_version: str | None
    champion_auc: float | None
    tolerance: float
    evaluable: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(challenger_auc: float, champion_auc: float | None, tolerance: float) -> tuple[bool, str]:
    """Pure rule: promote unless the challenger is worse than the champion by more than ``tolerance``."""
    for name, value in (("challenger", challenger_auc), ("champion", champion_auc)):
        if value is not None and (not math.isfinite(value) or not 0.0 <= value <= 1.0):
            raise GateError(f"{name} AUC must be a number in [0, 1], got {value!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise GateError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if champion_auc is None:
        return True, "no champion yet"
    margin = challenger_auc - champion_auc
    if margin < -tolerance:
        return False, (
            f"challenger AUC {challenger_auc:.4f} is worse than champion AUC {champion_auc:.4f} "
            f"by {-margin:.4f} > tolerance {tolerance:.4f}"
        )
    return True, (
        f"challenger AUC {challenger_auc:.4f} vs champion AUC {champion_auc:.4f} "
        f"(difference {margin:+.4f}, tolerance {tolerance:.4f})"
    )


def _metric(client: Any, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return None if value is None else float(value)


def record_champion_score(
    client: Any,
    model_name: str,
    challenger_version: str,
    champion: str,
    auc: float,
    challenger_auc: float | None = None,
) -> None:
    """Log the champion's AUC on the challenger's evaluation set to the challenger's run (idempotent).

    ``challenger_auc``: the challenger scored in the same pass, when the caller has it.
    """
    run_id = client.get_model_version(model_name, challenger_version).run_id
    client.log_metric(run_id, CHAMPION_METRIC, float(auc))
    if challenger_auc is not None:
        client.log_metric(run_id, RESCORED_METRIC, float(challenger_auc))
    client.set_tag(run_id, TAG_CHAMPION_VERSION, str(champion))


def not_evaluable(run: Any, min_positives: int = 1, min_negatives: int = 1) -> str | None:
    """Why the challenger run's evaluation set gives no AUC to compare; None when it does.

    The trainer's tag says so; a run of an older trainer may hold a NaN ``eval_auc`` instead,
    and the class counts it logged are checked against the minimums in force now.
    """
    tags, metrics = run.data.tags, run.data.metrics
    if tags.get(TAG_EVAL_STATUS) == NOT_EVALUABLE:
        return tags.get(TAG_EVAL_REASON) or "the trainer found the evaluation set not evaluable"
    auc = metrics.get(CHALLENGER_METRIC)
    if auc is not None and not math.isfinite(auc):
        return f"{CHALLENGER_METRIC} is {auc} (one class in the evaluation set?)"
    if "eval_positives" in metrics and "eval_negatives" in metrics:
        positives, negatives = int(metrics["eval_positives"]), int(metrics["eval_negatives"])
        return not_evaluable_reason(positives, negatives, min_positives, min_negatives)
    return None


def evaluate_gate(
    client: Any,
    model_name: str,
    challenger_version: str,
    tolerance: float,
    min_positives: int = 1,
    min_negatives: int = 1,
) -> Decision:
    """Read both AUCs from MLflow and decide; raises GateError when they are missing or do not match.

    A not evaluable challenger is a decision (refused, ``evaluable=False``), not an error.
    """
    version = client.get_model_version(model_name, str(challenger_version))
    if not version.run_id:
        raise GateError(f"{model_name} version {challenger_version} has no MLflow run to read its AUC from")
    champion = champion_version(client, model_name)
    unfit = not_evaluable(client.get_run(version.run_id), min_positives, min_negatives)
    if unfit is not None and champion != str(challenger_version):
        return Decision(
            False, f"not evaluable: {unfit}", str(challenger_version), None, champion, None, tolerance, False
        )
    challenger_auc = _metric(client, version.run_id, CHALLENGER_METRIC)
    if challenger_auc is None:
        raise GateError(f"run {version.run_id} of {model_name} v{challenger_version} has no {CHALLENGER_METRIC}")
    champion_auc = None
    if champion is not None and champion != str(challenger_version):
        tags = client.get_run(version.run_id).data.tags
        scored = tags.get(TAG_CHAMPION_VERSION)
        champion_auc = _metric(client, version.run_id, CHAMPION_METRIC)
        if scored == champion:
            rescored = _metric(client, version.run_id, RESCORED_METRIC)
            challenger_auc = challenger_auc if rescored is None else rescored
        if scored != champion or champion_auc is None:
            raise GateError(
                f"the champion (v{champion}) has no AUC on the evaluation set of v{challenger_version} "
                f"(scored: {scored or 'none'}); run the evaluate task first"
            )
    if champion == str(challenger_version):
        return Decision(
            True, "already champion", str(challenger_version), challenger_auc, champion, challenger_auc, tolerance
        )
    promote, reason = decide(challenger_auc, champion_auc, tolerance)
    return Decision(promote, reason, str(challenger_version), challenger_auc, champion, champion_auc, tolerance)


def promote(client: Any, model_name: str, decision: Decision) -> bool:
    """Move ``champion`` to the challenger when the decision says so; returns whether it points there now."""
    version = decision.challenger_version
    client.set_model_version_tag(model_name, version, TAG_GATE, "promoted" if decision.promote else "refused")
    if not decision.promote:
        return False
    previous = champion_version(client, model_name)
    if previous != version:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        client.set_model_version_tag(model_name, version, "role", CHAMPION)
        _describe(client, model_name, version, f"Champion since {_now()}, replacing {_v(previous)}.")
        if previous is not None:
            client.set_model_version_tag(model_name, previous, "role", "retired")
            _describe(client, model_name, previous, f"Retired {_now()}: v{version} is the champion.")
    return True


def _v(version: str | None) -> str:
    return f"v{version}" if version is not None else "no earlier champion"


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _describe(client: Any, model_name: str, version: str, line: str) -> None:
    """Add a line to the model version's description (the model page shows it): the verdicts in order.

    The same line twice (a retried task) is kept once.
    """
    current = client.get_model_version(model_name, version).description or ""
    if line in current.splitlines():
        return
    client.update_model_version(model_name, version, description=f"{current}\n{line}".strip()[:5000])


# --------------------------------------------------------------------------- the lifecycle's steps


def gate_challenger(s: Settings, model_version: str, tolerance: float) -> Decision:
    """The gate's verdict on the challenger, recorded as its version tag ``recsys_gate``; no alias moves here.

    A refused (or not evaluable) challenger's window is carried: the next job trains on it again.
    """
    client = client_for(s.mlflow)
    name = s.train.model_name
    decision = evaluate_gate(
        client, name, str(model_version), tolerance, s.gate.min_eval_positives, s.gate.min_eval_negatives
    )
    verdict = "passed" if decision.promote else ("refused" if decision.evaluable else NOT_EVALUABLE)
    client.set_model_version_tag(name, str(model_version), TAG_GATE, verdict)
    _describe(client, name, str(model_version), f"Gate: **{verdict}** — {decision.reason}")
    if not decision.promote:
        from training.lifecycle.served import drop_rows

        run_id = client.get_model_version(name, str(model_version)).run_id
        client.set_tag(run_id, TAG_GATE_REASON, decision.reason[:5000])
        carry_window(client, run_id, f"gate: {decision.reason}")
        drop_rows(s, client, str(model_version))
    log.info("gate: %s v%s — %s", "promote" if decision.promote else "refuse", model_version, decision.reason)
    return decision


def promote_challenger(s: Settings, decision: Decision) -> dict[str, Any]:
    """Promote a challenger that passed the gate: its rows into the parameter service, then the alias (idempotent).

    Returns ``{"champion", "promoted", "ps_version"}``: ``ps_version`` is the parameter version
    holding the champion's rows, the one publication waits for on every replica.
    """
    from training.lifecycle.served import promote_rows, served_version

    client = client_for(s.mlflow)
    name = s.train.model_name
    if decision.promote:
        previous = champion_version(client, name)
        promote_rows(
            s, client, decision.challenger_version, previous if previous != decision.challenger_version else None
        )
    promoted = promote(client, name, decision)
    champion = champion_version(client, name)
    return {"champion": champion, "promoted": promoted, "ps_version": served_version(client, name, champion)}
