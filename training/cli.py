"""`recsys train`: one training job on N ranks, launched with torchrun.

Checks Kafka, the parameter service and MLflow first (a clear message and exit code 1 when
one is unreachable, before any rank starts), then runs ``python -m torch.distributed.run
--nproc-per-node N -m training.worker`` and prints the job's outcome.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any
from unittest.mock import patch

import typer
from rich.console import Console

from core.cli_support import console, fail
from training.online import cli as online_cli
from training.outcome import JobOutcome, JobStatus

app = typer.Typer(invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()

# settings fields the options below override in the ranks' environment
_OVERRIDES = {
    "ranks": "RECSYS_TRAIN_RANKS",
    "epochs": "RECSYS_TRAIN_EPOCHS",
    "batch_size": "RECSYS_TRAIN_BATCH_SIZE",
    "backend": "RECSYS_TRAIN_BACKEND",
    "topic": "RECSYS_TOPIC_SAMPLES",
}


def preflight(settings: Any) -> None:
    """Raise RuntimeError with an actionable message when Kafka, the parameter service or MLflow is unusable."""
    import asyncio

    from core.kafka import KafkaUnavailable, end_offsets
    from training.params import open_training_store, table_configs

    try:
        asyncio.run(end_offsets(settings.kafka, settings.kafka.topic_samples))
    except KafkaUnavailable as exc:
        raise RuntimeError(str(exc)) from None
    try:
        store = open_training_store(settings.ps, table_configs(settings.train.embedding_dim, settings.train.init_std))
        store.version()
        store.close()
    except Exception as exc:  # noqa: BLE001 - ShardUnavailable, TableMismatch, bad URL: all need the same advice
        raise RuntimeError(
            f"the parameter service {settings.ps.shards} is unusable ({type(exc).__name__}: {exc}). "
            "Start it with `recsys ps up` or point RECSYS_PS_SHARDS at running shards."
        ) from None
    check_tracking_uri(settings.mlflow.tracking_uri)


def check_tracking_uri(uri: str) -> None:
    """A cheap reachability check of MLflow (importing mlflow alone takes seconds; rank 0 does the rest)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(
                f"MLflow database folder {folder} cannot be created ({exc}); set RECSYS_MLFLOW_TRACKING_URI"
            ) from None
        if not os.access(folder, os.W_OK):
            raise RuntimeError(f"MLflow database folder {folder} is not writable; set RECSYS_MLFLOW_TRACKING_URI")
    elif uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=5.0)
        except httpx.HTTPError as exc:
            raise RuntimeError(
                f"MLflow at {uri} is unreachable ({type(exc).__name__}: {exc}). Start the tracking "
                "server or point RECSYS_MLFLOW_TRACKING_URI at a running one."
            ) from None


def launch(
    ranks: int,
    env: dict[str, str],
    truth: Path | None = None,
    result_path: Path | None = None,
    capture: bool = False,
    run_name: str | None = None,
    tags: list[str] | None = None,
) -> tuple[int, JobOutcome | None, str]:
    """Run the job under torchrun; returns (exit code, rank 0's outcome or None, captured output).

    ``run_name`` and ``tags`` (``KEY=VALUE``) name and tag the job's MLflow run.
    """
    from core.procs import free_port

    with tempfile.TemporaryDirectory(prefix="recsys-train-") as tmp:
        result = result_path or Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "training.worker",
            "--result",
            str(result),
        ]
        if truth is not None:
            cmd += ["--truth", str(truth)]
        if run_name:
            cmd += ["--run-name", run_name]
        for tag in tags or []:
            cmd += ["--tag", tag]
        proc = subprocess.run(cmd, env=env, text=True, capture_output=capture)
        outcome = JobOutcome.model_validate_json(result.read_text()) if result.exists() else None
        return proc.returncode, outcome, (proc.stdout or "") + (proc.stderr or "")


