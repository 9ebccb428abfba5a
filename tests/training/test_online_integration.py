"""Online trainers as real processes on real Kafka and Redis (issue #16, items 1, 2, 4, 6).

Each trainer is `python -m training.cli online` with a flush journal (``RECSYS_ONLINE_JOURNAL_DIR``):
per flush its offsets, its verdict and the deltas it pushed. The parameter service of each
test is a fresh namespace, so its rows must be exactly the initial rows plus the journal's
deltas: that is how "both trainers' updates count" and "no half flush" are checked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.consumer_lag import group_lag
from core.kafka import ensure_topics
from core.procs import free_port
from core.settings import PROJECT_ROOT, Settings
from feature_repo.contract import Sample
from paramserver import initial_rows, open_store
from traffic.simulator import SimConfig
from traffic.synthetic import produce_samples, simulate_samples
from training.params import table_configs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# flushes of 400 samples, judged from the third on: a poisoned stream is caught within ~3 flushes
GUARDED = {"flush_max_samples": "400", "flush_interval_s": "5", "guard_warmup_flushes": "2", "guard_min_samples": "100"}


class Group:
    """The settings of one test's trainer group and its running members."""

    def __init__(self, kafka_bootstrap: str, redis_url: str, tmp: Path, **online: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.topic, self.group, self.tmp = f"samples.{tag}", f"online.{tag}", tmp
        self.journal = tmp / "journal"
        self.env = {
            **os.environ,
            "RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "RECSYS_TOPIC_SAMPLES": self.topic,
            "RECSYS_PS_SHARDS": json.dumps([redis_url]),
            "RECSYS_PS_NAMESPACE": f"online{tag}",
            "RECSYS_LOCAL_RUN_DIR": str(tmp / "run"),
            "RECSYS_ONLINE_GROUP_ID": self.group,
            "RECSYS_ONLINE_JOURNAL_DIR": str(self.journal),
            "RECSYS_ONLINE_SESSION_TIMEOUT_S": "6",
            "RECSYS_ONLINE_FLUSH_INTERVAL_S": "1",
            "RECSYS_ONLINE_BATCH_SIZE": "200",
            "PYTHONWARNINGS": "ignore",
            **{f"RECSYS_ONLINE_{k.upper()}": v for k, v in online.items()},
        }
        self.bootstrap = kafka_bootstrap
        self.s = Settings().override(ps={"shards": [redis_url], "namespace": f"online{tag}"})
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        asyncio.run(ensure_topics(kafka_bootstrap, {self.topic: 4}))

    def start(self, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"trainer-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "online", *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append((proc, log))
        return proc, log

    def produce(self, samples: list[Sample], extra: list[bytes] | None = None) -> None:
        produce_samples(self.bootstrap, self.topic, samples, extra)

    def wait_until_owned(self, members: list[tuple[subprocess.Popen, Path]], timeout: float = 180.0) -> None:
        """Until each member's latest assignment is non-empty and together they own all 4 partitions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owned = [_latest_owned(log) for _, log in members]
            if all(owned) and sorted(p for o in owned for p in o) == [0, 1, 2, 3]:
                return
            for proc, log in members:
                assert proc.poll() is None, f"trainer died: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"partitions never split: {[log.read_text()[-2000:] for _, log in members]}")

    def wait_until_committed(self, timeout: float = 180.0) -> dict[int, int]:
        """Until the group committed every partition's end offset; returns the end offsets."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lag = asyncio.run(group_lag(self.bootstrap, self.group, self.topic))
            if lag and all(p.committed == p.end for p in lag):
                return {p.partition: p.end for p in lag}
            time.sleep(0.5)
        logs = [log.read_text()[-2000:] for _, log in self.procs]
        raise AssertionError(f"the group never caught up: {lag}; logs: {logs}")

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.journal.glob("flush-*.json"))]


def _latest_owned(log: Path) -> list[int]:
    lines = [line for line in log.read_text(errors="replace").splitlines() if " owns partitions " in line]
    return json.loads(lines[-1].rsplit(" owns partitions ", 1)[1]) if lines else []


def _deltas(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path) as archive:
        return {k[5:]: (archive[k], archive[f"deltas__{k[5:]}"]) for k in archive.files if k.startswith("ids__")}


def _expected_rows(group: Group, files: list[Path]) -> dict[str, dict[int, np.ndarray]]:
    """Initial rows plus every delta of ``files``, per sparse table and id (vectors and state)."""
    configs = {c.name: c for c in table_configs(group.s.train.embedding_dim, group.s.train.init_std)}
    sums: dict[str, dict[int, np.ndarray]] = {name: {} for name in configs}
    for path in files:
        for table, (ids, rows) in _deltas(path).items():
            if table not in configs:
                continue  # the dense table: its first value is a trainer's initial weights, not a delta
            for i, row in zip(ids.tolist(), rows.astype(np.float64)):
                sums[table][i] = sums[table].get(i, 0.0) + row
    for table, by_id in sums.items():
        if by_id:
            ids = np.array(sorted(by_id), dtype=np.int64)
            weights, state = initial_rows(configs[table], ids)
            for k, i in enumerate(ids.tolist()):
                by_id[i] = by_id[i] + np.concatenate([weights[k], state[k]])
    return sums


def _matches(group: Group, files: list[Path]) -> bool:
    expected = _expected_rows(group, files)
    store = open_store("redis", [], group.s.ps)
    try:
        for table, by_id in expected.items():
            if not by_id:
                continue
            ids = np.array(sorted(by_id), dtype=np.int64)
            rows = store.pull(table, ids)
            got = np.hstack([rows.weights, rows.state])
            if not np.allclose(got, np.stack([by_id[i] for i in ids.tolist()]), rtol=1e-4, atol=1e-5):
                return False
        return True
    finally:
        store.close()


