"""The rows half of the served state: a job's staged rows are promoted with its model, or dropped.

A served state is a dense part (an MLflow model version) plus the parameter rows it was
trained with, and the two move together:

- a job stages its rows (``training.params.job_stage``); the parameter service's rows, and
  so every inference replica, stay the champion's while the gate decides;
- ``promote_rows`` copies a passing challenger's rows in as one version (the rows they
  replace are kept in an undo area) and tags the model version ``ps_version`` with it,
  before the registry alias moves; serving swaps the dense part once its replica holds it;
- ``drop_rows`` deletes a refused challenger's stage: no served score changes, and the next
  job pulls the champion's rows;
- ``rollback`` returns the previous champion: its dense part (the alias) and its rows (the
  undo area of the promotion being undone), both exactly.

Every step is idempotent (tags on the model version say what is done), so an orchestrator may
retry it.
"""

from __future__ import annotations

import logging
from typing import Any

from core.redact import redact_urls
from core.settings import Settings
from training.lifecycle import LifecycleError
from training.lifecycle.registry import CHAMPION, champion_version, client_for

log = logging.getLogger(__name__)

TAG_PS_VERSION = "ps_version"  # the parameter-service version holding the model's rows (set at promotion)
TAG_PS_STAGE = "ps_stage"  # where the job staged its rows (set by the trainer)
TAG_PS_PULLED = "ps_version_pulled"  # the version the job pulled its rows at (set by the trainer)
TAG_PS_UNDO = "ps_undo_stage"  # the rows its promotion replaced: what a rollback restores
TAG_PS_DROPPED = "ps_stage_dropped"
TAG_PREVIOUS = "recsys_previous_champion"
ROLLED_BACK = "rolled_back"


def _open(s: Settings) -> Any:
    from paramserver import open_store

    return open_store("redis", [], s.ps)  # the tables recorded in the store: the job declared them


def undo_stage(model_name: str, model_version: str) -> str:
    """The staging area of the rows that promoting ``model_version`` replaced."""
    return f"undo-{model_name}-v{model_version}"[:120]


def promote_rows(s: Settings, client: Any, model_version: str, previous_champion: str | None) -> int:
    """Copy the challenger's staged rows into the parameter service; returns the version that holds them.

    Idempotent: a version tagged ``ps_version`` already is not promoted again. Raises
    LifecycleError when the rows are gone (dropped, or the store was reset) or changed since
    the job pulled them: the model cannot be served with the rows it was trained with.
    """
    from paramserver import Conflict
    from paramserver.staging import NothingStaged, promote_stage

    name = s.train.model_name
    tags = client.get_model_version(name, model_version).tags
    if TAG_PS_VERSION in tags:
        return int(tags[TAG_PS_VERSION])
    stage = tags.get(TAG_PS_STAGE)
    if not stage:
        raise LifecycleError(f"{name} v{model_version} names no staged rows (tag {TAG_PS_STAGE}): retrain it")
    pulled = tags.get(TAG_PS_PULLED)
    undo = undo_stage(name, model_version)
    store = _open(s)
    try:
        done = promote_stage(store, stage, undo=undo, unchanged_since=int(pulled) if pulled else None)
        _prune_undo(s, client, store, keep=undo)
    except NothingStaged as exc:
        raise LifecycleError(f"{name} v{model_version}: its rows are not staged any more ({exc})") from None
    except Conflict as exc:
        raise LifecycleError(
            f"{name} v{model_version}: rows it trained changed in the parameter service since it pulled them "
            f"at version {pulled} ({exc}); retrain on top of the current champion"
        ) from None
    finally:
        store.close()
    client.set_model_version_tag(name, model_version, TAG_PS_VERSION, str(done.version))
    client.set_model_version_tag(name, model_version, TAG_PS_UNDO, undo)
    if previous_champion is not None:
        client.set_model_version_tag(name, model_version, TAG_PREVIOUS, previous_champion)
    log.info("promoted the rows of %s v%s as parameter version %d: %s", name, model_version, done.version, done.rows)
    return done.version


