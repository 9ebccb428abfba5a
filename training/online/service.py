"""The long-lived online trainer: one member of a Kafka consumer group on the samples topic.

N processes with the same group id share the topic's partitions; each trains only on the
partitions it owns. The loop: fetch a batch, score and train on it (``OnlineLearner``), and
every ``flush_interval_s`` (or ``flush_max_samples``) flush, then commit the offsets of the
samples that flush covered. Order of a flush, and what a crash at each point leaves:

1. the guard judges the flush (nothing written yet; a crash: its samples are re-read);
2. a published flush is ONE ``push_deltas`` call: every table's deltas and the dense delta as
   one parameter version (a crash before it: nothing of the flush is in the service, the
   samples are re-read; after it: the flush is whole in the service);
3. the offsets are committed (a crash between 2 and 3: the samples are trained on again by
   whoever owns the partition next).

So each sample's update reaches the parameter service at least once, never half a flush.
A refused flush's offsets are committed too: its samples were judged, not lost. On a
rebalance the trainer flushes and commits before it gives partitions up, so the next owner
starts where it stopped; a SIGKILLed trainer's partitions move to the others after the
session timeout and are re-read from the committed offsets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings
from paramserver import ParamStore
from training.data import ReadStats, parse_samples, to_columns
from training.model import save_dense
from training.online.learner import FlushResult, OnlineLearner
from training.online.metrics import OnlineMetrics

log = logging.getLogger("recsys.online")


@dataclass
class Pending:
    """Offsets of the samples trained since the last flush: partition -> [first offset, next offset)."""

    ranges: dict[int, list[int]] = field(default_factory=dict)

    def add(self, partition: int, first: int, last: int) -> None:
        span = self.ranges.setdefault(partition, [first, last + 1])
        span[1] = max(span[1], last + 1)

    def clear(self) -> None:
        self.ranges = {}


class Journal:
    """Per flush: a JSON record (version, verdict, offsets) and the pushed deltas (npz).

    The deltas are written as ``.pending.npz`` before the push and renamed after it, so a
    trainer killed in between leaves a pending file whose flush may or may not be in the service.
    """

    def __init__(self, folder: Path | None, member: str) -> None:
        self.folder, self.member, self.count = folder, member, 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _stem(self) -> Path:
        assert self.folder is not None
        return self.folder / f"flush-{self.member}-{self.count:06d}"

    def pending(self, deltas: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        if self.folder is None:
            return
        arrays: dict[str, np.ndarray] = {}
        for table, (ids, rows) in deltas.items():
            arrays[f"ids__{table}"], arrays[f"deltas__{table}"] = ids, rows
        with open(f"{self._stem()}.pending.npz", "wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)

    def done(self, result: FlushResult, offsets: dict[int, list[int]]) -> None:
        if self.folder is None:
            return
        stem = self._stem()
        if Path(f"{stem}.pending.npz").exists():
            os.replace(f"{stem}.pending.npz", f"{stem}.npz")
        record = {
            "member": self.member,
            "flush": self.count,
            "version": result.version,
            "decision": str(result.verdict.decision),
            "reason": result.verdict.reason,
            "auc": result.quality.auc,
            "samples": result.samples,
            "offsets": {str(p): span for p, span in offsets.items()},
        }
        Path(f"{stem}.json").write_text(json.dumps(record))
        self.count += 1


class OnlineTrainer:
    """The consumer loop around one learner; ``run`` until ``stop`` is set."""

    def __init__(
        self, s: Settings, store: ParamStore, learner: OnlineLearner, metrics: OnlineMetrics | None = None
    ) -> None:
        self.s, self.o, self.store, self.learner = s, s.online, store, learner
        self.metrics = metrics or OnlineMetrics()
        self.member = f"{socket.gethostname()}-{os.getpid()}"
        self.journal = Journal(self.o.journal_dir, self.member)
        self.pending = Pending()
        self.stats = ReadStats()
        self.stop = asyncio.Event()
        self.owned: set[int] = set()
        self._consumer: Any = None
        self._last_flush = time.monotonic()
        self._last_dense = float("-inf")  # the first published flush writes them (monotonic time may start near 0)
        self._flushing = asyncio.Lock()  # a rebalance may ask for a flush while the loop is in one

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

        from core.kafka import connect_options, servers, start_client

        trainer = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await trainer.flush()  # commit what we trained before the partitions move
                trainer.owned -= {tp.partition for tp in revoked}

            async def on_partitions_assigned(self, assigned: Any) -> None:
                trainer.owned |= {tp.partition for tp in assigned}
                log.info("%s owns partitions %s", trainer.member, sorted(trainer.owned))

        session_ms = int(self.o.session_timeout_s * 1000)
        consumer = AIOKafkaConsumer(
            **connect_options(self.s.kafka),
            group_id=self.o.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            max_poll_records=self.o.batch_size,
        )
        await start_client(consumer, servers(self.s.kafka), consumer.stop)
        self._consumer = consumer
        consumer.subscribe([self.s.kafka.topic_samples], listener=Listener())
        try:
            while not self.stop.is_set():
                batches = await consumer.getmany(timeout_ms=self.o.poll_timeout_ms, max_records=self.o.batch_size)
                values: list[bytes | None] = []
                for tp, records in batches.items():
                    if records:
                        self.pending.add(tp.partition, records[0].offset, records[-1].offset)
                        values.extend(r.value for r in records)
                if values:
                    self.train(values)
                due = time.monotonic() - self._last_flush >= self.o.flush_interval_s
                full = 0 < self.o.flush_max_samples <= self.learner.samples_since_flush
                if (due or full) and self.pending.ranges:
                    await self.flush()
            await self.flush()
        finally:
            await consumer.stop()

    def train(self, values: list[bytes | None]) -> None:
        records_before, rejected_before = self.stats.records, sum(self.stats.rejected.values())
        samples, _ = parse_samples(values, stats=self.stats)
        self.metrics.records.inc(self.stats.records - records_before)
        rejected = sum(self.stats.rejected.values()) - rejected_before
        if rejected:  # never fatal: the valid samples beside them train
            self.metrics.rejected.inc(rejected)
            log.warning(
                "skipped %d invalid records (so far %s); e.g. %s",
                rejected,
                dict(self.stats.rejected),
                self.stats.examples[-1],
            )
        if samples:
            self.learner.train_batch(to_columns(samples))
            self.metrics.samples.inc(len(samples))

    async def flush(self) -> FlushResult | None:
        """Judge, publish (one version) or drop, then commit the offsets of the samples it covered."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> FlushResult | None:
        self._last_flush = time.monotonic()
        if not self.pending.ranges:
            return None
        result = self.learner.flush(before_push=self.journal.pending)
        offsets = dict(self.pending.ranges)
        self.journal.done(result, offsets)
        await self._commit(offsets)
        self.pending.clear()
        self._report(result)
        if result.version is not None:
            self._publish_dense(result.version)
        return result

    async def _commit(self, offsets: dict[int, list[int]]) -> None:
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        topic = self.s.kafka.topic_samples
        try:
            await self._consumer.commit({TopicPartition(topic, p): span[1] for p, span in offsets.items()})
        except KafkaError as exc:
            # the group moved on without us: the next owner re-reads these samples (at-least-once)
            log.warning("offsets %s not committed (%s): their samples will be trained on again", offsets, exc)

    def _report(self, result: FlushResult) -> None:
        q, verdict, m = result.quality, result.verdict, self.metrics
        m.observe(result, self.guard_halted)
        line = (
            f"flush {verdict.decision}: {result.samples} samples, AUC {q.auc:.4f}, log loss {q.log_loss:.4f}, "
            f"calibration {q.calibration:.3f} ({verdict.reason})"
        )
        if result.version is not None:
            line += f"; parameter version {result.version}, rows {result.rows}"
        if verdict.decision == "refuse":
            log.error("ALERT online quality: %s; publishing halted, served rows stay at the last good version", line)
        else:
            log.info(line)

    @property
    def guard_halted(self) -> bool:
        return self.learner.guard.halted

    def _publish_dense(self, version: int) -> None:
        """Every ``dense_publish_interval_s``, the owner of partition 0 writes the dense weights, named by version."""
        now = time.monotonic()
        if 0 not in self.owned or now - self._last_dense < self.o.dense_publish_interval_s:
            return
        self._last_dense = now
        folder = self.o.dense_dir or self.s.local.run_dir / "online"
        state = {k: v.detach().clone() for k, v in self.learner.dense.state_dict().items()}
        path = save_dense(folder / f"dense-v{version}.pt", self.learner.config.model, state, {"ps_version": version})
        log.info("dense weights of parameter version %d written to %s", version, path)

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)