@app.callback()
def train(
    ctx: typer.Context,
    ranks: Annotated[
        int | None, typer.Option(min=1, max=512, help="torchrun ranks [default: RECSYS_TRAIN_RANKS]")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, max=1000, help="passes over the window")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=1 << 20, help="samples per step and rank")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | gloo | nccl")] = None,
    topic: Annotated[str | None, typer.Option(help="samples topic [default: RECSYS_TOPIC_SAMPLES]")] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSONL of true click probabilities (simulated traffic): logs the oracle AUC of the evaluation set",
        ),
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="name of the job's MLflow run [default: its window, topic@first-last]")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag of the job's MLflow run (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    check: Annotated[bool, typer.Option(help="check Kafka, the parameter service and MLflow first")] = True,
) -> None:
    """Train on the samples that arrived since the last job; push rows, log and register the model.

    `recsys train online` runs the continuous trainer instead (see its --help).
    """
    if ctx.invoked_subcommand is not None:
        return
    from pydantic import ValidationError

    from core.settings import Settings, describe_error

    given = {"ranks": ranks, "epochs": epochs, "batch_size": batch_size, "backend": backend, "topic": topic}
    overrides = {name: value for name, value in given.items() if value is not None}
    if topic is not None and not re.match(r"^[A-Za-z0-9._-]{1,249}$", topic):
        fail(f"invalid topic name {topic!r}: use 1-249 characters of [A-Za-z0-9._-]", 2)
    # the ranks read their settings from the environment: the options become variables there, and this
    # process validates them the same way
    variables = {_OVERRIDES[name]: str(value) for name, value in overrides.items()}
    env = {**os.environ, **variables}
    try:
        # only while validating: the options must not outlive the command in this process (tests invoke it in-process)
        with patch.dict(os.environ, variables):
            settings = Settings()
    except ValidationError as exc:
        fail(f"invalid configuration: {describe_error(exc)}", 2)
    if check:
        try:
            preflight(settings)
        except RuntimeError as exc:
            fail(str(exc))
    env.setdefault("PYTHONWARNINGS", "ignore")  # library deprecation chatter would bury the progress bar
    if truth is None and settings.train.truth_file is not None:
        if settings.train.truth_file.is_file():
            truth = settings.train.truth_file
        else:
            console.print(f"[yellow]RECSYS_TRAIN_TRUTH_FILE {settings.train.truth_file} is no file: no oracle AUC")
    bad = [t for t in tag or [] if "=" not in t or not t.split("=", 1)[0].strip()]
    if bad:
        fail(f"--tag takes KEY=VALUE, got {bad}", 2)
    code, outcome, _ = launch(settings.train.ranks, env, truth, run_name=run_name, tags=tag)
    if outcome is None:
        fail(
            f"the training job died (torchrun exit code {code}) before reporting; see the log above. A job that "
            "dies before its push leaves the parameter service and the recorded offsets unchanged: rerun it to "
            "train the same window."
        )
    if as_json:
        out.print_json(outcome.to_json())
    else:
        _print_outcome(outcome)
    if outcome.status is JobStatus.ERROR or code != 0:
        raise typer.Exit(1)


def _print_outcome(outcome: JobOutcome) -> None:
    if outcome.status is JobStatus.ERROR:
        console.print(f"[red]training failed:[/red] {outcome.message}", soft_wrap=True)
        return
    if outcome.status is not JobStatus.TRAINED:
        out.print(f"{outcome.status}: {outcome.message}", soft_wrap=True)
        return
    # a trained outcome carries every field below (the worker builds it in one place: training.record)
    m, t = outcome.metrics or {}, outcome.timings_s or {}
    pulled, pushed = outcome.rows_pulled or {}, outcome.rows_pushed or {}
    out.print(outcome.summary(), soft_wrap=True)
    out.print(
        f"trained: run {outcome.run_id}, model {outcome.model_name} version {outcome.model_version} (alias challenger)"
    )
    out.print(
        f"parameter service: rows pulled at version {outcome.ps_version_before} ({sum(pulled.values())}), "
        f"{sum(pushed.values())} trained rows staged as {outcome.ps_stage} (served once the model is promoted)"
    )
    offsets = outcome.to_dict().get("offsets", {})
    out.print(f"offsets: {offsets.get('start')} -> {offsets.get('end')}")
    line = (
        f"eval: AUC {m.get('eval_auc', float('nan')):.4f}, log loss {m.get('eval_log_loss', float('nan')):.4f}, "
        f"calibration {m.get('eval_calibration', float('nan')):.3f} on {int(m['eval_samples'])} samples"
    )
    if "eval_oracle_auc" in m:
        line += f"; oracle AUC {m['eval_oracle_auc']:.4f}"
    out.print(line)
    out.print(
        f"throughput: {m['samples_per_s_with_ps']:.0f} samples/s with pull+push "
        f"(pull {t['pull_s']:.2f}s, train {t['train_s']:.2f}s, push {t['push_s']:.2f}s)"
    )


app.command("online")(online_cli.online)


if __name__ == "__main__":  # `python -m training.cli`: the lifecycle runs the job this way (recsys.cli mounts `app`)
    app()
