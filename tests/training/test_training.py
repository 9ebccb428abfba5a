"""Unit tests of the trainer's pure logic: sample parsing, columns, split, working set, model, artifacts.

Plus one in-process single-rank DistributedModelParallel round trip (gloo), which needs no
external service: rows written into the sharded tables come back out, and training moves
only the rows of ids it saw.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from core.metrics import roc_auc
from core.settings import Settings
from feature_repo.contract import Sample
from feature_repo.spec import SPEC, encode_item, encode_user, join_features
from traffic.simulator import SimConfig
from traffic.synthetic import simulate_samples
from training.data import (
    gather_jagged,
    parse_samples,
    partition,
    split_by_time,
    to_columns,
    working_set,
)
from training.model import DLRM, POSITION_FEATURE, ModelConfig, load_dense, save_dense
from training.outcome import JobFailed
from training.params import conflicting_ids, table_configs
from training.quality import eval_metrics, load_truth


def _sample(request: str, item: str, t: float, label: int = 0, genres: tuple[str, ...] = ("drama",)) -> Sample:
    from feature_repo.contract import sample_id

    sparse, dense = join_features(
        encode_user("u1", {"gender": "F", "age": 30}),
        encode_item(item, {"genres": list(genres), "year": 1999}),
        "u1",
        item,
    )
    return Sample(
        sample_id=sample_id(request, item),
        request_id=request,
        user_id="u1",
        item_id=item,
        label=label,
        event_time=t,
        position=2,
        sparse=sparse,
        dense=dense,
    )


def test_parse_samples_rejects_bad_records_with_reasons_and_keeps_good_ones() -> None:
    good = _sample("r1", "i1", 10.0)
    wrong_feature = good.model_dump()
    wrong_feature["sparse"] = {**wrong_feature["sparse"], "unknown": [1]}
    too_many = good.model_dump()
    too_many["sparse"] = {**too_many["sparse"], "gender": [1, 2]}
    import orjson

    raws = [
        b"{not json",
        None,
        orjson.dumps({"sample_id": "x"}),
        orjson.dumps(wrong_feature),
        orjson.dumps(too_many),
        good.to_json(),
        good.to_json(),
        _sample("r2", "i1", 11.0).to_json(),
    ]
    samples, stats = parse_samples(raws)
    assert [s.sample_id for s in samples] == [good.sample_id, _sample("r2", "i1", 11.0).sample_id]
    assert stats.records == 8 and stats.samples == 2 and stats.duplicates == 1
    assert stats.rejected == {"bad_sample": 2, "empty": 1, "spec_mismatch": 2}
    assert all(":" in e for e in stats.examples)


def test_columns_are_time_ordered_and_jagged_gather_matches_samples() -> None:
    samples = [
        _sample("r3", "i3", 30.0, 1, ("drama", "comedy", "war")),
        _sample("r1", "i1", 10.0),
        _sample("r2", "i2", 20.0, 0, ("action",)),
    ]
    cols = to_columns(samples)
    assert cols.event_time.tolist() == [10.0, 20.0, 30.0]
    assert cols.labels.tolist() == [0.0, 0.0, 1.0]
    assert cols.dense.shape == (3, len(SPEC.dense_names) + 1)
    assert cols.dense[0, -1] == pytest.approx(np.log2(3.0))  # position 2
    lengths, values = cols.gather("genres", np.array([2, 0]))
    by_time = sorted(samples, key=lambda s: s.event_time)
    assert lengths.tolist() == [len(by_time[2].sparse["genres"]), len(by_time[0].sparse["genres"])]
    assert values.tolist() == by_time[2].sparse["genres"] + by_time[0].sparse["genres"]
    # single-valued fast path gives the same as the general path
    lens = np.array([1, 1, 1])
    offs = np.array([0, 1, 2, 3])
    vals = np.array([7, 8, 9])
    assert gather_jagged(lens, offs, vals, np.array([2, 0]))[1].tolist() == [9, 7]


def test_split_holds_out_the_newest_fraction() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 0])  # ends with a negative: every sample is settled
    split = split_by_time(labels, 0.2)
    assert split.train.tolist() == list(range(8)) and split.eval.tolist() == [8, 9]
    assert split_by_time(np.array([0]), 0.5).eval.size == 0
    assert split_by_time(np.array([1, 0]), 0.01).eval.tolist() == [1]
    with pytest.raises(ValueError):
        split_by_time(labels, 1.0)


def test_split_leaves_the_unsettled_tail_of_a_window_cut_mid_traffic_out_of_evaluation() -> None:
    # the newest impressions arrived with their clicks; their non-clicks were not emitted yet
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0, 1, 0] + [1, 1, 1, 1])
    split = split_by_time(labels, 0.2)
    assert split.eval.tolist() == [7, 8, 9]  # the newest 20% (of 14) of the samples up to the newest negative
    assert sorted(split.train.tolist()) == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13]  # the tail is trained on
    assert set(labels[split.eval]) == {0, 1}
    # clicks only: nothing is settled, nothing to evaluate (the gate says "not evaluable")
    only_clicks = split_by_time(np.ones(8), 0.2)
    assert only_clicks.eval.size == 0 and only_clicks.train.tolist() == list(range(8))


def test_working_set_maps_ids_to_local_rows_and_marks_trained_ids() -> None:
    samples = [_sample("r1", "i1", 1.0), _sample("r2", "i2", 2.0), _sample("r3", "i9", 3.0)]
    cols = to_columns(samples)
    ws = working_set(cols, np.array([0, 1]))
    items = ws.ids["item_id"]
    assert len(items) == 3 and (np.diff(items) > 0).all()
    assert (items[ws.local["item_id"]] == cols.values["item_id"]).all()
    # the evaluation-only item is pulled (for scoring) but not marked trained, so it is never pushed
    eval_only = cols.values["item_id"][2]
    assert not ws.trained["item_id"][np.searchsorted(items, eval_only)]
    assert ws.trained["item_id"].sum() == 2
    assert ws.rows["user_id"] == 1


def test_partition_gives_equal_disjoint_shares() -> None:
    rows = np.arange(11)
    parts = [partition(rows, 3, r) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert len(np.unique(np.concatenate(parts))) == 9


def test_model_config_validation_and_round_trip() -> None:
    config = ModelConfig.from_spec(SPEC, 8, [16, 8], [16])
    assert config.dense_features[-1] == POSITION_FEATURE
    assert config.multi_valued == ("genres",)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="embedding_dim"):
        ModelConfig.from_spec(SPEC, 8, [16, 4], [16])
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "surprise": 1})


def test_dense_artifact_round_trip_scores_identically(tmp_path) -> None:
    config = ModelConfig.from_spec(SPEC, 4, [8, 4], [8])
    torch.manual_seed(1)
    model = DLRM(config)
    from training.model import dense_state_dict

    path = save_dense(tmp_path / "dense.pt", config, dense_state_dict(model), extra={"ps_version": 7})
    loaded_config, arch, extra = load_dense(path)
    assert loaded_config == config and extra == {"ps_version": 7}
    dense = torch.randn(5, len(config.dense_features))
    pooled = torch.randn(5, len(config.sparse_features), 4)
    torch.testing.assert_close(arch(dense, pooled), model.dense_arch(dense, pooled))
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(pickle.UnpicklingError):
        load_dense(tmp_path / "bad.pt")


def test_dlrm_forward_equals_score_on_pooled_rows() -> None:
    from torchrec import KeyedJaggedTensor

    config = ModelConfig.from_spec(SPEC, 4, [8, 4], [8])
    model = DLRM(config, {name: 5 for name in config.sparse_features})
    lengths = torch.tensor([1, 1] * (len(config.sparse_features) - 1) + [2, 1])  # genres: 2 ids, then 1
    values = torch.tensor([0, 1] * (len(config.sparse_features) - 1) + [2, 3, 4])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(config.sparse_features), values=values, lengths=lengths)
    dense = torch.randn(2, len(config.dense_features))
    tables = {name: model.ebc.embedding_bags[name].weight.detach() for name in config.sparse_features}
    pooled = torch.stack(
        [
            torch.stack(
                [
                    tables[n][0] if n != "genres" else (tables[n][2] + tables[n][3]) / 2,
                    tables[n][1] if n != "genres" else tables[n][4],
                ]
            )
            for n in config.sparse_features
        ],
        dim=1,
    )
    torch.testing.assert_close(torch.sigmoid(model(dense, kjt)), model.score(dense, pooled))


def test_table_configs_follow_the_spec() -> None:
    tables = table_configs(16, 0.05)
    assert [t.name for t in tables] == SPEC.sparse_names
    assert all(t.dim == 16 and t.state_dim == 1 for t in tables)
    assert {t.name: t.capacity for t in tables}["gender"] == 3


def test_conflicting_ids() -> None:
    changed = {"user_id": np.array([1, 2, 3]), "item_id": np.array([9])}
    assert conflicting_ids(changed, {"user_id": np.array([3, 4]), "gender": np.array([1])}) == {"user_id": 1}
    assert conflicting_ids(changed, {"user_id": np.array([5])}) == {}


def test_eval_metrics_and_truth_file(tmp_path) -> None:
    labels = np.array([0, 0, 1, 1])
    m, unfit = eval_metrics(np.array([0.1, 0.4, 0.35, 0.8]), labels)
    assert unfit is None and (m["eval_positives"], m["eval_negatives"]) == (2, 2)
    assert m["eval_auc"] == pytest.approx(0.75)
    assert m["eval_calibration"] == pytest.approx(np.mean([0.1, 0.4, 0.35, 0.8]) / 0.5)
    assert m["eval_log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))
    good = tmp_path / "truth.jsonl"
    good.write_text(
        '{"sample_id": "a", "probability": 0.25}\n\n{"request_id": "r", "item_id": "i", "probability": 0.5}\n'
    )
    truth = load_truth(good)
    from feature_repo.contract import sample_id

    assert truth == {"a": 0.25, sample_id("r", "i"): 0.5}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sample_id": "a"}\n')
    with pytest.raises(JobFailed, match="line 1"):
        load_truth(bad)


def test_synthetic_samples_follow_the_contract_and_carry_truth() -> None:
    synthetic = simulate_samples(SimConfig(users=20, items=15, requests=30, seed=3))
    assert len(synthetic.samples) == 30 * 10
    _, stats = parse_samples(s.to_json() for s in synthetic.samples)
    assert stats.samples == 300 and not stats.rejected
    ids = [s.sample_id for s in synthetic.samples]
    assert synthetic.oracle_auc_of(ids) == pytest.approx(synthetic.oracle_auc)
    labels = np.array([s.label for s in synthetic.samples])
    assert synthetic.oracle_auc == pytest.approx(roc_auc(np.array([synthetic.probability[i] for i in ids]), labels))


@pytest.mark.parametrize("ips_weighting", [False, True])
def test_single_rank_sharded_tables_round_trip_rows_and_train_only_seen_rows(ips_weighting: bool) -> None:
    import torch.distributed as dist

    from training import trainer

    synthetic = simulate_samples(SimConfig(users=30, items=20, requests=40, seed=5))
    # every other sample explored (a small propensity: the clipped weight), the rest without one
    samples = [_with_propensity(s, 0.01 if n % 2 else None) for n, s in enumerate(synthetic.samples)]
    cols = to_columns(samples)
    split = split_by_time(cols.labels, 0.1)
    ws = working_set(cols, split.train)
    config = ModelConfig.from_spec(SPEC, 4, [8, 4], [8])
    hp = trainer.HParams.from_settings(
        Settings().train.model_copy(update={"epochs": 1, "batch_size": 64, "ips_weighting": ips_weighting})
    )
    rank, world, device = trainer.init_distributed("gloo")
    try:
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        assert sharded.owned(0) == list(config.sparse_features)
        rng = np.random.default_rng(0)
        loaded = {}
        for table, n in ws.rows.items():
            w = rng.normal(0, 0.1, (n, 4)).astype(np.float32)
            st = np.full((n, 1), 0.5, np.float32)
            trainer.load_rows(sharded, table, w, st)
            loaded[table] = (w, st)
            got_w, got_st = trainer.read_rows(sharded, table)
            np.testing.assert_array_equal(got_w, w)
            np.testing.assert_array_equal(got_st, st)
        with pytest.raises(ValueError, match="do not fit"):
            trainer.load_rows(sharded, "gender", np.zeros((99, 4), np.float32), np.zeros((99, 1), np.float32))
        result = trainer.train(sharded, cols, ws.local, split.train, hp, rank, world, device)
        assert result.steps == len(result.losses) > 0 and all(np.isfinite(result.losses))
        w_after, st_after = trainer.read_rows(sharded, "item_id")
        moved = np.abs(w_after - loaded["item_id"][0]).max(axis=1) > 0
        # exactly the items of training samples moved (and gained Adagrad state); eval-only items did not
        np.testing.assert_array_equal(moved, ws.trained["item_id"])
        assert (st_after[~moved] == 0.5).all() and (st_after[moved] >= 0.5).all()
        assert (st_after[moved] > 0.5).mean() > 0.5  # some increments are below float32 resolution at 0.5
        probs = trainer.predict(sharded, cols, ws.local, split.eval, 64, device)
        assert probs.shape == (len(split.eval),) and ((probs > 0) & (probs < 1)).all()
    finally:
        dist.destroy_process_group()


def test_runs_whose_job_process_is_gone_are_marked_killed_by_the_next_job(tmp_path) -> None:
    """A SIGKILLed job cannot end its MLflow run; the next job on the host closes it (real MLflow store)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from core.settings import PROJECT_ROOT
    from training.tracking import TAG_ABANDONED, TAG_PROCESS, Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = (
        "import sys, time; from training.tracking import Tracking; "
        "print(Tracking(sys.argv[1], 'jobs').start_run('t', {}), flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", job, uri], stdout=subprocess.PIPE, cwd=PROJECT_ROOT)
    try:
        dead = proc.stdout.readline().decode().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    tracking = Tracking(uri, "jobs")
    alive = tracking.start_run("t", {})  # this test's own process: still running
    host = socket.gethostname()
    reused = tracking.client.create_run(
        tracking.experiment_id, tags={TAG_PROCESS: f"{host}/{os.getpid()}/1"}
    ).info.run_id
    elsewhere = tracking.client.create_run(tracking.experiment_id, tags={TAG_PROCESS: "other-host/1/1"}).info.run_id
    untagged = tracking.client.create_run(tracking.experiment_id).info.run_id

    # the PID of `reused` is alive but belongs to a process started at another time: it is gone too
    assert sorted(tracking.close_abandoned_runs()) == sorted([dead, reused])
    status = {
        run_id: tracking.client.get_run(run_id).info.status for run_id in (dead, reused, alive, elsewhere, untagged)
    }
    assert status == {dead: "KILLED", reused: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    assert "is gone" in tracking.client.get_run(dead).data.tags[TAG_ABANDONED]
    assert tracking.close_abandoned_runs() == []


def test_hparams_have_no_defaults_of_their_own() -> None:
    from dataclasses import asdict

    from training.trainer import HParams

    with pytest.raises(TypeError):
        HParams()  # type: ignore[call-arg]
    train = Settings().train
    assert asdict(HParams.from_settings(train)) == {
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "embedding_lr": train.embedding_lr,
        "dense_lr": train.dense_lr,
        "seed": train.seed,
        "ips_max_weight": None,  # inverse-propensity weighting is off unless asked for
    }
    weighted = train.model_copy(update={"ips_weighting": True})
    assert HParams.from_settings(weighted).ips_max_weight == train.ips_max_weight


def _with_propensity(sample: Sample, propensity: float | None) -> Sample:
    return sample.model_copy(update={"propensity": propensity, "policy": None if propensity is None else "explore"})


def test_ips_weights_are_clipped_inverse_propensities_and_one_where_none_was_logged() -> None:
    from training.data import ips_weights

    samples = [
        _with_propensity(_sample("r1", "i1", 13.0), 0.5),
        _with_propensity(_sample("r2", "i1", 11.0), 0.001),  # 1000 unclipped
        _with_propensity(_sample("r3", "i1", 12.0), None),
        _with_propensity(_sample("r4", "i1", 10.0), 1.0),
    ]
    cols = to_columns(samples)  # time order: r4, r2, r3, r1
    np.testing.assert_array_equal(cols.propensity, np.array([1.0, 0.001, np.nan, 0.5], np.float32))
    np.testing.assert_allclose(ips_weights(cols, 10.0), [1.0, 10.0, 1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(ips_weights(cols, 1e6), [1.0, 1000.0, 1.0, 2.0], rtol=1e-4)


def test_weighted_loss_counts_a_sample_of_weight_w_like_w_copies_and_without_weights_is_the_plain_mean() -> None:
    from training.trainer import weighted_bce

    logits = torch.tensor([0.3, -1.2, 2.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert torch.equal(weighted_bce(logits, labels, None), plain)
    assert torch.allclose(weighted_bce(logits, labels, torch.ones(3)), plain)
    copies = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([0.3, 0.3, 0.3, -1.2, 2.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    )
    assert torch.allclose(weighted_bce(logits, labels, torch.tensor([3.0, 1.0, 1.0])), copies)


def test_train_time_and_serve_time_pooling_agree_on_multi_valued_features_and_empty_bags() -> None:
    """The model's tables (TorchRec MEAN) and mean_pool, which serving and the lifecycle's evaluation
    call on rows they looked up, give the same vectors: equal up to float32 rounding of the summation order."""
    from torchrec import KeyedJaggedTensor

    import serving.ranker
    import training.lifecycle.evaluation
    from training.pooling import mean_pool

    assert serving.ranker.mean_pool is mean_pool and training.lifecycle.evaluation.mean_pool is mean_pool
    config = ModelConfig.from_spec(SPEC, 6, [8, 6], [8])
    torch.manual_seed(3)
    model = DLRM(config, {name: 9 for name in config.sparse_features})
    rng = np.random.default_rng(0)
    lengths = {name: np.array([1, 1, 1, 1, 1, 1]) for name in config.sparse_features}
    lengths["genres"] = np.array([3, 0, 1, 5, 0, 2])  # multi-valued, with empty bags
    values = {name: rng.integers(0, 9, int(n.sum())) for name, n in lengths.items()}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(config.sparse_features),
        values=torch.from_numpy(np.concatenate([values[n] for n in config.sparse_features])),
        lengths=torch.from_numpy(np.concatenate([lengths[n] for n in config.sparse_features])),
    )
    trained = model.ebc(kjt)
    for name in config.sparse_features:
        table = model.ebc.embedding_bags[name].weight.detach().numpy()
        served = mean_pool(table[values[name]], lengths[name])
        np.testing.assert_allclose(served, trained[name].detach().numpy(), rtol=1e-6, atol=1e-7)
    empty = lengths["genres"] == 0
    assert (mean_pool(table[values["genres"]], lengths["genres"])[empty] == 0).all()
    assert (trained["genres"].detach().numpy()[empty] == 0).all()
    assert mean_pool(np.zeros(0, np.float32), np.array([0, 0])).shape == (2, 0)  # a lookup of nothing


def test_job_outcome_json_keeps_the_keys_and_status_strings() -> None:
    import json

    from training.outcome import JobOutcome, JobStatus

    # the JSON of `recsys train --json` and the worker's --result file: tests and the DAG read these strings
    assert [s.value for s in JobStatus] == ["trained", "no_new_samples", "no_valid_samples", "error", "done"]
    empty = JobOutcome(status=JobStatus.NO_NEW_SAMPLES, message="m", offsets={"start": {}, "end": {0: 5}})
    assert json.loads(empty.to_json()) == {
        "status": "no_new_samples",
        "message": "m",
        "offsets": {"start": {}, "end": {"0": 5}},
    }
    trained = JobOutcome(
        status=JobStatus.TRAINED,
        run_id="r",
        model_name="m",
        model_version="3",
        ps_stage="job-r",
        metrics={"x": float("nan")},
    )
    again = JobOutcome.model_validate_json(trained.to_json())
    assert again.status is JobStatus.TRAINED and again.model_version == "3" and np.isnan(again.metrics["x"])
    assert trained.to_dict()["status"] == "trained" and "message" not in trained.to_dict()
    with pytest.raises(ValueError, match="model_version"):
        JobOutcome(status=JobStatus.TRAINED, run_id="r", model_name="m", ps_stage="job-r")
    with pytest.raises(ValueError, match="ps_stage"):
        JobOutcome(status=JobStatus.TRAINED, run_id="r", model_name="m", model_version="3")
    assert JobStatus.NO_VALID_SAMPLES.settled and not JobStatus.ERROR.settled
