"""PNG plots of complete records: latency vs input length, per-token timeline, throughput, accuracy."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from llmbench.rows import CASE_PARAMETERS, PARAMETERS, sort_key, to_row, varying

MAX_TIMELINES = 6
PRECISION_ORDER = ("float32", "bfloat16", "float16", "int8", "int4")
ACCURACY_NAMES = ("acc", "accuracy", "acc_norm", "exact_match", "em", "f1")
LABEL_BASE = ("model", "backend", "precision")
SHORT = {"batch_size": "bs", "num_beams": "beam", "input_tokens": "in", "max_new_tokens": "out",
         "world_size": "ranks", "num_iter": "iter", "num_warmup": "warmup", "git_commit": "commit"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _label(row: dict, extra: list[str]) -> str:
    base = [Path(str(row.get("model"))).name, row.get("backend"), row.get("precision")]
    words = [str(b) for b in base if b]
    words += [f"{SHORT.get(c, c)}={row.get(c)}" for c in extra]
    return " ".join(words)


def _series(rows: list[dict], x: str) -> dict[str, list[dict]]:
    """Rows grouped into lines: one per model/backend/precision and per other parameter that varies."""
    extra = [c for c in varying(rows, CASE_PARAMETERS) if c not in (x, "mode", "dtype", "woq", *LABEL_BASE)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[_label(row, extra)].append(row)
    return {label: sorted(group, key=lambda r: r[x]) for label, group in sorted(groups.items())}


def _line_plot(rows: list[dict], x: str, y: str, xlabel: str, ylabel: str, title: str, path: Path,
               log2_x: bool = False) -> Path | None:
    rows = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    series = _series(rows, x)
    for label, group in series.items():
        ax.plot([r[x] for r in group], [r[y] for r in group], marker="o", label=label)
        for r in group if len(series) <= 3 else []:  # value labels only while they cannot pile up
            ax.annotate(_short(r[y]), (r[x], r[y]), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
    xs = sorted({r[x] for r in rows})
    if log2_x and len(xs) > 1 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(r[y] for r in rows) * 1.12 or 1)  # room for the value labels
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(records: list[dict], path: Path) -> Path | None:
    """Per-token latency of up to MAX_TIMELINES runs: median over iterations, min-max band, first token apart."""
    timed = []
    for record in records:
        lats = [it.get("token_latencies_s") or [] for it in record.get("iterations") or []]
        lats = [lat for lat in lats if lat]
        if lats:
            n = min(len(lat) for lat in lats)
            timed.append((to_row(record), np.array([lat[:n] for lat in lats]) * 1e3))
    if not timed:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = [row for row, _ in timed]
    extra = [c for c in varying(rows, CASE_PARAMETERS) if c not in ("mode", "dtype", "woq", *LABEL_BASE)]
    shown = sorted(timed, key=lambda t: sort_key(t[0]))[:MAX_TIMELINES]
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    highest = max(ms[:, 1:].max() if ms.shape[1] > 1 else 0 for _, ms in shown)
    first_max = max(np.median(ms[:, 0]) for _, ms in shown)
    for i, (row, ms) in enumerate(shown):
        color = f"C{i}"
        median = np.median(ms, axis=0)
        steps = np.arange(1, ms.shape[1] + 1)
        if ms.shape[1] > 1:
            ax.plot(steps[1:], median[1:], color=color, marker=".", label=_label(row, extra))
            ax.fill_between(steps[1:], ms[:, 1:].min(axis=0), ms[:, 1:].max(axis=0), color=color, alpha=0.15)
        ax.scatter([1], [median[0]], marker="*", s=220, color=color, edgecolors="black", zorder=5,
                   label="first token (prefill)" if i == 0 else None)
        ax.annotate(f"first token {median[0]:.1f} ms", (1, median[0]), textcoords="offset points",
                    xytext=(12, -3), fontsize=8, color=color)
    if first_max > 20 * max(highest, 1e-9):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generated token (1 = first token)")
    ax.set_ylabel("latency (ms): median over iterations, band = min-max")
    more = f" ({len(shown)} of {len(timed)} runs)" if len(timed) > len(shown) else ""
    ax.set_title("Per-token latency" + more)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_metric(rows: list[dict]) -> str | None:
    """The accuracy-like metric column of the accuracy rows ('acc', 'acc,none', 'lambada_openai.acc', ...)."""
    names = [c for r in rows for c, v in r.items() if isinstance(v, (int, float)) and c not in PARAMETERS]
    for wanted in (*ACCURACY_NAMES, "perplexity", "ppl"):
        for name in dict.fromkeys(names):
            if name.split(".")[-1].split(",")[0] == wanted:
                return name
    return None


def plot_accuracy(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: one group per precision (dtype or woq scheme), one bar per model/task/backend."""
    rows = [r for r in rows if r.get("mode") == "accuracy"]
    metric = accuracy_metric(rows)
    rows = [r for r in rows if metric and r.get(metric) is not None]
    if not rows:
        return None
    plt = _pyplot()
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    precisions = sorted({r["precision"] for r in rows},
                        key=lambda p: (rank.get(str(p).split("-")[0].split("/")[0], len(rank)), str(p)))
    extra = [c for c in varying(rows, CASE_PARAMETERS) if c not in ("mode", "dtype", "woq", "precision")]
    bars: dict[str, dict] = defaultdict(dict)
    for r in rows:
        name = " ".join(str(r.get(c)) for c in extra) or f"{r.get('task')} {Path(str(r.get('model'))).name}"
        bars[name][r["precision"]] = r[metric]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j, p in enumerate(precisions) if p in values]
        ys = [values[p] for p in precisions if p in values]
        drawn = ax.bar(xs, ys, width=width, label=name, color=f"C{i}")
        ax.bar_label(drawn, fmt="%.4g", fontsize=8)
    ax.set_ylim(0, max(r[metric] for r in rows) * 1.15 or 1)
    ax.set_xticks(range(len(precisions)), [str(p) for p in precisions])
    ax.set_xlabel("precision (dtype, or weight-only quantization)")
    ax.set_ylabel(metric)
    ax.set_title(f"Accuracy vs precision ({metric})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """Every plot the records allow, as PNG files in `out`; returns their paths."""
    rows = [to_row(r) for r in records]
    bench = [r for r in rows if r.get("mode") != "accuracy"]
    made = [
        _line_plot(bench, "input_tokens", "next_token_ms", "input length (tokens)", "next-token latency (ms, mean)",
                   "Next-token latency vs input length", out / "next_token_latency_vs_input.png", log2_x=True),
        plot_timeline([r for r in records if r.get("mode", "benchmark") != "accuracy"], out / "token_timeline.png"),
        _line_plot(bench, "batch_size", "tokens_per_s", "batch size", "throughput (generated tokens/s)",
                   "Throughput vs batch size", out / "throughput_vs_batch_size.png", log2_x=True),
        plot_accuracy(rows, out / "accuracy_vs_precision.png"),
    ]
    return [p for p in made if p is not None]
