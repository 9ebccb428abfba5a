"""`recsys train online`: run one online trainer until SIGTERM / Ctrl-C (start N for N group members)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from core.cli_support import fail


def online(
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Prometheus port on 127.0.0.1 [default: RECSYS_ONLINE_METRICS_PORT]"),
    ] = None,
    group_id: Annotated[str | None, typer.Option(help="consumer group [default: RECSYS_ONLINE_GROUP_ID]")] = None,
    dense: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="dense artifact to start from when the group has no dense weights yet (e.g. the champion's)",
        ),
    ] = None,
    reset_dense: Annotated[
        bool,
        typer.Option(
            "--reset-dense",
            help="write --dense over the group's dense weights (after promoting a batch champion; "
            "start this member alone, the others once it runs)",
        ),
    ] = False,
) -> None:
    """Train continuously on the partitions of the samples topic this process owns in the consumer group."""
    from pydantic import ValidationError

    from core.settings import Settings, describe_error

    if reset_dense and dense is None:
        fail("--reset-dense needs --dense: the dense artifact to write over the group's weights", 2)
    overrides = {k: v for k, v in {"metrics_port": metrics_port, "group_id": group_id}.items() if v is not None}
    try:
        s = Settings().override(online=overrides) if overrides else Settings()
    except ValidationError as exc:
        fail(f"invalid configuration: {describe_error(exc)}", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(s, dense, reset_dense))
    except (RuntimeError, ValueError, OSError) as exc:
        fail(str(exc))


async def _run(s, dense: Path | None, reset_dense: bool) -> None:  # noqa: ANN001 - Settings, imported lazily
    import torch
    from prometheus_client import start_http_server

    from training.online.service import OnlineTrainer, build_learner

    # small batches: more threads mostly contend (measured 1.7k vs 11.5k samples/s with 2 vs 1 on 2 cores)
    torch.set_num_threads(s.online.torch_threads)
    store, learner = build_learner(s, dense, reset_dense)
    trainer = OnlineTrainer(s, store, learner)
    if s.online.metrics_port:
        start_http_server(s.online.metrics_port, addr="127.0.0.1", registry=trainer.metrics.registry)
    trainer.install_signals()
    try:
        await trainer.run()
    finally:
        store.close()