def build_learner(
    s: Settings, dense: Path | None = None, reset_dense: bool = False
) -> tuple[ParamStore, OnlineLearner]:
    """The training copy of the parameter service (with the dense table) and a learner over it.

    The starting point is what the service holds: the served rows (the batch DAG's champion
    after a promotion) and the group's dense weights; ``dense`` (a dense artifact, e.g. the
    champion's) seeds the dense weights when no trainer of the group has written any yet, or
    replaces the group's with ``reset_dense``.
    """
    from core.redact import redact_urls
    from training.model import DenseArch, ModelConfig, load_dense
    from training.online.guard import Guard, GuardConfig
    from training.online.learner import LearnerConfig
    from training.online.rows import dense_table
    from training.params import open_training_store, table_configs

    t = s.train
    config = ModelConfig.of_settings(t)
    initial = None
    if dense is not None:
        loaded, initial, _ = load_dense(dense)
        if loaded != config:
            raise ValueError(f"{dense} holds a model of another shape ({loaded}) than the settings' ({config})")
    n_params = sum(p.numel() for p in (initial or DenseArch(config)).parameters())
    tables = [*table_configs(t.embedding_dim, t.init_std), dense_table(n_params)]
    try:
        store = open_training_store(s.ps, tables)
    except Exception as exc:  # noqa: BLE001 - ShardUnavailable, TableMismatch, bad URL: one message
        raise RuntimeError(
            f"the parameter service {redact_urls(s.ps.shards)} is unusable ({type(exc).__name__}: {exc})"
        ) from None
    learner_config = LearnerConfig(
        model=config,
        embedding_lr=t.embedding_lr,
        dense_lr=t.dense_lr,
        seed=t.seed,
        ips_max_weight=t.ips_max_weight if t.ips_weighting else None,
    )
    guard = Guard(GuardConfig.from_settings(s.online))
    return store, OnlineLearner(store, learner_config, guard, initial, reset_dense=reset_dense)
