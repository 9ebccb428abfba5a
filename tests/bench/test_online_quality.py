"""bench online_quality: the closed-loop step and its bookkeeping on a tiny world, and the bench on real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import online_quality as oq
from traffic.simulator import SimConfig, World


@pytest.fixture(scope="module")
def world() -> World:
    return World(SimConfig(users=6, items=12, seed=3))


def test_grid_rows_are_user_major_pairs(world: World) -> None:
    grid = oq.grid_columns(world)
    assert len(grid) == 6 * 12
    shown = oq.take(grid, np.array([13, 0]), np.array([2, 0]), np.array([1.0, 0.0]))
    # row 13 is user 1, item 1: its sparse ids are the grid's, its position input is the shown position
    for name in grid.lengths:
        assert shown.gather(name, np.array([0]))[1].tolist() == grid.gather(name, np.array([13]))[1].tolist()
    assert shown.dense[0, -1] == pytest.approx(np.log2(3.0))
    assert shown.dense[1, -1] == 0.0
    assert shown.labels.tolist() == [1.0, 0.0]


def test_serve_shows_the_top_k_of_the_candidates_and_books_the_policies(world: World) -> None:
    users, cands = oq.requests_of(world, 4, 8, np.random.default_rng(0))
    scores = np.tile(np.arange(12, dtype=np.float64), (6, 1))  # higher item index scores higher
    log = oq.ArmLog()
    rows, positions, labels = oq.serve(world, users, cands, scores, 3, np.random.default_rng(1), log)
    assert len(rows) == len(positions) == len(labels) == 4 * 3
    for r, (user, cand) in enumerate(zip(users, cands)):
        shown = rows[r * 3 : (r + 1) * 3] - user * 12
        assert shown.tolist() == sorted(cand.tolist(), reverse=True)[:3]
        assert positions[r * 3 : (r + 1) * 3].tolist() == [0, 1, 2]
        # the booked truth is the world's click probability at the shown position
        assert np.allclose(log.truth[r], world.click_probability(int(user), shown, np.arange(3)))
    assert len(log.random) == len(log.oracle) == 4
    assert all(o >= r for o, r in zip(log.oracle, log.random))


def test_hour_ctr_is_the_mean_true_probability_of_the_hours_lists() -> None:
    online, batch = oq.ArmLog(), oq.ArmLog()
    for p in (0.1, 0.3):
        online.truth.append(np.full(2, p))
        batch.truth.append(np.full(2, p / 2))
        online.random.append(0.05)
        online.oracle.append(0.5)
    ctr = oq.hour_ctr(online, batch, 2, 4, 2)  # the second request only
    assert ctr == {"online": pytest.approx(0.3), "batch": pytest.approx(0.15), "random": 0.05, "oracle": 0.5}


@pytest.mark.integration
def test_bench_on_real_redis_reports_every_hour_and_the_online_arm_moves(redis_server, tmp_path: Path) -> None:
    argv = [
        *("--users", "20", "--items", "30", "--candidates", "20", "--hours", "3", "--hour-samples", "1500"),
        *("--gap-window", "500", "--epochs", "1", "--redis", redis_server.url, "--out", str(tmp_path)),
    ]
    assert oq.main(argv) == 0
    report = json.loads((tmp_path / "online_quality.json").read_text())
    assert (tmp_path / "online_quality.png").stat().st_size > 0
    assert [h["hour"] for h in report["hours"]] == [1, 2, 3]
    for h in report["hours"]:
        for key in ("online_auc", "batch_auc", "online_oracle_auc", "online_ctr", "batch_ctr", "random_ctr"):
            assert 0.0 <= h[key] <= 1.0
    assert report["flushes"] > 0
    first, last = report["hours"][0], report["hours"][-1]
    # the online arm learns: its AUC and its served CTR change from the cold hour (no threshold on how much)
    assert last["online_auc"] != first["online_auc"]
    assert last["online_ctr"] != first["online_ctr"]
