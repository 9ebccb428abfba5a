"""The promotion gate: a challenger becomes champion unless it is worse on the same evaluation set.

Both AUCs come from one evaluation set: the challenger's held-out window. The challenger's
own AUC is the trainer's ``eval_auc`` metric on its run; the champion's AUC on that same set
is logged on the challenger's run by the evaluate task as ``champion_eval_auc``, together with
the tag ``recsys_champion_version`` naming the champion version it scored. The gate refuses to
compare numbers from different evaluation sets or from a champion that changed meanwhile.

Promotion moves the MLflow registry alias ``champion`` (idempotent: moving it to the version
it already points at changes nothing) and tags the versions ``role=champion`` / ``role=retired``.

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

CHAMPION = "champion"
CHALLENGER_METRIC = "eval_auc"
CHAMPION_METRIC = "champion_eval_auc"
# the challenger scored beside the champion (same evaluation set, same parameter rows); preferred
# over the trainer's own eval_auc when present
SAME_ROWS_METRIC = "challenger_eval_auc_same_rows"
TAG_CHAMPION_VERSION = "recsys_champion_version"
TAG_GATE = "recsys_gate"

log = logging.getLogger(__name__)


class GateError(LifecycleError):
    """The gate cannot decide (missing metric, evaluation of another champion, unknown version)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_version: str
    challenger_auc: float
    champion_version: str | None
    champion_auc: float | None
    tolerance: float

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


def client_for(tracking_uri: str) -> Any:
    """An MlflowClient of the tracking server and registry at ``tracking_uri`` (mlflow imported here)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def champion_version(client: Any, model_name: str) -> str | None:
    """The version the ``champion`` alias points at, None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


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

    ``challenger_auc``: the challenger scored in the same pass (same rows), when the caller has it.
    """
    run_id = client.get_model_version(model_name, challenger_version).run_id
    client.log_metric(run_id, CHAMPION_METRIC, float(auc))
    if challenger_auc is not None:
        client.log_metric(run_id, SAME_ROWS_METRIC, float(challenger_auc))
    client.set_tag(run_id, TAG_CHAMPION_VERSION, str(champion))


def evaluate_gate(client: Any, model_name: str, challenger_version: str, tolerance: float) -> Decision:
    """Read both AUCs from MLflow and decide; raises GateError when they are missing or do not match."""
    version = client.get_model_version(model_name, str(challenger_version))
    if not version.run_id:
        raise GateError(f"{model_name} version {challenger_version} has no MLflow run to read its AUC from")
    challenger_auc = _metric(client, version.run_id, CHALLENGER_METRIC)
    if challenger_auc is None:
        raise GateError(f"run {version.run_id} of {model_name} v{challenger_version} has no {CHALLENGER_METRIC}")
    champion = champion_version(client, model_name)
    champion_auc = None
    if champion is not None and champion != str(challenger_version):
        tags = client.get_run(version.run_id).data.tags
        scored = tags.get(TAG_CHAMPION_VERSION)
        champion_auc = _metric(client, version.run_id, CHAMPION_METRIC)
        if scored == champion:
            same_rows = _metric(client, version.run_id, SAME_ROWS_METRIC)
            challenger_auc = challenger_auc if same_rows is None else same_rows
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
        if previous is not None:
            client.set_model_version_tag(model_name, previous, "role", "retired")
    return True


# --------------------------------------------------------------------------- the lifecycle's steps


def gate_challenger(s: Settings, model_version: str, tolerance: float) -> Decision:
    """The gate's verdict on the challenger, recorded as its version tag ``recsys_gate``; no alias moves here."""
    client = client_for(s.mlflow.tracking_uri)
    decision = evaluate_gate(client, s.train.model_name, str(model_version), tolerance)
    client.set_model_version_tag(
        s.train.model_name, str(model_version), TAG_GATE, "passed" if decision.promote else "refused"
    )
    log.info("gate: %s -> %s", decision.reason, "promote" if decision.promote else "refuse")
    return decision


def promote_challenger(s: Settings, decision: Decision) -> dict[str, Any]:
    """Move the ``champion`` alias to a challenger that passed the gate (idempotent)."""
    client = client_for(s.mlflow.tracking_uri)
    promoted = promote(client, s.train.model_name, decision)
    return {"champion": champion_version(client, s.train.model_name), "promoted": promoted}
