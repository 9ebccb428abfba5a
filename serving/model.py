"""Scorers and the model handle: what ranks, and how it is swapped without failing requests.

A scorer turns the features of n (user, item) pairs into n scores. It receives the pooled
embedding of every sparse feature (rows from the parameter service, averaged over the ids of
a multi-valued feature by ``training.pooling.mean_pool``, as the trainer's tables pool) and
the dense values in spec order, so it never talks to a store.

A champion's dense part goes with the parameter rows it was promoted with (its registry
version's ``ps_version``): the handle loads it only once the rows it reads have reached that
version, so a new dense part never scores the previous champion's rows.

Where online trainers run, their dense weights (``refresh_online``, polled every
``serving_online_dense_refresh_s``) supersede the champion's once any trainer wrote them:
named ``online/v<parameter version>`` and scored on rows of that version or newer.

The handle holds the current scorer behind one reference. A request reads that reference
once and keeps its scorer to the end, so a reload (which builds the new scorer completely
before assigning it) never changes the model under a request in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from feature_repo.spec import ITEM_SPARSE, USER_SPARSE

log = logging.getLogger(__name__)


class Scorer(Protocol):
    name: str  # the kind of scorer ("dlrm", "embedding-dot")
    version: str  # the model version it serves (goes into responses and impressions)

    def tables(self) -> dict[str, int]:
        """Parameter-service tables the scorer needs rows of: name -> embedding dim (0: any)."""
        ...

    def score(self, pooled: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        """Scores (float32 [n]) from pooled embeddings (table -> [n, dim]) and dense values ([n, n_dense])."""
        ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


@dataclass
class EmbeddingDotScorer:
    """The fallback before any champion exists: sigmoid(<sum of user embeddings, sum of item embeddings>).

    (Each table's embedding is the mean of its rows, pooled by the ranker as the trainer pools.)

    It is the two-tower reading of the rows the trainer pushed (DLRM's interaction layer
    is built on the same dot products); with only initial rows it ranks at random.
    """

    available: dict[str, int]
    version: str = "embedding-dot"
    name: str = "embedding-dot"

    def tables(self) -> dict[str, int]:
        return {t: d for t, d in self.available.items() if t in USER_SPARSE or t in ITEM_SPARSE}

    def score(self, pooled: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        n = dense.shape[0]
        user = [pooled[t] for t in USER_SPARSE if t in pooled]
        item = [pooled[t] for t in ITEM_SPARSE if t in pooled]
        if not user or not item:
            return np.full(n, 0.5, np.float32)
        width = min(min(u.shape[1] for u in user), min(i.shape[1] for i in item))
        u = sum(x[:, :width] for x in user)
        v = sum(x[:, :width] for x in item)
        return _sigmoid(np.einsum("nd,nd->n", u, v))


class ModelLoader(Protocol):
    def champion_version(self) -> str | None:
        """The version the alias points at now (cheap), or None when there is no champion."""
        ...

    def load(self, version: str) -> Scorer:
        """Build the scorer of ``version`` completely (weights loaded, ready to score)."""
        ...

    def rows_version(self, version: str) -> int | None:
        """The parameter version holding the rows of ``version`` (None: not recorded)."""
        ...


class OnlineSource(Protocol):
    def load(self, newer_than: int | None) -> tuple[Scorer, int] | None:
        """The online trainers' dense weights as a scorer and their parameter version (None: none, or none newer)."""
        ...


class NoChampion(RuntimeError):
    """The registry has no model under the alias (and no fallback is allowed)."""


class ModelHandle:
    """The current scorer; ``reload`` swaps it atomically (one reference assignment)."""

    def __init__(
        self,
        loader: ModelLoader | None,
        fallback: Callable[[], Scorer] | None,
        rows_version: Callable[[], int | None] | None = None,
        online: OnlineSource | None = None,
    ) -> None:
        self._loader = loader
        self._online = online
        self._online_version: int | None = None  # the parameter version of the online dense weights served
        self._fallback = fallback
        self._rows_version = rows_version  # the version of the rows serving reads (None: not known yet)
        self.waiting_for_rows: tuple[str, int] | None = None  # (champion, parameter version) not loaded yet
        self._current_rows: int | None = None  # the parameter version the loaded champion was promoted with
        self._current: Scorer | None = None
        self._reload_lock = threading.Lock()  # one load at a time; requests never take it
        # the registry version the alias pointed at when we last loaded: scorer.version is
        # "<model>/<version>", the alias resolves to "<version>", so compare like with like
        self._loaded_alias_version: str | None = None
        self.reloads = 0
        self.last_error: str | None = None
        self.on_swap: Callable[[Scorer, bool], None] | None = None  # (scorer, replaced another version)

    @property
    def current(self) -> Scorer | None:
        return self._current

    @property
    def rows_needed(self) -> int | None:
        """The lowest parameter version the rows may have to be served with the current model (None: any).

        The loaded champion's rows version; while only the fallback (or nothing) is loaded and a
        champion waits for its rows, the waiting champion's: rows older than the served state
        the registry names are not the rows of any served state.
        """
        if self._current_rows is not None:
            return self._current_rows
        current = self._current
        if self.waiting_for_rows is not None and (current is None or current.name == "embedding-dot"):
            return self.waiting_for_rows[1]
        return None

    @property
    def follows_online(self) -> bool:
        return self._online is not None

    def refresh_online(self) -> bool:
        """Swap in the online trainers' newest dense weights, if there are newer ones than served; True if swapped.

        From the first online weights on they are what serving scores with: the trainers
        started from the champion and keep it fresh (README "Online training"), so the alias
        is no longer followed. A swap is one reference assignment, as a champion reload's.
        """
        if self._online is None:
            return False
        with self._reload_lock:
            loaded = self._online.load(self._online_version)
            if loaded is None:
                return False
            scorer, version = loaded
            self.set(scorer)
            self._current_rows = version  # its rows: that version or newer
            self._online_version = version
            self.last_error = None
            return True

    def set(self, scorer: Scorer) -> None:
        previous = self._current
        self._current = scorer
        self._current_rows = None  # reload records the champion's rows version after this
        swapped = previous is not None and previous.version != scorer.version
        if previous is None or swapped:
            self.reloads += swapped
            log.info("serving model %s (%s)", scorer.version, scorer.name)
        if self.on_swap is not None:
            self.on_swap(scorer, swapped)

    def _rows_reached(self, version: str) -> tuple[bool, int | None]:
        """Whether the rows serving reads hold the parameter version ``version`` was promoted with, and that version."""
        needed = self._loader.rows_version(version) if self._loader is not None else None
        have = self._rows_version() if self._rows_version is not None else None
        if needed is None or have is None or have >= needed:
            self.waiting_for_rows = None
            return True, needed
        if self.waiting_for_rows != (version, needed):
            log.info("champion %s waits for parameter version %d (the replica holds %d)", version, needed, have)
        self.waiting_for_rows = (version, needed)
        return False, needed

    def reload(self, force: bool = False) -> tuple[bool, str | None]:
        """Load the champion if it changed (or ``force``); returns (changed, previous version).

        Falls back to the fallback scorer only while nothing better is loaded. Raises NoChampion
        when neither a champion nor a fallback can be had.
        """
        with self._reload_lock:
            previous = self._current.version if self._current is not None else None
            if self._online_version is not None:
                return False, previous  # the online weights supersede the champion (refresh_online)
            version = None
            if self._loader is not None:
                try:
                    version = self._loader.champion_version()
                except Exception as exc:  # registry down: keep serving what we have
                    self.last_error = f"registry: {type(exc).__name__}: {exc}"
                    log.warning("cannot read the champion alias: %s", exc)
                    if self._current is not None:
                        return False, previous
            if version is not None:
                if version in (previous, self._loaded_alias_version) and not force:
                    return False, previous
                reached, rows_needed = self._rows_reached(version)
                if not reached:
                    return False, previous
                started = time.perf_counter()
                scorer = self._loader.load(version)  # type: ignore[union-attr]
                log.info("loaded model %s in %.2fs", version, time.perf_counter() - started)
                self.set(scorer)
                self._current_rows = rows_needed
                self._loaded_alias_version = version
                self.last_error = None
                return scorer.version != previous, previous
            if self._current is not None and self._current.name != "embedding-dot":
                return False, previous  # the alias vanished: keep the last champion rather than degrade
            if self._fallback is None:
                raise NoChampion("no model version carries the serving alias and the fallback scorer is disabled")
            scorer = self._fallback()
            self._loaded_alias_version = None
            self.set(scorer)
            return scorer.version != previous, previous
