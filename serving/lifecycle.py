"""Start-up and shut-down of one app (its lifespan): everything that runs besides the requests.

Start-up builds the components (unless a test passed them), loads the first model (a failure
is logged and shown by /readyz, the server starts anyway), starts the row-version poll, the
impression logger, the events follower of the retrieval stage, the model poll and (where online
trainers may run) the poll of their dense weights, then
publishes them as ``state.running``. Shut-down stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.concurrency import run_in_threadpool

from core.settings import Settings
from serving.components import Components
from serving.impressions import ImpressionLogger
from serving.metrics import Metrics
from serving.model import ModelHandle, NoChampion, Scorer
from serving.ranker import Ranker
from serving.retrieval import PopularityIndex, follow_events
from serving.state import Running, ServingState

log = logging.getLogger(__name__)

Builder = Callable[[Settings, Metrics], Components]


@contextlib.asynccontextmanager
async def lifespan(state: ServingState, components: Components | None, builder: Builder) -> AsyncIterator[None]:
    settings, metrics = state.settings, state.metrics
    if settings.serving.ranking_threads > 0:
        state.ranking_threads = anyio.CapacityLimiter(settings.serving.ranking_threads)
    comps = components
    if comps is None:
        comps = await run_in_threadpool(builder, settings, metrics)

    def on_swap(scorer: Scorer, swapped: bool) -> None:
        metrics.model.info({"version": scorer.version, "scorer": scorer.name})
        if swapped:
            metrics.model_reloads.inc()

    comps.model.on_swap = on_swap
    if comps.model.current is None:
        try:
            await run_in_threadpool(comps.model.reload)
        except NoChampion as exc:
            log.warning("%s", exc)
        except Exception as exc:  # noqa: BLE001 - start anyway; /readyz says why not ready
            comps.model.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("initial model load failed: %s", comps.model.last_error)
    else:
        on_swap(comps.model.current, False)
    if comps.model.follows_online:
        await _refresh_online(comps.model)
    if comps.rows is not None:
        comps.rows.on_lookup = metrics.row_lookup
        comps.rows.start()
    index = comps.index if comps.index is not None else PopularityIndex(settings.serving.retrieval_half_life_s)
    ranker = Ranker(
        comps.model,
        comps.rows,
        comps.features,
        index,
        metrics,
        settings.serving.retrieval_candidates,
        settings.serving.explore_share,
    )
    impressions = ImpressionLogger(
        settings.kafka,
        settings.kafka.topic_events,
        settings.serving.impression_buffer,
        on_sent=metrics.impressions_sent.inc,
        on_dropped=metrics.impressions_dropped.inc,
    )
    if comps.log_impressions:
        impressions.start()
    stop = asyncio.Event()
    tasks = []
    if comps.follow_stream:
        tasks.append(
            asyncio.create_task(
                follow_events(
                    index,
                    settings.kafka,
                    settings.kafka.topic_events,
                    settings.serving.retrieval_lookback,
                    stop,
                )
            )
        )
    if settings.serving.loop_lag_probe_s > 0:
        tasks.append(asyncio.create_task(_probe_loop(metrics, settings.serving.loop_lag_probe_s, stop)))
    if settings.serving.reload_poll_s > 0:
        tasks.append(asyncio.create_task(_poll_model(comps.model, settings.serving.reload_poll_s, stop)))
    if comps.model.follows_online:
        tasks.append(asyncio.create_task(_poll_online(comps.model, settings.serving.online_dense_refresh_s, stop)))
    state.running = Running(components=comps, ranker=ranker, impressions=impressions, index=index)
    try:
        yield
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if comps.log_impressions:
            await impressions.close()
        if comps.rows is not None:
            await run_in_threadpool(comps.rows.close)
        for closer in comps.close:
            closer()


async def _probe_loop(metrics: Metrics, every_s: float, stop: asyncio.Event) -> None:
    """How late the event loop wakes a ``every_s`` timer: the time requests wait behind work that blocks the loop."""
    loop = asyncio.get_running_loop()
    lag = metrics.stage_latency.labels("event_loop_lag", "wall")
    while not stop.is_set():
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        lag.observe(max(0.0, loop.time() - due))


async def _poll_model(model: ModelHandle, every_s: float, stop: asyncio.Event) -> None:
    await _poll(model, model.reload, "model", every_s, stop)


async def _poll_online(model: ModelHandle, every_s: float, stop: asyncio.Event) -> None:
    await _poll(model, model.refresh_online, "online dense", every_s, stop)


async def _refresh_online(model: ModelHandle) -> None:
    await _guarded(model, model.refresh_online, "online dense")


async def _poll(
    model: ModelHandle, refresh: Callable[[], object], what: str, every_s: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
            return
        except TimeoutError:
            pass
        await _guarded(model, refresh, what)


async def _guarded(model: ModelHandle, refresh: Callable[[], object], what: str) -> None:
    try:
        await run_in_threadpool(refresh)
    except Exception as exc:  # noqa: BLE001 - keep serving the current model
        model.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("%s poll: %s", what, model.last_error)