def _covered(records: list[dict], ends: dict[int, int]) -> dict[int, bool]:
    """Per partition: do the flushes' offset ranges cover [0, end) (every committed sample was flushed)?"""
    out = {}
    for p, end in ends.items():
        seen = np.zeros(end, dtype=bool)
        for r in records:
            if str(p) in r["offsets"]:
                start, stop = r["offsets"][str(p)]
                seen[start:stop] = True
        out[p] = bool(seen.all())
    return out


def test_two_trainers_split_the_partitions_both_count_and_a_sigkill_loses_no_committed_update(
    kafka_bootstrap: str, redis_factory, tmp_path: Path
) -> None:
    group = Group(kafka_bootstrap, redis_factory("online").url, tmp_path)
    samples = simulate_samples(SimConfig(users=40, items=30, requests=400, seed=31)).samples
    first, second = group.start(), group.start()
    try:
        group.wait_until_owned([first, second])
        group.produce(samples[:1600], extra=[b"not json", b'{"schema_version": 1}'])  # skipped, never fatal
        group.wait_until_committed()
        logs = "".join(log.read_text() for _, log in (first, second))
        assert "skipped 2 invalid records" in logs or logs.count("skipped 1 invalid records") == 2
        records = group.records()
        by_member: dict[str, dict[int, list[list[int]]]] = {}
        for r in records:
            for p, span in r["offsets"].items():
                by_member.setdefault(r["member"], {}).setdefault(int(p), []).append(span)
        assert len(by_member) == 2, "both trainers trained"
        owners = {p: [m for m, parts in by_member.items() if p in parts] for p in range(4)}
        assert all(len(m) == 1 for m in owners.values()), f"each partition trained by one trainer: {owners}"
        files, rows_of = [], {}
        for r in records:
            npz = group.journal / f"flush-{r['member']}-{r['flush']:06d}.npz"
            if r["version"] is not None and npz.exists():
                files.append(npz)
                items = _deltas(npz).get("item_id", (np.zeros(0, np.int64), None))[0]
                rows_of.setdefault(r["member"], set()).update(items.tolist())
        assert len(rows_of) == 2 and set.intersection(*rows_of.values()), "some item row was updated by both"
        assert _matches(group, files), "the service holds the initial rows plus both trainers' deltas"

        # SIGKILL one trainer mid-stream; the other takes its partitions over from the committed offsets
        group.produce(samples[1600:3200])
        flushed = len(group.records())
        deadline = time.monotonic() + 60
        while len(group.records()) < flushed + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first[0].send_signal(signal.SIGKILL)
        first[0].wait()
        before_restart = group.wait_until_committed()
        known = {r["member"] for r in group.records()}
        third = group.start()  # the restarted trainer joins again and resumes from the committed offsets
        group.wait_until_owned([second, third])
        group.produce(samples[3200:])
        ends = group.wait_until_committed()
    finally:
        group.stop_all()
    records = group.records()
    assert all(_covered(records, ends).values()), "every committed offset was in a flush"
    restarted = [r for r in records if r["member"] not in known]
    assert restarted, "the restarted trainer trained"
    for r in restarted:  # it started from the committed offsets, not from the beginning
        assert all(span[0] >= before_restart[int(p)] for p, span in r["offsets"].items()), r
    done = sorted(group.journal.glob("flush-*[0-9].npz"))
    pending = sorted(group.journal.glob("flush-*.pending.npz"))
    assert len(pending) <= 1  # only the killed trainer can leave one
    # a pending flush was or was not pushed (killed before or after the push), never half of it
    assert any(
        _matches(group, done + list(extra))
        for n in range(len(pending) + 1)
        for extra in itertools.combinations(pending, n)
    ), "the parameter service holds exactly the whole flushes"
    assert not _matches(group, done[1:]), "the check sees a missing flush"


def test_a_poisoned_stream_is_caught_nothing_of_it_published_and_publishing_resumes(
    kafka_bootstrap: str, redis_factory, tmp_path: Path
) -> None:
    group = Group(kafka_bootstrap, redis_factory("online").url, tmp_path, **GUARDED)
    samples = simulate_samples(SimConfig(users=40, items=30, requests=560, seed=32)).samples
    port = free_port()
    proc, log = group.start("--metrics-port", str(port))
    store = open_store("redis", [], group.s.ps)
    try:
        group.produce(samples[:3200])
        group.wait_until_committed()
        good_version, good = store.version(), store.read_all()
        poisoned = [s.model_copy(update={"label": 1 - s.label}) for s in samples[3200:4400]]
        group.produce(poisoned)
        group.wait_until_committed()
        assert store.version() == good_version, "no flush of the poisoned stream was published"
        now = store.read_all()
        assert sorted(now) == sorted(good)
        for table, rows in now.items():
            np.testing.assert_array_equal(rows.ids, good[table].ids)
            np.testing.assert_array_equal(rows.weights, good[table].weights)
            np.testing.assert_array_equal(rows.state, good[table].state)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "recsys_online_publishing_halted 1.0" in metrics
        assert "ALERT online quality" in log.read_text()
        refused = [r for r in group.records() if r["decision"] == "refuse"]
        assert refused and all(r["version"] is None for r in refused)
        group.produce(samples[4400:])
        group.wait_until_committed()
        assert store.version() > good_version, "publishing resumed once quality returned"
        assert "recsys_online_publishing_halted 0.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        store.close()
        group.stop_all()
    assert proc.returncode == 0, log.read_text()[-2000:]
