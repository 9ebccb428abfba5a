"""The demo's report: report.json, report.md and its plots (closed loop, loss, freshness) under one folder."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recsys.demo.config import CHAINS, ONLINE_CHAIN, ONLINE_CHAIN_LABEL, ONLINE_STAGES, Report


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
    """report.json, report.md and the plots (closed_loop.png, loss.png, freshness.png) under ``out_dir``."""
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
    if report.closed_loop.get("series"):
        _closed_loop_plot(report, out_dir / "closed_loop.png")
        plots.append(("Served CTR over time, and AUC per training round", "closed_loop.png"))
    labels = {**CHAINS, ONLINE_CHAIN: ONLINE_CHAIN_LABEL}
    chains = [k for k in labels if report.freshness.get(k, {}).get("n")]
    if chains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ys = range(len(chains))
        med = [report.freshness[k]["median_s"] for k in chains]
        p99 = [report.freshness[k]["p99_s"] for k in chains]
        ax.barh([y + 0.2 for y in ys], med, height=0.4, label="median")
        ax.barh([y - 0.2 for y in ys], p99, height=0.4, label="p99")
        ax.set_yticks(list(ys), [labels[k] for k in chains])
        ax.set(xscale="log", xlabel="seconds (log scale)", title="Freshness")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "freshness.png", dpi=110)
        plt.close(fig)
        plots.append(("Freshness", "freshness.png"))
    if report.online.get("auc"):
        _online_plot(report, out_dir / "online.png")
        plots.append(("Online training: progressive-validation AUC per flush, served CTR per phase", "online.png"))
    if report.online_quality.get("plot") and (out_dir / report.online_quality["plot"]).exists():
        plots.append(
            ("Online vs hourly batch from a cold start (simulated on this world)", report.online_quality["plot"])
        )
    return plots


def _online_plot(report: Report, path: Path) -> None:
    """Left: the AUC of every judged flush of the online stage (scored before the trainer learned from it);
    right: the expected served CTR of each closed-loop phase beside random and oracle on the same requests,
    the online phase last: what the batch rounds reached, and what the online trainer kept."""
    import matplotlib.pyplot as plt

    auc = report.online["auc"]
    t0 = auc[0][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    left.plot([a[0] - t0 for a in auc], [a[1] for a in auc], "o-", ms=2, lw=1, label="online AUC (before training)")
    oracle = next((p.get("oracle_auc") for p in report.phases if p["name"] == "online"), None)
    if oracle:
        left.axhline(oracle, ls="--", color="grey", lw=1, label=f"oracle AUC, online phase ({oracle:.3f})")
    left.set(xlabel="seconds since the trainer's first flush", ylabel="AUC", title="progressive validation per flush")
    left.legend(fontsize=7)
    phases = [p for p in report.phases if p["total"].get("served_ctr") is not None]
    ys = range(len(phases))
    right.barh([y + 0.27 for y in ys], [p["total"]["served_ctr"] for p in phases], height=0.27, label="served")
    right.barh(list(ys), [p["total"]["oracle_ctr"] for p in phases], height=0.27, label="oracle")
    right.barh([y - 0.27 for y in ys], [p["total"]["random_ctr"] for p in phases], height=0.27, label="random")
    right.set_yticks(list(ys), [p["name"] for p in phases])
    right.set(xlabel="expected CTR (true probabilities)", title="served CTR per closed-loop phase")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version_label(version: str) -> str:
    """``recsys-dlrm/3@ps41`` -> ``v3``; every online state (``online/v<D>@ps<V>``) -> ``online``; the
    fallback scorer keeps its name."""
    name = version.split("@", 1)[0]
    if name.startswith("online/"):
        return "online"
    return f"v{name.rsplit('/', 1)[1]}" if "/" in name else name


def _by_label(series: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The served-CTR buckets per plotted label, buckets of one label and time merged (weighted by impressions):
    the online trainer's states change every few seconds, one line each would be unreadable."""
    merged: dict[str, dict[tuple[float, float], dict[str, Any]]] = {}
    for line in series:
        if not line["impressions"]:
            continue
        buckets = merged.setdefault(_version_label(line["model_version"]), {})
        key = (line["start"], line["end"])
        if key not in buckets:
            buckets[key] = dict(line)
            continue
        into, n, m = buckets[key], buckets[key]["impressions"], line["impressions"]
        for field_name in ("served_ctr", "oracle_ctr", "random_ctr", "realised_ctr"):
            into[field_name] = (into[field_name] * n + line[field_name] * m) / (n + m)
        into["impressions"], into["clicks"] = n + m, into["clicks"] + line["clicks"]
    return {label: sorted(buckets.values(), key=lambda b: b["start"]) for label, buckets in merged.items()}


