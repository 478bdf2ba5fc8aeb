"""The results of a run: the table, the JSON file and the chart.

One ratio everywhere: "gather is Nx faster than X" with N = time(X) /
time(gather) for the same batches (above 1: gather is faster; below 1:
slower). The open and convert rows say the same of the store's operation
against its baseline: N = time(baseline) / time(store's)."""

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


def reference(results: list[Result], r: Result) -> Result | None:
    """What a result is compared with: gather (auto) in the same state, K and
    B; for open and convert, the first row of its state (the store's own)."""
    if r.state in ("open", "convert"):
        return next(x for x in results if x.state == r.state)
    if not is_rate(r):
        return None
    return next((x for x in results if (x.state, x.k, x.b, x.method) == (r.state, r.k, r.b, "gather:auto")), None)


def speedup(results: list[Result], r: Result) -> float | None:
    """time(r) / time(its reference): how many times faster gather (or the
    store's open / convert) is than r. None when r did not run."""
    ref = reference(results, r)
    if ref is None or r.skipped or ref.skipped or not r.batch_s or not ref.batch_s:
        return None
    return r.median_s / ref.median_s


def to_json(results: list[Result], d: Data) -> dict[str, Any]:
    rows = [{**asdict(r), "median_s": None if r.skipped else r.median_s,
             "instances_per_s": None if r.skipped or not is_rate(r) else r.per_s(),
             "gather_speedup": speedup(results, r),
             "data_wait_fraction": wait_fraction(r) if r.state.startswith("train") else None}
            for r in results]
    return {"machine": machine(), "store": d.store, "instances": d.n, "column": d.column,
            "gather_speedup": "time(method) / time(gather:auto) in the same state, K and B (open and convert: "
                              "time(row) / time(the store's row)): above 1, gather is that many times faster",
            "results": rows}


def plot(results: list[Result], path: str) -> None:
    """One panel per (state, K, B): how many times faster gather (auto) is
    than each method, time(method) / time(gather), on a log scale.
    ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        if is_rate(r):
            groups.setdefault((r.state, r.k, r.b), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + 0.32 * sum(len(g) for g in groups.values())),
                             squeeze=False)
    for ax, ((state, k, b), rs) in zip(axes[:, 0], groups.items()):
        names = [r.method for r in rs]
        got = [speedup(results, r) for r in rs]
        vals = [v if v is not None else 1.0 for v in got]
        ax.barh(names, [v - 1.0 for v in vals], left=1.0,
                color=["tab:blue" if n.startswith("gather") else "tab:gray" for n in names])
        for y, (v, r) in enumerate(zip(got, rs)):
            ax.text(1.0 if v is None else v, y, " skipped" if v is None else f" {v:.2f}x", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(min(vals + [1.0]) / 1.25, max(vals + [1.0]) * 1.6)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="k", lw=0.5)
        ax.invert_yaxis()
        ax.set_title(f"{state}, K={k}, B={b}: gather (auto) is Nx faster than each, N = time(it) / time(gather)",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: list[Result], d: Data, file: Any = None) -> None:
    """The results, one block per (state, K, B), on ``file`` (stdout)."""
    import sys

    out = file or sys.stdout

    def emit(line: str) -> None:
        print(line, file=out)

    emit("gather speedup = time(method) / time(gather:auto), same batches: gather is that many times faster "
         "(below 1: slower)")
    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.state, r.k, r.b), []).append(r)
    for (state, k, b), rs in groups.items():
        if state in ("open", "convert"):
            emit(f"\n{state} ({d.n} instances, {d.n * d.instance_bytes / 1e9:.2f} GB of features)")
            for r in rs:
                if r.skipped:
                    emit(f"  {r.method:24s} skipped: {r.skipped}")
                    continue
                extra = f", +{r.rss_bytes / 1e6:.2f} MB RSS" if r.rss_bytes is not None else ""
                rate = f", {d.n * d.instance_bytes / r.median_s / 1e9:.2f} GB/s" if state == "convert" else ""
                ratio = "" if r is rs[0] or rs[0].skipped else (
                    f", {rs[0].method} is {r.median_s / rs[0].median_s:.3g}x faster")
                emit(f"  {r.method:24s} {r.median_s * 1e3:10.3f} ms{rate}{extra}{ratio}")
            continue
        if state.startswith("train"):
            emit(f"\n{state}: the loader feeding a simulated training step, K={k}, B={b}")
            for r in rs:
                emit(f"  {r.method:24s} data wait {statistics.median(r.batch_s) * 1e3:7.2f} ms/batch = "
                     f"{100 * wait_fraction(r):5.1f}% of step time")
            continue
        emit(f"\n{state}, K={k}, B={b}, threads={rs[0].threads}")
        later = all(r.later_s for r in rs if not r.skipped)
        opens = any(r.open_s for r in rs)
        emit(f"  {'method':24s} {'inst/s':>10s} {'GB/s':>7s} {'gather speedup':>14s}"
             + (f" {'after 1st batch':>16s}" if later else "") + (f" {'open s':>8s}" if opens else ""))
        for r in rs:
            if r.skipped:
                emit(f"  {r.method:24s} {'skipped: ' + r.skipped}")
                continue
            gbs = r.b * k * d.c * 4 / r.median_s / 1e9
            after = f" {r.b / statistics.median(r.later_s):16.0f}" if later else ""
            if opens:
                after += f" {statistics.median(r.open_s):8.2f}" if r.open_s else f" {'':>8s}"
            ratio = speedup(results, r)
            shown = f"{ratio:13.2f}x" if ratio is not None else f"{'-':>14s}"
            emit(f"  {r.method:24s} {r.per_s():10.0f} {gbs:7.2f} {shown}{after}")
