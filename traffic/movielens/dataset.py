"""One MovieLens set in memory: users, items, and ratings in timestamp order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feature_repo.spec import EncodedEntity, encode_item, encode_user


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

    def encoded(self) -> tuple[dict[str, EncodedEntity], dict[str, EncodedEntity]]:
        """The feature spec's encodings of every user and item (by id)."""
        users = {uid: encode_user(uid, u.__dict__) for uid, u in self.users.items()}
        items = {iid: encode_item(iid, {"genres": list(i.genres), "year": i.year}) for iid, i in self.items.items()}
        return users, items