def _closed_loop_plot(report: Report, path: Path) -> None:
    """Left: expected CTR per time bucket of each model version's lists, with the random and oracle policies on
    the same requests; right: each training round's evaluation AUC beside the oracle AUC on the same impressions."""
    import matplotlib.pyplot as plt

    series = report.closed_loop["series"]
    t0 = min(line["start"] for line in series)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    by_label = _by_label(series)
    versions = list(by_label)
    for color, label in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], versions, strict=False):
        lines = by_label[label]
        t = [(line["start"] + line["end"]) / 2 - t0 for line in lines]
        left.plot(t, [line["served_ctr"] for line in lines], "o-", color=color, lw=1.5, ms=3, label=f"{label} served")
        left.plot(t, [line["oracle_ctr"] for line in lines], "--", color=color, lw=1, label=f"{label} oracle")
        left.plot(t, [line["random_ctr"] for line in lines], ":", color=color, lw=1, label=f"{label} random")
    left.set(
        xlabel="seconds since the first closed-loop request (gaps: stream catch-up and training)",
        ylabel="expected CTR (true probabilities)",
        title="served vs random vs oracle on the same requests",
    )
    left.legend(fontsize=7, ncol=len(versions))
    rounds = [r for r in report.rounds if r.get("eval_auc") is not None]
    ys = range(len(rounds))
    right.barh([y + 0.2 for y in ys], [r["eval_auc"] for r in rounds], height=0.4, label="model (eval AUC)")
    right.barh([y - 0.2 for y in ys], [r.get("oracle_auc_same_eval") or 0 for r in rounds], height=0.4, label="oracle")
    right.set_yticks(list(ys), [f"round {r['round']}: v{r['model_version']}\n{r['outcome']}" for r in rounds])
    right.set(xlim=(0.5, 1.0), xlabel="AUC on the round's evaluation impressions", title="AUC per training round")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ctr(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _closed_loop_markdown(report: Report) -> list[str]:
    """Phases, rounds, the per-bucket series, the label check and the targets."""
    cl = report.closed_loop
    lines = [
        "## Closed loop",
        "",
        f"Simulated users call `POST /v1/recommend` and click on what serving shows (true probabilities, position "
        f"bias, click delay); serving logs the impressions, the stream worker joins them with the clicks into "
        f"samples. Exploration share of serving: **{cl.get('explore_share')}** (epsilon-greedy: that share of "
        f"lists is a random order; it lowers the served average by design, so exploit lists are shown apart). "
        f"No open-loop warm-up: the first phase is served by the fallback scorer.",
        "",
        "Expected CTR = mean true click probability of the shown items at their positions; random and oracle are "
        "the expected CTR of a random and of the best order of the same request's candidates.",
        "",
        "| phase | s | requests | impressions | clicks | served by | served CTR | exploit | explore "
        "| random | oracle | served/oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in report.phases:
        total, by_policy = phase["total"], phase.get("by_policy", {})
        ratio = total["served_ctr"] / total["oracle_ctr"] if total["served_ctr"] and total["oracle_ctr"] else None
        lines.append(
            f"| {phase['name']} | {phase['duration_s']:.0f} | {phase['requests']} | {phase['impressions']} "
            f"| {phase['clicks']} | {', '.join(dict.fromkeys(_version_label(v) for v in phase['by_model_version']))} "
            f"| {_ctr(total['served_ctr'])} | {_ctr(by_policy.get('exploit', {}).get('served_ctr'))} "
            f"| {_ctr(by_policy.get('explore', {}).get('served_ctr'))} | {_ctr(total['random_ctr'])} "
            f"| {_ctr(total['oracle_ctr'])} | {_ctr(ratio)} |"
        )
    lines += [
        "",
        "### Training rounds (DAG runs through Airflow)",
        "",
        "| round | DAG run | state | s | model | outcome | trained on | eval samples | eval AUC "
        "| oracle AUC (same eval impressions) | truth coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rounds:
        dag = r["dag"]
        lines.append(
            f"| {r['round']} | `{dag['run_id']}` | {dag['state']} | {dag['seconds']} | v{r.get('model_version')} "
            f"| {r.get('outcome')} | {r.get('train_samples')} | {r.get('eval_samples')} | {_ctr(r.get('eval_auc'))} "
            f"| {_ctr(r.get('oracle_auc_same_eval'))} | {_ctr(r.get('eval_truth_coverage'))} |"
        )
    lines.append("")
    lines += [
        f"- round {r['round']} tasks: {', '.join(f'{k}={v}' for k, v in r['dag']['tasks'].items())}"
        + (f"; gate: {r['gate_reason']}" if r.get("gate_reason") else "")
        for r in report.rounds
    ]
    labels = cl.get("labels")
    if labels:
        lines += [
            "",
            f"Labels: {labels['joined_to_truth']} of {labels['samples']} samples on the samples topic joined to the "
            f"simulator's truth by sample id (covering {_ctr(labels['truth_covered'])} of the "
            f"{labels['truth_impressions']} served impressions), {labels['positives_joined']} of them clicks; "
            f"{labels['label_differs_late_click']} are negatives whose click came after the attribution window "
            f"(routed to the late-click topic; {labels['late_clicks']} late clicks in all), "
            f"**{labels['label_mismatches']}** other labels differ from the truth's click. "
            f"Truth: `{cl.get('truth_file')}`.",
        ]
    lines.append("")
    targets = cl.get("targets")
    if targets:
        auc, ctr, margin = targets["auc"], targets["served_ctr"], targets["margin"]
        lines += [
            "### Targets (issue #15)",
            "",
            "| target | measured | met |",
            "|---|---|---|",
            f"| final champion (v{auc['champion_version']}) eval AUC within {auc['limit']} of the oracle AUC on the "
            f"same evaluation impressions | {_ctr(auc['eval_auc'])} vs {_ctr(auc['oracle_auc_same_eval'])} "
            f"(gap {_ctr(auc['gap'])}) | {'yes' if auc['met'] else '**no**'} |",
            f"| served CTR at the end ≥ {ctr['limit']}× the oracle's on the same requests (phase {ctr['phase']}) "
            f"| {_ctr(ctr['served'])} vs {_ctr(ctr['oracle'])} = {_ctr(ctr['ratio'])}×; exploit lists alone "
            f"{_ctr(ctr['served_exploit'])} vs {_ctr(ctr['oracle_exploit'])} = {_ctr(ctr['ratio_exploit'])}× "
            f"| {'yes' if ctr['met'] else '**no**'} |",
            "",
            f"Final champion's served CTR minus the random policy's on the same requests: "
            f"{margin['final_served_minus_random_same_requests']:+.4f}; minus the fallback scorer's served CTR "
            f"in the cold-start phase: {margin['final_served_minus_fallback_served']:+.4f}.",
            "",
        ]
    series = cl.get("series", [])
    if series:
        t0 = min(line["start"] for line in series)
        lines += [
            "### Served CTR per time bucket",
            "",
            "| phase | t (s) | model | impressions | clicks | realised CTR | served (expected) | random | oracle |",
            "|---|---|---|---|---|---|---|---|---|",
            *[
                f"| {line['phase']} | {line['start'] - t0:.0f} | {label} "
                f"| {line['impressions']} | {line['clicks']} | {_ctr(line['realised_ctr'])} "
                f"| {_ctr(line['served_ctr'])} | {_ctr(line['random_ctr'])} | {_ctr(line['oracle_ctr'])} |"
                for label, line in sorted(
                    ((label, line) for label, lines in _by_label(series).items() for line in lines),
                    key=lambda pair: pair[1]["start"],
                )
            ],
            "",
        ]
    return lines


def _online_markdown(report: Report) -> list[str]:
    """The online stage: the trainer that took over from the champion, its flushes, its freshness chain."""
    o, fresh = report.online, report.freshness.get(ONLINE_CHAIN, {})
    if not o:
        return []
    phase = next((p for p in report.phases if p["name"] == "online"), None)
    before = next((p for p in reversed(report.phases) if p["name"] != "online"), None)
    auc = [a[1] for a in o.get("auc", [])]
    oracle = phase.get("oracle_auc") if phase else None
    decisions = ", ".join(f"{n} {decision}" for decision, n in o["decisions"].items())
    lines = [
        "## Online training",
        "",
        f"`recsys train online` started from champion v{o['champion_version']} (its dense artifact written over the "
        f"group's, its rows the parameter service's) and ran {o['seconds']:.0f} s: {o['flushes']} flushes "
        f"({decisions or 'none'}), {o['samples']} samples trained; serving ended on `{o['served_version_at_end']}`. "
        f"Trainer log: `{o['log']}`.",
        "",
    ]
    if auc:
        lines += [
            f"Progressive-validation AUC per flush (each batch scored before the trainer learned from it): first "
            f"{auc[0]:.3f}, median {sorted(auc)[len(auc) // 2]:.3f}, last {auc[-1]:.3f}"
            + (f"; oracle AUC of the online phase {oracle:.3f}." if oracle else "."),
            "",
        ]
    if phase and before:
        lines += [
            f"Served CTR (expected, true probabilities): online phase {_ctr(phase['total']['served_ctr'])} vs "
            f"'{before['name']}' (the batch champion) {_ctr(before['total']['served_ctr'])}; random "
            f"{_ctr(phase['total']['random_ctr'])}, oracle {_ctr(phase['total']['oracle_ctr'])} on the online "
            "phase's requests.",
            "",
        ]
    if fresh.get("n"):
        lines += [
            f"Freshness, {fresh.get('how')}: {fresh['n']} of {fresh.get('probes')} probes, median "
            f"{_fmt_s(fresh['median_s'])}, p99 {_fmt_s(fresh['p99_s'])}.",
            "",
            "| stage | median | p99 |",
            "|---|---|---|",
            *[
                f"| {label} | {_fmt_s(fresh['stages'][key]['median_s'])} | {_fmt_s(fresh['stages'][key]['p99_s'])} |"
                for key, label in ONLINE_STAGES.items()
            ],
            "",
        ]
    return lines


def _quality_markdown(report: Report) -> list[str]:
    """Online vs the hourly batch loop from a cold start (``bench online_quality`` on the demo's world)."""
    q = report.online_quality
    if not q:
        return []
    first = q["first_within_target_samples"]
    return [
        "## Online vs hourly batch from a cold start",
        "",
        f"A simulation on this demo's world (`{q['command']}`): one request stream for both arms, each served "
        "by its own current model from an untrained start, clicks drawn with the world's true probabilities at "
        "the shown positions; the online arm is `recsys train online`'s learner on a Redis parameter service "
        "(flushed every simulated minute), the batch arm retrains each hour on the last hour's samples and serves "
        "the next hour. AUC is each arm's, scored before it learned from the samples, beside the oracle's on the "
        "same samples.",
        "",
        f"Final-hour gap to the oracle AUC: online {q['final_gap_online']:.4f}, hourly batch "
        f"{q['final_gap_batch']:.4f} (target {q['target_gap']}); the online gap (per window) "
        + (f"was first within it after {first} samples" if first is not None else "was never within it")
        + f"; {q['flushes']} flushes, "
        f"{q['refused_flushes']} refused by the guard.",
        "",
        "| hour | samples | online AUC | batch AUC | oracle AUC | online CTR | batch CTR | random | oracle |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {h['hour']} | {h['samples_seen']} | {_ctr(h['online_auc'])} | {_ctr(h['batch_auc'])} "
            f"| {_ctr(h['online_oracle_auc'])} | {_ctr(h['online_ctr'])} | {_ctr(h['batch_ctr'])} "
            f"| {_ctr(h['random_ctr'])} | {_ctr(h['oracle_ctr'])} |"
            for h in q["hours"]
        ],
        "",
    ]


def _markdown(report: Report, plots: list[tuple[str, str]]) -> list[str]:
    """The lines of report.md."""
    m, sv = report.model, report.serving
    ctr = sv.get("expected_ctr_top10", {})
    lines = [
        f"# recsys demo report ({report.started})",
        "",
        "## Services",
        "",
        *[f"- {k.replace('_', ' ')}: {v}" for k, v in report.urls.items()],
        "",
        *_closed_loop_markdown(report),
        "## Final champion",
        "",
        f"`{m.get('name')}` v{m.get('champion_version')} (gate: {m.get('gate')}, parameter version "
        f"{m.get('ps_version')}), trained on {m.get('train_samples')} samples, evaluated on {m.get('eval_samples')}, "
        f"eval AUC {_ctr(m.get('eval_auc'))}.",
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
            for k, label in {**CHAINS, ONLINE_CHAIN: ONLINE_CHAIN_LABEL}.items()
            if k in CHAINS or k in report.freshness
        ],
        "",
        *_online_markdown(report),
        *_quality_markdown(report),
        "## Stage times",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in report.stage_seconds.items()],
        "",
        *[f"## {title}\n\n![{title}]({path})\n" for title, path in plots],
    ]
    return lines
