"""A MovieLens set as the contract's events, in event-time order, for ``recsys replay --dataset``.

One ``user_profile`` per user and one ``item_profile`` per item first, then for every rating
an ``impression`` followed, when the rating is above 3, by a ``click``. Rating times are
compressed by a speed-up factor and start at a given time (``replay.plan_start`` picks it).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np
import orjson

from feature_repo.contract import click_event, impression_event, item_profile_event, user_profile_event
from feature_repo.spec import join_features
from traffic.movielens.dataset import DatasetError, MovieLens
from traffic.simulator import SimRecord


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
        event = user_profile_event(
            event_id=f"{name}:user:{user.user_id}",
            timestamp=profile_at,
            user_id=user.user_id,
            gender=user.gender,
            age=user.age,
            occupation=user.occupation,
            zip_code=user.zip_code,
        )
        yield SimRecord(user.user_id.encode(), orjson.dumps(event), profile_at, "user_profile")
    for item in data.items.values():
        event = item_profile_event(
            event_id=f"{name}:item:{item.item_id}",
            timestamp=profile_at,
            item_id=item.item_id,
            genres=item.genres,
            year=item.year,
            title=item.title,
        )
        yield SimRecord(item.item_id.encode(), orjson.dumps(event), profile_at, "item_profile")
    times = event_times(data, speedup, start)
    users, items = data.encoded() if with_features else ({}, {})
    pending: list[tuple[float, int, SimRecord]] = []  # clicks waiting for their time
    for index in range(len(data)):
        at = float(times[index])
        while pending and pending[0][0] <= at:
            yield heapq.heappop(pending)[2]
        user_id, item_id = data.rating_user[index], data.rating_item[index]
        request_id = data.request_id(index, run)
        impression = impression_event(
            event_id=f"{name}:imp:{index}",
            timestamp=round(at, 6),
            request_id=request_id,
            user_id=user_id,
            item_id=item_id,
            position=0,
            model_version=f"{data.name}-replay",
            features=join_features(users.get(user_id), items.get(item_id), user_id, item_id) if with_features else None,
        )
        key = user_id.encode()
        yield SimRecord(key, orjson.dumps(impression), at, "impression")
        if data.rating[index] > 3:
            clicked_at = round(at + click_delay_s, 6)
            click = click_event(
                event_id=f"{name}:click:{index}",
                timestamp=clicked_at,
                request_id=request_id,
                user_id=user_id,
                item_id=item_id,
            )
            heapq.heappush(pending, (clicked_at, index, SimRecord(key, orjson.dumps(click), clicked_at, "click")))
    while pending:
        yield heapq.heappop(pending)[2]


def count_events(data: MovieLens) -> int:
    return len(data.users) + len(data.items) + len(data) + int((data.rating > 3).sum())
