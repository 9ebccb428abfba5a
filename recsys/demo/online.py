"""The demo's online stage: the continuous trainer takes over from the batch champion.

One ``recsys train online`` process starts from the champion (its dense artifact written over the
group's, its rows already the parameter service's), the closed loop goes on for ``online_s``
served by whatever the trainer publishes, and meanwhile ``online_probes`` clicks of never-seen
(user, item) pairs are followed to the first served score that reflects them
(``traffic.freshness``): the click-to-served freshness of the running stack, not of a bench
harness. The trainer's flush journal gives the progressive-validation AUC of every flush and the
guard's decisions.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from core.settings import PROJECT_ROOT, Settings
from recsys.demo.config import ONLINE_CHAIN, ONLINE_STAGES, DemoConfig, DemoError, Report, console, step
from recsys.demo.report import quantiles
from recsys.demo.stages import Background, recsys_command, served_version


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _start_trainer(s: Settings, dense: Path, journal: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RECSYS_ONLINE_JOURNAL_DIR": str(journal), "PYTHONWARNINGS": "ignore"}
    cmd = recsys_command("train", "online", "--dense", str(dense), "--reset-dense")
    with open(log, "wb") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """SIGTERM (the trainer flushes and commits first), SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def journal_summary(journal: Path) -> dict[str, Any]:
    """Flushes by decision, and the (time, AUC, samples) of each judged flush, in order."""
    records = []
    for path in sorted(journal.glob("flush-*.json"), key=lambda p: p.stat().st_mtime):
        try:
            records.append({**json.loads(path.read_text()), "at": path.stat().st_mtime})
        except (OSError, ValueError):
            continue  # a record being written when the stage ended
    decisions: dict[str, int] = {}
    for record in records:
        decisions[record["decision"]] = decisions.get(record["decision"], 0) + 1
    return {
        "flushes": len(records),
        "decisions": decisions,
        "samples": sum(r.get("samples") or 0 for r in records),
        "auc": [[r["at"], r["auc"], r.get("samples") or 0] for r in records if r.get("auc") is not None],
    }


