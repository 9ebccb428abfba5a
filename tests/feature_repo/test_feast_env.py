"""Importing our Feast modules keeps the process's Prometheus metrics single-process (feature_repo/feast_env.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.settings import PROJECT_ROOT

PROBE = """
import os
import {module}
import prometheus_client.values as values
from prometheus_client import CollectorRegistry, Counter
first, second = CollectorRegistry(), CollectorRegistry()
Counter("phase", "a counter", registry=first).inc(3)
Counter("phase", "a counter", registry=second).inc(1)
variables = ",".join(sorted(k for k in os.environ if k.startswith("PROMETHEUS_MULTIPROC")))
print(values.ValueClass.__name__, variables or "-", second.get_sample_value("phase_total"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["feature_repo.store", "feature_repo.features", "feast"])
def test_importing_feast_through_our_modules_leaves_prometheus_single_process(module: str) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    value_class, variables, second = done.stdout.split()
    if module == "feast":  # Feast alone: the side effect this guards against (two registries share a value)
        assert value_class == "MmapedValue" and variables != "-" and float(second) == 4.0, done.stdout
    else:
        assert (value_class, variables, float(second)) == ("MutexValue", "-", 1.0), done.stdout
