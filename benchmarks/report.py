"""Results: one `Row` per (case, mode, timing, impl); derived columns (GB/s,
fraction of the floor, speedups over the anchors of the same case, mode and
timing, hence of the same run); the printed table; JSON, CSV and PNG files."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from .impls import ANCHORS

SPEEDUP_COLUMNS = tuple(f"vs_{a}" for a in ANCHORS)


@dataclass
class Row:
    case: str
    mode: str  # fwd | fwdbwd | nograd
    timing: str  # "median" (do_bench / wall clock) or "graph" (CUDA-graph replay)
    impl: str
    kind: str  # backend | anchor
    dtype: str
    floor_bytes: int
    floor_ms: float
    status: str = "pending"  # ok | skipped | error (pending until measured)
    ms: Optional[float] = None
    gbps: Optional[float] = None  # floor bytes / measured time
    frac_floor: Optional[float] = None  # floor time / measured time
    speedups: dict = field(default_factory=dict)  # anchor -> anchor ms / this ms
    peak_mib: Optional[float] = None  # fwdbwd on CUDA only
    first_call_s: Optional[float] = None
    rel_err: Optional[float] = None  # max |out - reference| / max |reference| (same-function impls)
    note: str = ""


def derive(rows: list[Row]) -> None:
    """Fill GB/s, fraction of floor and the speedups over anchors measured alongside."""
    ok = [r for r in rows if r.status == "ok" and r.ms and r.ms > 0]
    anchor_ms = {(r.case, r.mode, r.timing, r.impl): r.ms for r in ok if r.kind == "anchor"}
    for r in ok:
        r.gbps = r.floor_bytes / (r.ms / 1e3) / 1e9
        r.frac_floor = r.floor_ms / r.ms
        if r.kind == "backend":
            for a in ANCHORS:
                ms = anchor_ms.get((r.case, r.mode, r.timing, a))
                if ms is not None:
                    r.speedups[a] = ms / r.ms


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def table(rows: list[Row], case_lines: dict[str, str], note_width: int = 90) -> str:
    head = ["mode", "timing", "impl", "ms", "GB/s", "floor%", *(f"x{a}" for a in ANCHORS), "peakMiB", "1st s", "err", "note"]
    out = []
    for case in dict.fromkeys(r.case for r in rows):
        body = []
        for r in (r for r in rows if r.case == case):
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
            body.append([
                r.mode, r.timing, r.impl, _f(r.ms, ".4f"), _f(r.gbps, ".4g"),
                _f(None if r.frac_floor is None else 100 * r.frac_floor, ".1f"),
                *(_f(r.speedups.get(a), ".2f") for a in ANCHORS),
                "n/a" if r.peak_mib is None and r.mode == "fwdbwd" and r.status == "ok" else _f(r.peak_mib, ".0f"),
                _f(r.first_call_s, ".2f"), _f(r.rel_err, ".1e"),
                note if len(note) <= note_width else note[: note_width - 3] + "...",
            ])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out.append(f"== {case}: {case_lines.get(case, '')}")
        out.append(line(head))
        out.extend(line(b) for b in body)
        out.append("")
    return "\n".join(out)


def write_files(out_dir: str, meta: dict, rows: list[Row], text: str) -> list[str]:
    """bench.json (meta + rows), bench.csv, table.txt; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    paths.append(path)
    path = os.path.join(out_dir, "bench.csv")
    with open(path, "w", newline="") as f:
        cols = [k for k in asdict(rows[0]) if k != "speedups"] if rows else []
        w = csv.writer(f)
        w.writerow(cols + list(SPEEDUP_COLUMNS))
        for r in rows:
            d = asdict(r)
            w.writerow([d[c] for c in cols] + [r.speedups.get(a) for a in ANCHORS])
    paths.append(path)
    path = os.path.join(out_dir, "table.txt")
    with open(path, "w") as f:
        f.write(text)
    paths.append(path)
    return paths


def plot(out_dir: str, rows: list[Row], title: str) -> Optional[str]:
    """bench.png: fraction of the floor per case, one bar per impl (anchors hatched),
    one panel per (mode, timing); None (with a printed note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot written)")
        return None
    ok = [r for r in rows if r.frac_floor is not None]
    panels = list(dict.fromkeys((r.mode, r.timing) for r in ok))
    if not panels:
        return None
    impls = list(dict.fromkeys(r.impl for r in ok if r.kind == "backend"))
    impls += list(dict.fromkeys(r.impl for r in ok if r.kind == "anchor"))
    kind = {r.impl: r.kind for r in ok}
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.1 * len({r.case for r in ok}) + 3), 3.6 * len(panels)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (mode, timing) in zip(axes[:, 0], panels):
        sel = [r for r in ok if (r.mode, r.timing) == (mode, timing)]
        cases = list(dict.fromkeys(r.case for r in sel))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cases):
                hit = [r.frac_floor for r in sel if r.case == c and r.impl == impl]
                if hit:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(hit[0])
            if xs:
                ax.bar(xs, ys, width, label=impl, color=colors[j % len(colors)],
                       hatch="//" if kind[impl] == "anchor" else None, edgecolor="black", linewidth=0.4)
        ax.set_xlim(-0.5, max(len(cases), 4) - 0.5)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("fraction of floor")
        ax.set_title(f"{mode} ({timing})", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