def online_stage(
    s: Settings,
    config: DemoConfig,
    world: Any,
    version: str,
    report: Report,
    truth_path: Path,
    out_dir: Path,
) -> None:
    """Start an online trainer from champion ``version``, run the closed loop on what it publishes, time probes."""
    import httpx

    from core.kafka import commit_group_offsets
    from paramserver import open_store
    from recsys.demo import loop
    from serving.loader import MlflowLoader
    from traffic.freshness import Follower, Probe, ProbeProducer, SampleWatcher, Watcher, served_score
    from training.tracking import TAG_OFFSETS

    step(
        f"online training: `recsys train online` takes over from champion v{version}; {config.online_s:.0f} s of "
        f"closed loop served by what it publishes, {config.online_probes} click → served probes"
    )
    folder = out_dir / "online"
    journal = folder / "journal"
    folder.mkdir(parents=True, exist_ok=True)
    registry = MlflowLoader(s.mlflow, s.serving.model_name, s.serving.model_alias)
    dense = registry.fetch_dense(version, folder / "champion")
    log = folder / "trainer.log"
    base = f"http://127.0.0.1:{s.serving.port}"
    # the group starts where the champion's training window ended: what the champion learned is not trained
    # again, and every sample after its window is (the champion's traffic since, then the online phase's)
    run_id = registry.client.get_model_version(s.serving.model_name, version).run_id
    tags = registry.client.get_run(run_id).data.tags if run_id else {}
    if TAG_OFFSETS not in tags:
        raise DemoError(f"champion v{version} has no training window recorded (run {run_id}, tag {TAG_OFFSETS})")
    window_end = json.loads(tags[TAG_OFFSETS])
    asyncio.run(commit_group_offsets(s.kafka.bootstrap, s.online.group_id, s.kafka.topic_samples, window_end))
    console.print(f"online group {s.online.group_id} starts at the champion's window end {window_end}")
    trainer = _start_trainer(s, dense, journal, log)
    stores = [open_store("redis", [], s.ps), *[open_store("redis", [], s.ps, shards=[url]) for url in s.ps.replicas]]
    watcher = Watcher(stores)
    watcher.start()
    follower = Follower(base, watcher, journal)
    samples = SampleWatcher(s.kafka.bootstrap, s.kafka.topic_samples)
    producer: ProbeProducer | None = None
    traffic: Background | None = None
    started = time.monotonic()
    try:

        def trainer_running() -> bool:
            if trainer.poll() is not None:
                raise DemoError(f"the online trainer exited ({trainer.returncode}): {log.read_text()[-2000:]}")
            return " owns partitions " in log.read_text(errors="replace")

        _wait(trainer_running, config.stage_timeout_s, f"the online trainer to join its group (see {log})")
        _wait(
            lambda: (served_version(base) or "").startswith("online/"),
            config.stage_timeout_s,
            "serving to follow the online trainer's dense weights",
        )
        console.print(f"serving follows the online trainer: {served_version(base)}")
        samples.start()
        _wait(samples.ready.is_set, 60, "the samples reader")
        follower.start()
        producer = ProbeProducer(s.kafka.bootstrap, s.kafka.topic_events)
        traffic = Background(
            "closed loop 'online'",
            lambda: loop.closed_loop_phase(s, config, world, "online", config.online_s, report, truth_path),
        )
        tag = uuid.uuid4().hex[:8]
        rng = random.Random(config.seed)
        spacing = config.online_s * 0.8 / max(config.online_probes, 1)  # probes end before the traffic does
        with httpx.Client(base_url=base, timeout=30) as client:
            for k in range(config.online_probes):
                time.sleep(rng.uniform(0.5, 1.5) * spacing)  # a random phase of the flush cycle
                user, item = f"demo-fresh-{tag}-{k}", f"demo-fresh-item-{tag}-{k}"
                before, _ = served_score(client, user, item)
                probe = Probe(user, item, 0.0, before, replicas=[None] * len(s.ps.replicas))
                probe.published, sid = producer.click(s.kafka.topic_events, user, item)
                samples.watched[sid] = probe
                follower.probes.append(probe)
        follower.wait_done(60.0)
        traffic.result(config.online_s + config.stage_timeout_s)
    finally:
        if producer is not None:
            producer.close()
        follower.stop.set()
        samples.stop.set()
        watcher.stop.set()
        code = _stop(trainer)
        for store in stores:
            store.close()
    probes = follower.probes
    done = [p for p in probes if p.done()]
    stages = [p.stages() for p in done]
    report.freshness[ONLINE_CHAIN] = {
        **quantiles([p.fresh() for p in done]),
        "probes": len(probes),
        "stages": {key: quantiles([st[i] for st in stages]) for i, key in enumerate(ONLINE_STAGES)},
        "how": (
            f"an impression and a click of a never-seen pair on {s.kafka.topic_events}; done when every replica "
            f"holds the flush that trained its sample and /v1/score answers a changed score from rows that new "
            f"(flush every {s.online.flush_interval_s:g}s, serving's version poll {s.serving.param_version_poll_s:g}s)"
        ),
    }
    report.online = {
        "champion_version": version,
        "trainer_exit": code,
        "seconds": round(time.monotonic() - started, 1),
        "served_version_at_end": served_version(base),
        **journal_summary(journal),
        "log": str(log),
    }
    fresh = report.freshness[ONLINE_CHAIN]
    if done:
        console.print(
            f"online freshness, click → on every replica and served: median {fresh['median_s']:.2f} s, p99 "
            f"{fresh['p99_s']:.2f} s ({len(done)} of {len(probes)} probes); flushes {report.online['decisions']}"
        )
    if len(done) < len(probes):
        raise DemoError(
            f"{len(probes) - len(done)} of {len(probes)} online freshness probes were never served with their update "
            f"(see {log})"
        )


def quality_stage(s: Settings, config: DemoConfig, report: Report, out_dir: Path) -> None:
    """Online learning vs the hourly batch loop from a cold start, on this demo's world and one request stream
    for both arms: `bench online_quality`, a simulation (its own Redis parameter service, no Kafka), run with
    the demo's world options and settings; its figures and plot go into the report."""
    folder = out_dir / "online_quality"
    step(
        f"online vs hourly batch from a cold start: {config.quality_hours} simulated hours of "
        f"{config.quality_hour_samples} impressions on this world (`bench online_quality`, a simulation)"
    )
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "online_quality",
        *("--users", str(config.users), "--items", str(config.items), "--seed", str(config.seed)),
        *("--hours", str(config.quality_hours), "--hour-samples", str(config.quality_hour_samples)),
        *("--candidates", str(min(50, config.items)), "--out", str(folder)),
    ]
    try:
        done = subprocess.run(
            cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=config.stage_timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"`bench online_quality` did not finish within {config.stage_timeout_s:.0f}s") from exc
    (folder / "output.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "output.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise DemoError(
            f"`bench online_quality` failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
        )
    result = json.loads((folder / "online_quality.json").read_text())
    keys = ("final_gap_online", "final_gap_batch", "first_within_target_samples", "target_gap", "flushes")
    report.online_quality = {
        **{key: result[key] for key in keys},
        "refused_flushes": result["refused_flushes"],
        "hours": result["hours"],
        "plot": "online_quality/online_quality.png",
        "command": "python " + " ".join(cmd[1:]),
    }
    first = result["first_within_target_samples"]
    console.print(
        f"final-hour gap to the oracle AUC: online {result['final_gap_online']:.4f}, hourly batch "
        f"{result['final_gap_batch']:.4f} (target {result['target_gap']}); online "
        + (f"first within it after {first} samples" if first is not None else "never within it")
        + "; served CTR in the last hour: online "
        + f"{result['hours'][-1]['online_ctr']:.4f}, batch {result['hours'][-1]['batch_ctr']:.4f}"
    )
