"""Labelled samples straight from the traffic simulator, for tests, benchmarks and demos.

The stream worker (streaming/) is what turns real events into samples; this helper
short-cuts it with the simulator's ground truth: every impression becomes one ``Sample``
with the features of its user and item encoded by the feature spec and the label the
simulator drew. The true click probability of each sample is kept for the oracle AUC.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from core.metrics import roc_auc
from feature_repo.contract import Sample, sample_id
from feature_repo.spec import EncodedEntity, encode_item, encode_user, join_features
from traffic.simulator import SimConfig, Simulation


@dataclass
class SyntheticSamples:
    samples: list[Sample]
    probability: dict[str, float]  # sample id -> true click probability
    oracle_auc: float  # AUC of the true probabilities over all samples

    def oracle_auc_of(self, sample_ids: list[str]) -> float:
        """The oracle AUC over a subset of the samples (e.g. an evaluation set)."""
        import numpy as np

        by_id = {s.sample_id: s.label for s in self.samples}
        scores = np.array([self.probability[i] for i in sample_ids])
        labels = np.array([by_id[i] for i in sample_ids])
        return roc_auc(scores, labels)


def simulate_samples(config: SimConfig) -> SyntheticSamples:
    """Run the simulator and turn its impressions into samples (label = the simulated click)."""
    sim = Simulation(config)
    users: dict[str, EncodedEntity] = {}
    items: dict[str, EncodedEntity] = {}
    impressions: list[dict[str, Any]] = []
    for record in sim.records():
        if record.kind == "user_profile":
            event = orjson.loads(record.value)
            users[event["user_id"]] = encode_user(event["user_id"], event)
        elif record.kind == "item_profile":
            event = orjson.loads(record.value)
            items[event["item_id"]] = encode_item(event["item_id"], event)
        elif record.kind == "impression":
            impressions.append(orjson.loads(record.value))
    # the simulator appends one Truth per impression, in emission order
    assert len(impressions) == len(sim.truth)
    samples: list[Sample] = []
    probability: dict[str, float] = {}
    for event, truth in zip(impressions, sim.truth):
        sparse, dense = join_features(
            users.get(event["user_id"]), items.get(event["item_id"]), event["user_id"], event["item_id"]
        )
        sid = sample_id(event["request_id"], event["item_id"])
        samples.append(
            Sample(
                sample_id=sid,
                request_id=event["request_id"],
                user_id=event["user_id"],
                item_id=event["item_id"],
                label=1 if truth.clicked else 0,
                event_time=float(event["timestamp"]),
                position=int(event["position"]),
                sparse=sparse,
                dense=dense,
            )
        )
        probability[sid] = truth.probability
    return SyntheticSamples(samples, probability, sim.oracle_auc())


def write_truth(path: str | Path, synthetic: SyntheticSamples) -> None:
    """The truth file `recsys train --truth` reads: one JSON object per line (sample_id, probability)."""
    with open(path, "wb") as handle:
        for sid, p in synthetic.probability.items():
            handle.write(orjson.dumps({"sample_id": sid, "probability": p}) + b"\n")


def produce_samples(bootstrap: str, topic: str, samples: list[Sample], extra: list[bytes] | None = None) -> int:
    """Publish the samples (keyed by user id) and any extra raw records to ``topic``; returns the count."""
    from core.kafka import publish

    records = [(s.user_id.encode(), s.to_json()) for s in samples] + [(b"raw", raw) for raw in extra or []]
    return asyncio.run(publish(records, bootstrap, topic)).records