def drop_rows(s: Settings, client: Any, model_version: str) -> bool:
    """Delete a refused challenger's staged rows; False when there were none (dropped before, or never staged)."""
    name = s.train.model_name
    stage = client.get_model_version(name, model_version).tags.get(TAG_PS_STAGE)
    if not stage:
        return False
    store = _open(s)
    try:
        dropped = store.drop_stage(stage)
    finally:
        store.close()
    client.set_model_version_tag(name, model_version, TAG_PS_DROPPED, "true")
    return dropped


def _prune_undo(s: Settings, client: Any, store: Any, keep: str) -> None:
    """Keep the undo areas of the last ``s.gate.rollback_depth`` promotions (and ``keep``), drop older ones."""
    name = s.train.model_name
    wanted = {keep}
    version = champion_version(client, name)
    for _ in range(max(0, s.gate.rollback_depth - 1)):
        if version is None:
            break
        tags = client.get_model_version(name, str(version)).tags
        if TAG_PS_UNDO in tags:
            wanted.add(tags[TAG_PS_UNDO])
        version = tags.get(TAG_PREVIOUS)
    for stage in store.stages():
        if stage.startswith(f"undo-{name}-") and stage not in wanted:
            store.drop_stage(stage)
    if s.gate.rollback_depth == 0:
        store.drop_stage(keep)


def rollback(s: Settings) -> dict[str, Any]:
    """Make the previous champion the champion again: its dense part and its rows, exactly.

    The rows the current champion's promotion replaced are promoted back (that promotion keeps
    an undo area of its own), the alias moves to the previous version, whose ``ps_version``
    becomes the version now holding its rows. Returns ``{"champion", "rolled_back", "ps_version"}``.
    """
    from paramserver.staging import NothingStaged, promote_stage

    client = client_for(s.mlflow)
    name = s.train.model_name
    current = champion_version(client, name)
    if current is None:
        raise LifecycleError(f"{name} has no champion to roll back")
    tags = client.get_model_version(name, current).tags
    previous, undo = tags.get(TAG_PREVIOUS), tags.get(TAG_PS_UNDO)
    if previous is None:
        raise LifecycleError(f"{name} v{current} was the first champion: there is nothing to roll back to")
    if not undo:
        raise LifecycleError(f"{name} v{current} kept no undo rows (promoted before rows were staged?)")
    store = _open(s)
    try:
        done = promote_stage(store, undo, undo=undo_stage(name, f"{current}-rolled-back"))
    except NothingStaged as exc:
        raise LifecycleError(
            f"the rows {name} v{current} replaced are gone ({exc}): older than RECSYS_GATE_ROLLBACK_DEPTH promotions"
        ) from None
    finally:
        store.close()
    client.set_model_version_tag(name, previous, TAG_PS_VERSION, str(done.version))
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, previous, "role", CHAMPION)
    client.set_model_version_tag(name, current, "role", ROLLED_BACK)
    log.info("rolled back %s v%s -> v%s (rows at parameter version %d)", name, current, previous, done.version)
    return {"champion": previous, "rolled_back": current, "ps_version": done.version}


def describe(s: Settings) -> dict[str, Any]:
    """The champion, its rows' parameter version, the version a rollback returns to, the staging areas."""
    from paramserver import ParamServerError

    client = client_for(s.mlflow)
    name = s.train.model_name
    champion = champion_version(client, name)
    tags = client.get_model_version(name, champion).tags if champion is not None else {}
    try:
        store = _open(s)
        try:
            stages = store.stages()
        finally:
            store.close()
    except ParamServerError as exc:
        raise LifecycleError(f"the parameter service {redact_urls(s.ps.shards)} is unusable: {exc}") from None
    return {
        "model": name,
        "champion": champion,
        "ps_version": int(tags[TAG_PS_VERSION]) if TAG_PS_VERSION in tags else None,
        "previous": tags.get(TAG_PREVIOUS),
        "undo_stage": tags.get(TAG_PS_UNDO),
        "stages": stages,
    }


def served_version(client: Any, model_name: str, model_version: str | None) -> int | None:
    """The parameter version holding the rows of ``model_version`` (None: not promoted, or no version)."""
    if model_version is None:
        return None
    value = client.get_model_version(model_name, model_version).tags.get(TAG_PS_VERSION)
    return int(value) if value is not None else None
