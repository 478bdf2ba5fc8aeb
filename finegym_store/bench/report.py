"""The results of a run: the table, the JSON file and the chart."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict
from typing import Any

from .inputs import Data
from .runner import Result, wait_fraction


def machine() -> dict[str, Any]:
    import platform

    from finegym_store import _core

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": _core.max_threads(), "kernel": platform.release(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}


def is_rate(r: Result) -> bool:
    """Whether a result is a batch rate (not a training-loop wait, an open
    or a conversion)."""
    return not r.state.startswith("train") and r.state not in ("open", "convert")


def to_json(results: list[Result], d: Data) -> dict[str, Any]:
    rows = [{**asdict(r), "median_s": None if r.skipped else r.median_s,
             "instances_per_s": None if r.skipped or not is_rate(r) else r.per_s(),
             "data_wait_fraction": wait_fraction(r) if r.state.startswith("train") else None}
            for r in results]
    return {"machine": machine(), "store": d.store, "instances": d.n, "column": d.column, "results": rows}


def plot(results: list[Result], path: str) -> None:
    """One panel per (state, K, B): each method's instances/s as a ratio to gather (auto)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        if is_rate(r):
            groups.setdefault((r.state, r.k, r.b), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + 0.32 * sum(len(g) for g in groups.values())),
                             squeeze=False)
    for ax, ((state, k, b), rs) in zip(axes[:, 0], groups.items()):
        ref = next(r for r in rs if r.method == "gather:auto").per_s()
        names = [r.method for r in rs]
        vals = [0.0 if r.skipped else r.per_s() / ref for r in rs]
        ax.barh(names, vals, color=["tab:blue" if n.startswith("gather") else "tab:gray" for n in names])
        for y, (v, r) in enumerate(zip(vals, rs)):
            ax.text(v, y, " skipped" if r.skipped else f" {v:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.invert_yaxis()
        ax.set_title(f"{state}, K={k}, B={b}: instances/s relative to gather (auto)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: list[Result], d: Data) -> None:
    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.state, r.k, r.b), []).append(r)
    for (state, k, b), rs in groups.items():
        if state in ("open", "convert"):
            print(f"\n{state} ({d.n} instances, {d.n * d.instance_bytes / 1e9:.2f} GB of features)")
            for r in rs:
                if r.skipped:
                    print(f"  {r.method:24s} skipped: {r.skipped}")
                    continue
                extra = f", +{r.rss_bytes / 1e6:.2f} MB RSS" if r.rss_bytes is not None else ""
                rate = f", {d.n * d.instance_bytes / r.median_s / 1e9:.2f} GB/s" if state == "convert" else ""
                print(f"  {r.method:24s} {r.median_s * 1e3:10.3f} ms{rate}{extra}, "
                      f"{r.median_s / rs[0].median_s:.3g}x the time of {rs[0].method}")
            continue
        if state.startswith("train"):
            print(f"\n{state}: the loader feeding a simulated training step, K={k}, B={b}")
            for r in rs:
                print(f"  {r.method:24s} data wait {statistics.median(r.batch_s) * 1e3:7.2f} ms/batch = "
                      f"{100 * wait_fraction(r):5.1f}% of step time")
            continue
        ref = next(r for r in rs if r.method == "gather:auto")
        print(f"\n{state}, K={k}, B={b}, threads={rs[0].threads}")
        later = all(r.later_s for r in rs if not r.skipped)
        opens = any(r.open_s for r in rs)
        print(f"  {'method':24s} {'inst/s':>10s} {'GB/s':>7s} {'vs gather':>9s}"
              + (f" {'after 1st batch':>16s}" if later else "") + (f" {'open s':>8s}" if opens else ""))
        for r in rs:
            if r.skipped:
                print(f"  {r.method:24s} {'skipped: ' + r.skipped}")
                continue
            gbs = r.b * k * d.c * 4 / r.median_s / 1e9
            after = f" {r.b / statistics.median(r.later_s):16.0f}" if later else ""
            if opens:
                after += f" {statistics.median(r.open_s):8.2f}" if r.open_s else f" {'':>8s}"
            print(f"  {r.method:24s} {r.per_s():10.0f} {gbs:7.2f} {r.per_s() / ref.per_s():9.2f}{after}")
