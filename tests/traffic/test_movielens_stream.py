"""MovieLens-100K replayed through real Kafka and the real Faust worker (`recsys stream worker`).

A slice of the ratings goes out as the replay publishes it; the worker joins impressions
with clicks and emits one sample per impression. Every sample is checked against the
ratings file: one per rating, label 1 exactly when the rating is above 3, and the
features the spec gives that user and movie.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core.kafka import ensure_topics, read_topic
from core.settings import PROJECT_ROOT, Settings
from feature_repo.contract import Sample
from feature_repo.spec import encode_item, encode_user, join_features
from traffic import movielens

RATINGS = 4000
WINDOW_S = 5.0  # attribution window (event time); replay clicks come 1 s after their impression
IDLE_S = 5.0
DEADLINE_S = 240.0


async def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    return [r.value async for r in read_topic(bootstrap, topic) if r.value is not None]


@pytest.mark.integration
@pytest.mark.slow
def test_movielens_replay_through_the_stream_worker_gives_one_labelled_sample_per_rating(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    topics = {
        "events": f"ml.events.{tag}",
        "samples": f"ml.samples.{tag}",
        "deadletter": f"ml.dead.{tag}",
        "late": f"ml.late.{tag}",
    }
    env = {
        "RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RECSYS_TOPIC_EVENTS": topics["events"],
        "RECSYS_TOPIC_SAMPLES": topics["samples"],
        "RECSYS_TOPIC_DEADLETTER": topics["deadletter"],
        "RECSYS_TOPIC_LATE": topics["late"],
        "RECSYS_TOPIC_PARTITIONS": "2",
        "RECSYS_STREAM_APP_ID": f"ml-stream-{tag}",
        "RECSYS_RUN_DIR": str(tmp_path / "run"),
        "RECSYS_STREAM_DATA_DIR": str(tmp_path / "stream"),
        "RECSYS_FEAST_DATA_DIR": str(tmp_path / "feast"),
        "RECSYS_FEAST_ONLINE_STORE": "sqlite",
        "RECSYS_STREAM_ATTRIBUTION_WINDOW_S": str(WINDOW_S),
        # the tail of the replay has no later events: its windows close on the wall clock once a
        # partition read to its end has been quiet this long
        "RECSYS_STREAM_IDLE_ADVANCE_S": str(IDLE_S),
        "RECSYS_CACHE_DIR": str(Settings().local.cache_dir),
    }
    asyncio.run(ensure_topics(kafka_bootstrap, {name: 2 for name in topics.values()}))

    log_path = tmp_path / "worker.log"
    log = open(log_path, "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "stream", "worker"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    data = movielens.load("movielens-100k", Settings().local.cache_dir, limit=RATINGS)
    try:
        # the worker's start-up (Feast and torch imports) must not look like an idle stream mid-replay
        deadline = time.monotonic() + DEADLINE_S
        while b"feature store ready" not in log_path.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)

        # the replay, exactly as a person runs it (unpaced: times compressed 1e5x and rebased to end now)
        replayed = subprocess.run(
            [
                sys.executable,
                "-m",
                "recsys.cli",
                "replay",
                "--dataset",
                "movielens-100k",
                "--limit",
                str(RATINGS),
                "--no-pace",
                "--speedup",
                "100000",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
        )
        assert replayed.returncode == 0, replayed.stderr
        assert f"published {movielens.count_events(data):,} events" in replayed.stderr
        run = re.search(r"\(run (\S+)\)", replayed.stderr).group(1)

        raw: list[bytes] = []
        deadline = time.monotonic() + DEADLINE_S  # a limit of its own: a slow start-up and replay do not eat it
        while time.monotonic() < deadline:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            raw = asyncio.run(_read_all(kafka_bootstrap, topics["samples"]))
            if len({Sample.from_json(v).sample_id for v in raw}) >= RATINGS:
                break
            time.sleep(2)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        log.close()

    samples = {}
    for value in raw:  # at-least-once: a re-emission carries the same id and label
        sample = Sample.from_json(value)
        assert samples.setdefault(sample.sample_id, sample).label == sample.label
    worker_log = log_path.read_text()[-3000:]
    assert len(samples) == RATINGS, f"{len(samples)} samples of {RATINGS} ratings; worker log:\n{worker_log}"

    by_request = {s.request_id: s for s in samples.values()}
    expected = {data.request_id(i, run): i for i in range(RATINGS)}
    assert set(by_request) == set(expected)
    users = {u: encode_user(u, p.__dict__) for u, p in data.users.items()}
    items = {i: encode_item(i, {"genres": list(p.genres), "year": p.year}) for i, p in data.items.items()}
    positives = 0
    for request_id, index in expected.items():
        sample = by_request[request_id]
        user_id, item_id = data.rating_user[index], data.rating_item[index]
        assert (sample.user_id, sample.item_id) == (user_id, item_id)
        assert sample.label == int(data.rating[index] > 3), (request_id, float(data.rating[index]))
        sparse, dense = join_features(users[user_id], items[item_id], user_id, item_id)
        assert sample.sparse == sparse and sample.dense == dense
        positives += sample.label
    assert positives == int((data.rating > 3).sum()) > 0

    assert asyncio.run(_read_all(kafka_bootstrap, topics["deadletter"])) == []
    assert asyncio.run(_read_all(kafka_bootstrap, topics["late"])) == []
