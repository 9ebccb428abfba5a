"""Whether to train, and a training job run once per orchestrator run.

The job itself is `recsys train` (``training.cli``: torchrun over ``training.worker``), run
as a subprocess so that its ranks, their memory and a crash stay out of the caller. Its
outcome is kept in a file named after the orchestrator's run, so a retried step returns the
finished job's outcome instead of training the next window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.settings import PROJECT_ROOT, Settings
from training.lifecycle import LifecycleError
from training.outcome import JobOutcome, JobStatus

log = logging.getLogger(__name__)
_PROGRESS = re.compile(r"^(.*?):\s+\d+%\|")  # a tqdm frame: "train 1 rank:  38%|███▊ | 1.02k/2.70k ..."
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # "path.py:12: DeprecationWarning: ..." (warnings.showwarning)


def _last_offsets(s: Settings) -> dict[int, int]:
    """End offsets of the newest committed training job (recorded by the trainer on its MLflow run)."""
    from training.tracking import Tracking

    offsets, _run = Tracking(s.mlflow, s.train.experiment).last_offsets(s.kafka.topic_samples)
    return offsets


def count_new_samples(s: Settings) -> dict[str, Any]:
    """Records on the samples topic that no committed training job has consumed yet.

    ``{"topic", "new", "start": {partition: offset}, "end": {partition: offset}}`` (partitions as strings).
    """
    from core.kafka import KafkaUnavailable, end_offsets

    try:
        end = asyncio.run(end_offsets(s.kafka, s.kafka.topic_samples))
    except KafkaUnavailable as exc:
        raise LifecycleError(str(exc)) from None
    start = _last_offsets(s)
    new = sum(max(0, offset - start.get(partition, 0)) for partition, offset in end.items())
    return {
        "topic": s.kafka.topic_samples,
        "new": new,
        "start": {str(p): o for p, o in start.items()},
        "end": {str(p): o for p, o in end.items()},
    }


def train_once(
    run_key: str,
    ranks: int,
    epochs: int,
    outcome_dir: Path,
    timeout_s: float = 6 * 3600,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> JobOutcome:
    """Run `recsys train` once per ``run_key``: a retry after a settled job returns that job's outcome.

    The job reads the RECSYS_* settings of this process's environment; ``ranks`` and ``epochs``
    override two of them for this run. ``run_name`` and ``tags`` name and tag its MLflow run.
    The job's own output is logged after its outcome, condensed (``condensed_output``); in full
    when it failed.
    """
    outcome_dir.mkdir(parents=True, exist_ok=True)
    result = outcome_dir / f"{_safe(run_key)}.json"
    if result.exists():
        previous = JobOutcome.model_validate_json(result.read_text())
        if previous.status.settled:
            log.info("training of %s already done (%s), not training again", run_key, previous.status)
            return previous
    cmd = [sys.executable, "-m", "training.cli", "--ranks", str(ranks), "--epochs", str(epochs), "--json"]
    if run_name:
        cmd += ["--run-name", run_name]
    for key, value in (tags or {}).items():
        cmd += ["--tag", f"{key}={value}"]
    log.info("running %s", " ".join(cmd))
    # libraries' deprecation warnings are for their users' developers, not for an operator's task log
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, timeout=timeout_s, capture_output=True, text=True, env=env)
    outcome = _parse_outcome(done.stdout)
    if done.returncode != 0 or outcome is None:
        log.error("recsys train output:\n%s", done.stderr[-20000:])
        reason = outcome.message if outcome else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LifecycleError(f"`recsys train` exited with {done.returncode}: {reason}")
    log.info("%s", outcome.summary())
    log.info("recsys train output (condensed):\n%s", condensed_output(done.stderr))
    tmp = result.with_suffix(".tmp")
    tmp.write_text(outcome.to_json())
    tmp.rename(result)  # the outcome that makes a retry of this run a no-op
    return outcome


def condensed_output(text: str, max_lines: int = 60) -> str:
    """A job's output as a log shows it well: a progress bar's last frame only, no warnings, the last lines.

    A progress bar redraws itself with carriage returns: a log keeps every frame on one line.
    """
    lines: list[str] = []
    skip_source = False
    for raw in text.split("\n"):  # not splitlines(): it splits at the progress bar's carriage returns too
        line = raw.rsplit("\r", 1)[-1].rstrip()
        if skip_source and line.startswith("  "):
            continue  # the source line Python prints under a warning
        skip_source = bool(_WARNING.match(line))
        if skip_source or not line.strip():
            continue
        bar = _PROGRESS.match(line)
        if bar and lines and (previous := _PROGRESS.match(lines[-1])) and previous.group(1) == bar.group(1):
            lines[-1] = line  # the same bar drawn again (frames on separate lines): its last frame only
            continue
        lines.append(line)
    dropped = len(lines) - max_lines
    return "\n".join(([f"... ({dropped} earlier lines)"] if dropped > 0 else []) + lines[-max_lines:])


def _parse_outcome(stdout: str) -> JobOutcome | None:
    """The outcome `recsys train --json` printed last (its output may start with other lines)."""
    text = stdout.strip()
    if "{" not in text:
        return None
    try:
        return JobOutcome.model_validate(json.loads(text[text.index("{") :]))
    except json.JSONDecodeError:
        return None
    except ValidationError as exc:  # a trained outcome without its model version, an unknown status
        raise LifecycleError(f"`recsys train` reported an outcome that does not parse: {exc}") from None


def trained_model(outcome: JobOutcome) -> dict[str, Any]:
    """What the steps after training need of a trained job (JSON-compatible, for an orchestrator's XCom)."""
    if outcome.status is not JobStatus.TRAINED:
        raise LifecycleError(f"nothing trained: {outcome.message or outcome.status}")
    return outcome.model_dump(include={"run_id", "model_name", "model_version", "ps_stage", "ps_version_before"})


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:200]
