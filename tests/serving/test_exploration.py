"""Unit tests of the epsilon-greedy exploration policy: the lists it shows and their propensities."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from feature_repo.contract import EXPLOIT, EXPLORE
from serving.exploration import choose, propensity

shares = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def greedy_orders(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(min_value=1, max_value=40))
    return draw(st.permutations(list(range(n))))


@given(greedy=greedy_orders(), share=shares, data=st.data())
def test_propensities_at_one_position_are_probabilities_that_sum_to_one(greedy, share, data):
    position = data.draw(st.integers(min_value=0, max_value=len(greedy) - 1))
    column = [propensity(item, position, greedy, share) for item in range(len(greedy))]
    assert all(0.0 <= p <= 1.0 for p in column)
    assert math.isclose(sum(column), 1.0, rel_tol=1e-9)


@given(
    greedy=greedy_orders(),
    share=shares,
    k=st.integers(min_value=1, max_value=50),
    request_id=st.text(min_size=1, max_size=40),
)
def test_a_slate_logs_the_mixture_propensity_of_each_shown_item(greedy, share, k, request_id):
    slate = choose(greedy, k, share, request_id)
    n = len(greedy)
    assert len(slate.shown) == min(k, n) and len(set(slate.shown)) == len(slate.shown)
    assert set(slate.shown) <= set(range(n))
    if slate.policy == EXPLOIT:
        assert slate.shown == greedy[: min(k, n)]
    for position, (item, logged) in enumerate(zip(slate.shown, slate.propensities)):
        greedy_here = greedy[position] == item
        assert logged == pytest.approx((1 - share) * greedy_here + share / n)
        if share > 0 or slate.policy == EXPLOIT:  # a shown item had a chance to be shown
            assert 0.0 < logged <= 1.0


def test_no_exploration_is_the_greedy_top_k_with_propensity_one():
    greedy = [3, 0, 2, 1]
    for r in range(50):
        slate = choose(greedy, 3, 0.0, f"request-{r}")
        assert slate.policy == EXPLOIT and slate.shown == [3, 0, 2] and slate.propensities == [1.0, 1.0, 1.0]


def test_the_draw_depends_on_the_request_id_only():
    greedy = list(range(20))
    first = [choose(greedy, 5, 0.5, f"r{i}") for i in range(30)]
    again = [choose(greedy, 5, 0.5, f"r{i}") for i in range(30)]
    assert first == again
    assert {s.policy for s in first} == {EXPLOIT, EXPLORE}  # both branches occur over 30 requests


def test_the_explore_share_of_requests_and_the_uniform_positions_match_the_logged_probabilities():
    n, k, share, requests = 5, 2, 0.3, 20_000
    greedy = [4, 2, 0, 1, 3]
    policies: Counter[str] = Counter()
    at_position: Counter[tuple[int, int]] = Counter()  # (item, position) over all requests
    for r in range(requests):
        slate = choose(greedy, k, share, f"req-{r}")
        policies[slate.policy] += 1
        for position, item in enumerate(slate.shown):
            at_position[(item, position)] += 1
    assert policies[EXPLORE] / requests == pytest.approx(share, abs=0.015)
    for item in range(n):
        for position in range(k):
            frequency = at_position[(item, position)] / requests
            # a binomial proportion over 20k requests: within 5 standard deviations (~0.016)
            assert frequency == pytest.approx(propensity(item, position, greedy, share), abs=0.016)


def test_fewer_candidates_than_k_and_no_candidates():
    assert choose([], 5, 0.5, "r").shown == []
    slate = choose([1, 0], 5, 1.0, "r")
    assert sorted(slate.shown) == [0, 1] and slate.policy == EXPLORE
    assert np.allclose(slate.propensities, [0.5, 0.5])


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="share"):
        choose([0, 1], 1, share, "r")


def test_a_position_outside_the_candidates_is_refused():
    with pytest.raises(ValueError, match="position"):
        propensity(0, 3, [0, 1, 2], 0.1)
