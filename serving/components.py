"""What the app serves with: the seam between the production wiring and the tests.

``serving.wiring.build_components`` makes the production set from the settings; tests pass
ready-made ``Components`` (an in-process parameter store, static features) to ``create_app``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from serving.features import FeatureSource
from serving.model import ModelHandle
from serving.params import RowFetcher
from serving.retrieval import PopularityIndex


@dataclass
class Components:
    """Everything the app serves with; ``build_components`` makes the production set."""

    model: ModelHandle
    rows: RowFetcher | None
    features: FeatureSource | None
    index: PopularityIndex | None = None
    follow_stream: bool = True  # feed ``index`` from the events topic
    log_impressions: bool = True
    close: list[Callable[[], None]] = field(default_factory=list)
