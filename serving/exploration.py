"""Epsilon-greedy exploration: which policy serves a request, the list it shows, and each item's propensity.

With probability ``share`` (epsilon) a request is served by the *explore* policy: the k shown items
are a uniformly random ordered sample of the n candidates. Otherwise the *exploit* policy shows the
greedy top k. Epsilon-greedy was chosen because its propensities are exact and need nothing but the
greedy order: in a uniformly random ordered sample every candidate is at every position with
probability 1/n, so under the mixture that served the request

    P(item i at position j) = (1 - share) * [greedy put i at j] + share / n

which is > 0 for every shown item whenever share > 0, is 1 for the greedy items when share == 0, and
sums to 1 over the n candidates at any position. The propensity is that of the (item, position) pair
under the logging policy, whichever branch happened to choose the list; the branch is logged beside it.

The draw is a function of the request id only (a keyed hash seeds the generator): independent of the
candidates and their scores, reproducible from the logged request id, and testable without a seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feature_repo.contract import EXPLOIT, EXPLORE, Policy


@dataclass(frozen=True)
class Slate:
    """The shown list of one request: candidate indices by position, their propensities, the choosing policy."""

    shown: list[int]
    propensities: list[float]
    policy: Policy


def propensity(item: int, position: int, greedy: Sequence[int], share: float) -> float:
    """P(candidate ``item`` is shown at ``position``) under the epsilon-greedy mixture over ``greedy`` (n candidates).

    ``greedy`` is the exploit policy's order of all n candidates (a permutation of range(n)).
    """
    n = len(greedy)
    if not 0 <= position < n:
        raise ValueError(f"position {position} outside the {n} candidates")
    chosen_by_greedy = 1.0 if greedy[position] == item else 0.0
    # min(): (1 - share) + share / n can round a hair above 1
    return min(1.0, (1.0 - share) * chosen_by_greedy + share / n)


def _generator(request_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(request_id.encode(), digest_size=8, person=b"recsys-explore").digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def choose(greedy: Sequence[int], k: int, share: float, request_id: str) -> Slate:
    """The list request ``request_id`` shows: the greedy top k, or with probability ``share`` a random one."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"exploration share must be in [0, 1], got {share}")
    n = len(greedy)
    shown_count = min(k, n)
    rng = _generator(request_id)
    if share > 0.0 and rng.random() < share:
        policy: Policy = EXPLORE
        shown = [int(i) for i in rng.choice(n, size=shown_count, replace=False)] if n else []
    else:
        policy = EXPLOIT
        shown = [int(i) for i in greedy[:shown_count]]
    return Slate(shown, [propensity(item, j, greedy, share) for j, item in enumerate(shown)], policy)
