"""The publishing guard: progressive validation of each flush, judged against the trailing level.

Every batch is scored before the trainer learns from it, so the scores of a flush's batches
are an honest held-out measure of the model that is about to be published (progressive
validation, as in McMahan et al., "Ad Click Prediction: a View from the Trenches"). The guard
compares a flush's AUC, log loss and calibration with the average of the last published
flushes (the trailing level) and refuses a flush that falls behind by more than a margin.

While the guard refuses, publishing is halted; the trailing level stays where it was before
the fault, so publishing resumes exactly when a flush measures up to the pre-fault level again.
Pure logic: no I/O, no torch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from core.metrics import roc_auc
from core.settings import OnlineTrainingSettings

_EPS = 1e-7  # keeps log loss finite for a score of exactly 0 or 1


@dataclass(frozen=True)
class FlushQuality:
    """Progressive-validation quality of the batches of one flush (scored before training on them)."""

    samples: int
    positives: int
    auc: float  # NaN with one class only
    log_loss: float
    calibration: float  # mean score / click rate; NaN without clicks

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> FlushQuality:
        scores = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
        labels = np.asarray(labels, dtype=np.float64)
        if len(scores) != len(labels):
            raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
        n, positives = len(labels), int(labels.sum())
        if n == 0:
            return cls(0, 0, math.nan, math.nan, math.nan)
        log_loss = float(-np.mean(labels * np.log(scores) + (1.0 - labels) * np.log(1.0 - scores)))
        calibration = float(scores.mean() / labels.mean()) if positives else math.nan
        return cls(n, positives, roc_auc(scores, labels), log_loss, calibration)

    @property
    def judgeable(self) -> bool:
        return 0 < self.positives < self.samples and math.isfinite(self.auc)


class Decision(StrEnum):
    PUBLISH = "publish"  # judged good (or warming up): its deltas go to the parameter service
    REFUSE = "refuse"  # judged bad: nothing of it is published; publishing halts
    HOLD = "hold"  # too small to judge while halted: not published, the halt goes on


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    trailing_auc: float  # the level it was compared with (NaN while warming up)

    @property
    def publish(self) -> bool:
        return self.decision is Decision.PUBLISH


@dataclass(frozen=True)
class GuardConfig:
    margin: float
    log_loss_margin: float
    max_calibration: float
    trailing: int
    warmup: int
    min_samples: int

    @classmethod
    def from_settings(cls, online: OnlineTrainingSettings) -> GuardConfig:
        return cls(
            margin=online.guard_margin,
            log_loss_margin=online.guard_log_loss_margin,
            max_calibration=online.guard_max_calibration,
            trailing=online.guard_trailing_flushes,
            warmup=online.guard_warmup_flushes,
            min_samples=online.guard_min_samples,
        )


class Guard:
    """Decides, flush by flush, whether a flush may be published; remembers the published ones' quality."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._history: deque[FlushQuality] = deque(maxlen=config.trailing)
        self.halted = False

    def trailing(self) -> tuple[float, float]:
        """The trailing AUC and log loss (means over the last published, judged flushes); NaN when none."""
        if not self._history:
            return math.nan, math.nan
        return (
            float(np.mean([q.auc for q in self._history])),
            float(np.mean([q.log_loss for q in self._history])),
        )

    def judge(self, quality: FlushQuality) -> Verdict:
        cfg = self.config
        auc, log_loss = self.trailing()
        if quality.samples < cfg.min_samples or not quality.judgeable:
            # too little evidence either way: carry on as we were
            if self.halted:
                return Verdict(Decision.HOLD, f"halted; {quality.samples} samples are too few to judge", auc)
            return Verdict(Decision.PUBLISH, f"{quality.samples} samples: too few to judge, not halted", auc)
        if len(self._history) < cfg.warmup:
            self._history.append(quality)
            return Verdict(Decision.PUBLISH, f"warming up ({len(self._history)}/{cfg.warmup} flushes)", auc)
        problems = []
        if quality.auc < auc - cfg.margin:
            problems.append(f"AUC {quality.auc:.4f} < trailing {auc:.4f} - margin {cfg.margin}")
        if quality.log_loss > log_loss + cfg.log_loss_margin:
            problems.append(f"log loss {quality.log_loss:.4f} > trailing {log_loss:.4f} + margin {cfg.log_loss_margin}")
        if not 1.0 / cfg.max_calibration <= quality.calibration <= cfg.max_calibration:
            problems.append(f"calibration {quality.calibration:.3f} beyond x{cfg.max_calibration}")
        if problems:
            self.halted = True
            return Verdict(Decision.REFUSE, "; ".join(problems), auc)
        resumed = self.halted
        self.halted = False
        self._history.append(quality)
        reason = f"AUC {quality.auc:.4f} vs trailing {auc:.4f}" + ("; publishing resumes" if resumed else "")
        return Verdict(Decision.PUBLISH, reason, auc)
