"""The loop of one feature declaration, in one process: profile events -> stream worker -> samples ->
batch trainer -> parameter store -> serving app -> scores.

Run as ``RECSYS_FEATURE_SPEC=<name or path> python -m tests.feature_repo.declared_loop N_USERS N_ITEMS``
(``test_declared_loop.py`` does): the spec is chosen once per process, as in a deployment, so each
declaration gets a process of its own. The events carry raw attributes made from the declaration
itself (vocabulary values and aliases, open-ended strings for hashed columns, numbers around each
numeric feature's centre); clicks follow a hidden taste of user attributes for item attributes, so
there is something to learn. Prints one JSON object with what the test checks.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from typing import Any

import orjson


def _raw_value(feature: Any, rng: random.Random) -> Any:
    """A raw attribute value for a declared feature, missing one time in ten."""
    if rng.random() < 0.1:
        return None
    kind = getattr(feature, "kind", "numeric")  # dense features have no kind: they are all numeric
    if kind == "vocab":
        choices = list(feature.vocabulary) + [alias for alias, _ in feature.aliases] + ["not-in-the-vocabulary"]
        value = rng.choice(choices)
        return [rng.choice(choices) for _ in range(rng.randint(1, 3))] if feature.multi_valued else value.upper()
    if kind == "hash":
        value = f"{rng.randrange(6)}-{feature.name}"  # distinct even as a prefix
        return [value] if feature.multi_valued else rng.choice([value, f" {value.upper()} "])
    if kind == "bucketize":
        low, high = feature.boundaries[0], feature.boundaries[-1]
        return int(rng.uniform(max(0.0, low / 2), high * 1.2))
    # numeric: integers around the centre (the MovieLens contract types age and year as integers)
    centre = rng.gauss(feature.center, feature.scale)
    return max(0, int(math.expm1(centre) if feature.transform == "log1p" else centre))


def _attributes(spec: Any, entity: str, rng: random.Random) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for feature in (*spec.sparse, *spec.dense):
        if feature.entity == entity and feature.source and feature.source not in attrs:
            value = _raw_value(feature, rng)
            if value is not None:
                attrs[feature.source] = value
    return attrs


def main(n_users: int, n_items: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.distributed as dist
    from fastapi.testclient import TestClient

    from bench.learning_curve import push_trained
    from core.metrics import roc_auc
    from core.settings import Settings
    from feature_repo.spec import SPEC, hash_id
    from paramserver import open_store
    from serving.app import create_app
    from serving.components import Components
    from serving.features import StaticFeatures
    from serving.loader import DLRMScorer
    from serving.model import ModelHandle
    from serving.params import RowFetcher
    from serving.retrieval import PopularityIndex
    from streaming.processor import Processor
    from streaming.records import DictKV, ProcessorConfig, RawRecord
    from tests.serving.test_serving import MemoryReader
    from training import trainer
    from training.data import Split, parse_samples, to_columns, working_set
    from training.model import DenseArch, ModelConfig, dense_state_dict
    from training.params import table_configs

    torch.set_num_threads(1)
    rng = random.Random(18)
    now = time.time()
    users = {f"u{i}": _attributes(SPEC, "user", rng) for i in range(n_users)}
    items = {f"i{j}": _attributes(SPEC, "item", rng) for j in range(n_items)}
    user_keys = [f for f in SPEC.sparse if f.entity == "user" and f.kind != "id"]
    item_keys = [f for f in SPEC.sparse if f.entity == "item" and f.kind != "id"]

    def taste(user: str, item: str) -> float:
        # a hidden liking of the user's first attribute for the item's first one: learnable from features
        u = str(users[user].get(user_keys[0].source)) if user_keys else user
        i = str(items[item].get(item_keys[0].source)) if item_keys else item
        return hash_id("taste", f"{u}|{i}", 16) / (1 << 16)

    events: list[dict[str, Any]] = []
    for n, (user, attrs) in enumerate(users.items()):
        events.append({"event_type": "user_profile", "event_id": f"up{n}", "timestamp": now - 900, "user_id": user})
        events[-1].update(attrs)
    for n, (item, attrs) in enumerate(items.items()):
        events.append({"event_type": "item_profile", "event_id": f"ip{n}", "timestamp": now - 900, "item_id": item})
        events[-1].update(attrs)
    pairs = [(user, item) for user in users for item in rng.sample(list(items), 6)]
    clicked = 0
    for k, (user, item) in enumerate(pairs):
        t = now - 600 + k * 0.01
        base = {"request_id": f"r{k}", "user_id": user, "item_id": item}
        events.append({"event_type": "impression", "event_id": f"im{k}", "timestamp": t, "position": 0, **base})
        if rng.random() < (0.7 if taste(user, item) > 0.6 else 0.08):
            clicked += 1
            events.append({"event_type": "click", "event_id": f"cl{k}", "timestamp": t + 1, **base})
    # an impression far past the others' windows closes them all (the negatives are emitted)
    events.append(
        {"event_type": "impression", "event_id": "closer", "timestamp": now - 10, "position": 0}
        | {"request_id": "closer", "user_id": "u0", "item_id": "i0"}
    )
    records = [RawRecord(0, n, None, orjson.dumps({"schema_version": 1, **e})) for n, e in enumerate(events)]

    # the stream worker's processor: validation, encoding of the declared attributes, the join
    settings = Settings().override(stream={"attribution_window_s": 30.0})
    processor = Processor(ProcessorConfig.from_settings(settings), DictKV(), DictKV(), DictKV(), DictKV())
    result = processor.process_batch(records)
    dead = [o for o in result.out if o.kind == "deadletter"]
    samples, stats = parse_samples([o.value for o in result.out if o.kind == "samples"])
    encoded_users = {u: e for u, (e, _) in result.users.items()}
    encoded_items = {i: e for i, (e, _) in result.items.items()}

    # the batch trainer, as the job trains a window (single rank, tables pulled from the parameter store)
    train_settings = settings.train.model_copy(update={"epochs": 4, "batch_size": 64})
    hp = trainer.HParams.from_settings(train_settings)
    config = ModelConfig.of_settings(train_settings)
    store = open_store("memory", table_configs(train_settings.embedding_dim, train_settings.init_std))
    columns = to_columns(samples)
    everything = np.arange(len(samples))
    ws = working_set(columns, everything)
    rank, world, device = trainer.init_distributed("gloo")
    try:
        sharded = trainer.build_sharded(config, ws.rows, hp, device)
        for table in sharded.owned(0):
            rows = store.pull(table, ws.ids[table])
            trainer.load_rows(sharded, table, rows.weights, rows.state)
        trained = trainer.train(sharded, columns, ws.local, Split(everything, everything).train, hp, 0, 1, device)
        predicted = trainer.predict(sharded, columns, ws.local, everything, 4096, device)
        push_trained(sharded, ws, store)  # the trained rows, as the job pushes them after training
        arch = DenseArch(config)
        arch.load_state_dict(dense_state_dict(sharded.model))
        arch.eval()
    finally:
        dist.destroy_process_group()

    # serving: the app scores the same pairs with the trained dense part over the store's rows
    scorer = DLRMScorer(arch, config, "declared/1")
    rows = RowFetcher(MemoryReader(store), max_rows=100_000, poll_s=0.05)
    components = Components(
        model=ModelHandle(None, lambda: scorer),
        rows=rows,
        features=StaticFeatures(encoded_users, encoded_items),
        index=PopularityIndex(),
        follow_stream=False,
        log_impressions=False,
    )
    served: list[float] = []
    with TestClient(create_app(settings.override(serving={"max_candidates": 500}), components)) as client:
        by_user: dict[str, list[str]] = {}
        for s in samples:
            by_user.setdefault(s.user_id, []).append(s.item_id)
        scores: dict[tuple[str, str], float] = {}
        for user, its in by_user.items():
            r = client.post("/v1/score", json={"pairs": [{"user_id": user, "item_id": i} for i in its]})
            if r.status_code != 200:
                raise RuntimeError(f"/v1/score answered {r.status_code}: {r.text}")
            body = r.json()
            for pair in body["scores"]:
                scores[(pair["user_id"], pair["item_id"])] = pair["score"]
        # the trainer's columns are time-ordered: line the served scores up with them
        by_id = {s.sample_id: s for s in samples}
        served = [scores[(by_id[i].user_id, by_id[i].item_id)] for i in columns.sample_ids]
        ranked = client.post("/v1/recommend", json={"user_id": "u1", "k": 3, "candidate_item_ids": list(items)[:20]})
        ranked.raise_for_status()
        model_version = body["model_version"]

    labels = np.asarray(columns.labels)
    return {
        "spec": SPEC.name,
        "spec_hash": SPEC.spec_hash(),
        "sparse": SPEC.sparse_names,
        "dense": SPEC.dense_names,
        "events": len(events),
        "deadletters": [orjson.loads(d.value).get("event_id") for d in dead],
        "samples": stats.samples,
        "rejected": stats.rejected,
        "clicks": clicked,
        "positives": int(labels.sum()),
        # per declared feature: how many distinct ids the samples carry (0 = missing only)
        "distinct_ids": {name: len({i for s in samples for i in s.sparse[name]} - {0}) for name in SPEC.sparse_names},
        "distinct_dense": {name: len({round(s.dense[name], 9) for s in samples}) for name in SPEC.dense_names},
        "model_sparse": list(config.sparse_features),
        "model_dense": list(config.dense_features),
        "tables": sorted(t.name for t in table_configs(4, 0.01)),
        "losses": [float(x) for x in trained.losses],
        "trained_auc": roc_auc(predicted, labels),
        "served_auc": roc_auc(np.array(served), labels),
        "max_served_vs_trained": float(np.max(np.abs(np.array(served) - predicted))),
        "model_version": model_version,
        "recommended": [x["item_id"] for x in ranked.json()["items"]],
    }


def run_with_spec(declaration: str, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` under RECSYS_FEATURE_SPEC=declaration: a spec is chosen once per process."""
    from core.settings import PROJECT_ROOT

    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "RECSYS_FEATURE_SPEC": declaration},
        capture_output=True,
        text=True,
        timeout=600,
    )


if __name__ == "__main__":
    out = main(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.write("RESULT " + orjson.dumps(out).decode() + "\n")
