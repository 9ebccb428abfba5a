"""The demo's report: report.json, report.md and its plots (loss, AUC, freshness) under one folder."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recsys.demo.config import CHAINS, Report


def quantiles(values: list[float]) -> dict[str, Any]:
    """n, median and p99 (nearest rank on the sorted values) in seconds."""
    import numpy as np

    if not values:
        return {"n": 0, "median_s": None, "p99_s": None}
    arr = np.sort(np.asarray(values, dtype=float))
    return {
        "n": len(values),
        "median_s": float(np.median(arr)),
        "p99_s": float(arr[min(len(arr) - 1, int(np.ceil(0.99 * len(arr))) - 1)]),
        "max_s": float(arr[-1]),
    }


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def write_report(report: Report, out_dir: Path) -> Path:
    """report.json, report.md and the plots (loss.png, auc.png, freshness.png) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    path = out_dir / "report.md"
    path.write_text("\n".join(_markdown(report, _plots(report, out_dir))))
    return path


def _plots(report: Report, out_dir: Path) -> list[tuple[str, str]]:
    """Draw the plots the report has data for; (title, file name) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    history = report.model.get("loss_history") or []
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h[0] for h in history], [h[1] for h in history], lw=1)
        ax.set(
            xlabel="step",
            ylabel="training loss (log loss)",
            title=f"{report.model.get('name')} v{report.model.get('champion_version')}",
        )
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        plots.append(("Training loss", "loss.png"))
    candidates = {
        "oracle (true probabilities)": report.model.get("oracle_auc"),
        "model (eval set)": report.model.get("eval_auc"),
        "random": 0.5,
    }
    aucs = {k: float(v) for k, v in candidates.items() if v is not None}
    fig, ax = plt.subplots(figsize=(6, 3.0))
    colors = {"oracle (true probabilities)": "#4c72b0", "model (eval set)": "#dd8452", "random": "#999999"}
    ax.barh(list(aucs), list(aucs.values()), color=[colors[k] for k in aucs])
    for y, v in enumerate(aucs.values()):
        ax.text(v, y, f" {v:.3f}", va="center")
    ax.set(xlim=(0.4, 1.0), xlabel="AUC", title="AUC: oracle vs model vs random")
    fig.tight_layout()
    fig.savefig(out_dir / "auc.png", dpi=110)
    plt.close(fig)
    plots.append(("AUC", "auc.png"))
    chains = [k for k in CHAINS if report.freshness.get(k, {}).get("n")]
    if chains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ys = range(len(chains))
        med = [report.freshness[k]["median_s"] for k in chains]
        p99 = [report.freshness[k]["p99_s"] for k in chains]
        ax.barh([y + 0.2 for y in ys], med, height=0.4, label="median")
        ax.barh([y - 0.2 for y in ys], p99, height=0.4, label="p99")
        ax.set_yticks(list(ys), [CHAINS[k] for k in chains])
        ax.set(xscale="log", xlabel="seconds (log scale)", title="Freshness")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "freshness.png", dpi=110)
        plt.close(fig)
        plots.append(("Freshness", "freshness.png"))
    return plots


def _markdown(report: Report, plots: list[tuple[str, str]]) -> list[str]:
    """The lines of report.md."""
    c, m, sv = report.counts, report.model, report.serving
    ctr = sv.get("expected_ctr_top10", {})
    lines = [
        f"# recsys demo report ({report.started})",
        "",
        "## Services",
        "",
        *[f"- {k.replace('_', ' ')}: {v}" for k, v in report.urls.items()],
        "",
        "## Counts",
        "",
        "| stage | count |",
        "|---|---|",
        f"| events published (simulator) | {c.get('events_published')} |",
        f"| events in (events topic) | {c.get('events_in')} |",
        f"| malformed injected | {c.get('bad_injected')} |",
        f"| dead-lettered | {c.get('deadlettered')} |",
        f"| impressions / clicks | {c.get('impressions')} / {c.get('clicks')} |",
        f"| samples (impression ⋈ click) | {c.get('samples')} |",
        f"| late clicks | {c.get('late_clicks')} |",
        "",
        "## Training (through Airflow)",
        "",
        f"DAG run `{report.dag.get('run_id')}`: **{report.dag.get('state')}** in {report.dag.get('seconds')} s; "
        f"tasks: {', '.join(f'{k}={v}' for k, v in report.dag.get('tasks', {}).items())}.",
        "",
        f"Champion `{m.get('name')}` v{m.get('champion_version')} (gate: {m.get('gate')}, parameter version "
        f"{m.get('ps_version')}), trained on {m.get('train_samples')} samples, evaluated on {m.get('eval_samples')}.",
        "",
        "| AUC | value |",
        "|---|---|",
        f"| oracle (true click probabilities, all impressions) | {m.get('oracle_auc', float('nan')):.4f} |",
        f"| model (evaluation set, newest share of the window) | {m.get('eval_auc') or float('nan'):.4f} |",
        "",
        "## Serving",
        "",
        f"{sv.get('requests')} requests to `{sv.get('url')}/v1/recommend` (all items as candidates, k=10): "
        f"latency median {_fmt_s(sv.get('latency', {}).get('median_s'))}, p99 "
        f"{_fmt_s(sv.get('latency', {}).get('p99_s'))}.",
        "",
        "Expected CTR of the top 10 for the queried users (simulator's true probabilities): "
        f"served {ctr.get('served', float('nan')):.4f}, random {ctr.get('random', float('nan')):.4f}, "
        f"oracle {ctr.get('oracle', float('nan')):.4f}; served beats random for "
        f"{sv.get('served_beats_random_share', 0):.0%} of users (measured right after the champion was served).",
        "",
        *(
            [
                f"Again after the freshness probes (~1 min later): served "
                f"{sv['settled']['expected_ctr_top10']['served']:.4f}, random "
                f"{sv['settled']['expected_ctr_top10']['random']:.4f}; served beats random for "
                f"{sv['settled']['served_beats_random_share']:.0%} of users; latency median "
                f"{_fmt_s(sv['settled']['latency']['median_s'])}, p99 {_fmt_s(sv['settled']['latency']['p99_s'])}.",
                "",
            ]
            if "settled" in sv
            else []
        ),
        "## Freshness",
        "",
        "| chain | n | median | p99 |",
        "|---|---|---|---|",
        *[
            f"| {label} | {report.freshness.get(k, {}).get('n', 0)} "
            f"| {_fmt_s(report.freshness.get(k, {}).get('median_s'))} "
            f"| {_fmt_s(report.freshness.get(k, {}).get('p99_s'))} |"
            for k, label in CHAINS.items()
        ],
        "",
        "## Stage times",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in report.stage_seconds.items()],
        "",
        *[f"## {title}\n\n![{title}]({path})\n" for title, path in plots],
    ]
    return lines
