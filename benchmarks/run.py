"""The benchmark CLI: `python -m benchmarks.run --help`.

For each case (OP_SPEC §5 shapes and a few more, see cases.py) it times
forward, forward+backward and, for inference shapes, forward under no_grad,
for every available cpoly_kernels backend and for the anchors (eager
reference, its torch.compile, PEFT's Poly layer, one dense LoRA); reports ms,
GB/s, fraction of the floor (floor.py, at the copy bandwidth measured in the
same run), speedups over the anchors and peak extra memory; prints a table and
writes bench.json, bench.csv, table.txt and bench.png to --out.
Without a GPU it runs the tiny shapes on the CPU (a smoke run: its numbers say
nothing about GPU performance).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Optional

import torch

import cpoly_kernels as ck

from . import impls as impls_mod
from . import timing
from .cases import MODES, Case, select, tiny
from .floor import FloorShape, floor_bytes, floor_ms
from .inputs import DTYPES, copies, make_inputs, rotation_count
from .progress import progress
from .report import Row, derive, plot, table, write_files

GRAPH_FLOOR_MS = 0.05  # cases whose forward floor is under 50 us are also timed under CUDA graphs
# Sanity bound on max |out - reference| / max |reference| of the forward (not a parity test: tests/ is).
REL_TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 5e-3}


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--filter", help="comma-separated substrings; keep cases whose name contains one")
    p.add_argument("--tiny", action="store_true", help="scale every case down (automatic without a GPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="dtype of cases that do not fix their own (default bfloat16)")
    p.add_argument("--backends", help="comma-separated cpoly_kernels backends (default: every available one)")
    p.add_argument("--anchors", default=",".join(impls_mod.ANCHORS),
                   help=f"comma-separated anchors (default: {','.join(impls_mod.ANCHORS)}; empty for none)")
    p.add_argument("--compile", choices=("listed", "all", "none"), default="listed",
                   help="torch.compile anchor: on the cases that list it (d4096, t5l-paper-dense), all, none")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: each case's own)")
    p.add_argument("--graphs", choices=("auto", "all", "off"), default="auto",
                   help=f"auto: on CUDA, also time under CUDA-graph replay when the forward floor < "
                        f"{GRAPH_FLOOR_MS * 1e3:.0f} us (OP_SPEC); all: every case (host overhead out of "
                        f"every timing)")
    p.add_argument("--warmup-ms", type=float, help="warm-up per measurement (default 10 on GPU, 5 on CPU)")
    p.add_argument("--rep-ms", type=float, help="time per measurement (default 40 on GPU, 25 on CPU)")
    p.add_argument("--time-budget", type=float,
                   help="seconds; measurements not started by then are skipped and marked so, the table is "
                        "still written (default 270 on GPU, 110 on CPU; 0: none)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on the CPU (default 1: steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "out"), help="output folder (default benchmarks/out)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (absent or broken: recorded as None)
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _floor_shape(case: Case, dtype: torch.dtype) -> FloorShape:
    return FloorShape(
        N=case.N, d_in=case.d_in, d_out=case.d_out, r=case.r, S=case.S_total, E=case.E,
        T=case.T if case.E else 0, P=case.P, elem_bytes=torch.empty(0, dtype=dtype).element_size(),
    )


def _err_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    cases = select(args.cases, args.filter)
    if args.list:
        cases = [tiny(c) for c in cases] if args.tiny else cases
        for c in cases:
            print(f"{c.name:20s} {c.describe()} {c.dtype or args.dtype}\n{'':20s} {c.what}")
        return 0
    if not cases:
        print("no case matches --cases/--filter", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    use_tiny = args.tiny or device.type != "cuda"
    if device.type != "cuda" and not args.tiny:
        print("No GPU: running the tiny shapes on the CPU (a smoke run; it says nothing about GPU performance).")
    if use_tiny:
        cases = [tiny(c) for c in cases]
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.cpu_threads)
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if gpu else 5.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (40.0 if gpu else 25.0)
    only_modes = None if not args.modes else [m.strip() for m in args.modes.split(",")]
    budget = args.time_budget if args.time_budget is not None else (270.0 if gpu else 110.0)
    deadline = time.monotonic() + budget if budget > 0 else None
    started = time.monotonic()

    backend_info = ck.backends()
    for name, info in backend_info.items():
        print(f"backend {name}: " + ("available" if info["available"] else f"unavailable ({info['reason']})"))
    if args.backends:
        backend_names = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backend_names if b not in backend_info]
        if unknown:
            print(f"--backends: unknown {', '.join(unknown)}; known: {', '.join(backend_info)}", file=sys.stderr)
            return 2
    else:
        backend_names = [n for n, i in backend_info.items() if i["available"]]
    anchor_names = [a.strip() for a in args.anchors.split(",") if a.strip()]
    bad = [a for a in anchor_names if a not in impls_mod.ANCHORS]
    if bad:
        print(f"--anchors: unknown {', '.join(bad)}; known: {', '.join(impls_mod.ANCHORS)}", file=sys.stderr)
        return 2

    copy_bps = timing.copy_bandwidth(device, warmup_ms, rep_ms)
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                              f"{torch.get_num_threads()} threads)"
    print(f"device: {dev_name}; copy bandwidth {copy_bps / 1e9:.1f} GB/s (read + written)")

    plan = []  # (case, dtype, impl names, modes, graphs)
    for c in cases:
        dt = DTYPES[c.dtype or args.dtype]
        modes = [m for m in c.modes if only_modes is None or m in only_modes]
        names = impls_mod.planned(c, backend_names, anchor_names, args.compile)
        fwd_floor = floor_ms(floor_bytes(_floor_shape(c, dt), "fwd"), copy_bps)
        graphs = gpu and (args.graphs == "all" or (args.graphs == "auto" and fwd_floor < GRAPH_FLOOR_MS))
        plan.append((c, dt, names, modes, graphs))
    total = sum(len(n) * len(m) * (2 if g else 1) for _, _, n, m, g in plan)

    rows: list[Row] = []
    case_lines: dict[str, str] = {}
    bar = progress(total, "bench")
    try:
        _run_plan(plan, rows, case_lines, copy_bps, backend_names, backend_info, device, args.seed,
                  warmup_ms, rep_ms, deadline, bar, gpu)
    except KeyboardInterrupt:  # Ctrl-C, or `timeout -s INT`: keep what was measured
        bar.write("interrupted: writing what was measured so far")
        _mark([r for r in rows if r.status == "pending"], "skipped", "interrupted", bar)
    bar.close()

    bar.close()

    derive(rows)
    text = table(rows, case_lines)
    print()
    print(text)
    meta = dict(
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        command="python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        device=dev_name, gpu=gpu, tiny=use_tiny, copy_GBps=copy_bps / 1e9,
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        triton=_version("triton"), peft=_version("peft"), cpoly_kernels=ck.__version__, git_commit=_git_commit(),
        backends=backend_info, warmup_ms=warmup_ms, rep_ms=rep_ms, wall_s=time.monotonic() - started,
        cases=case_lines,
    )
    paths = write_files(args.out, meta, rows, text)
    if not args.no_plot:
        title = f"{dev_name}, {'tiny shapes' if use_tiny else 'OP_SPEC shapes'}: fraction of the floor (higher is better)"
        png = plot(args.out, rows, title)
        if png:
            paths.append(png)
    errors = [r for r in rows if r.status == "error"]
    print(f"wrote {', '.join(paths)} in {time.monotonic() - started:.0f} s; {len(errors)} error(s)")
    return 1 if any(r.kind == "backend" for r in errors) else 0


def _run_plan(plan, rows: list[Row], case_lines: dict, copy_bps: float, backend_names: list[str],
              backend_info: dict, device: torch.device, seed: int, warmup_ms: float, rep_ms: float,
              deadline: Optional[float], bar, gpu: bool) -> None:
    """Measure every planned case, appending its rows as it goes (so an interruption keeps them)."""
    for case, dt, names, modes, graphs in plan:
        shape = _floor_shape(case, dt)
        floors = {m: (floor_bytes(shape, m), floor_ms(floor_bytes(shape, m), copy_bps)) for m in MODES}
        case_lines[case.name] = (
            f"{case.describe()} {str(dt).replace('torch.', '')}; floor fwd {floors['fwd'][1]:.4f} ms, "
            f"fwd+bwd {floors['fwdbwd'][1]:.4f} ms"
        )
        timings = ["median", "graph"] if graphs else ["median"]
        planned_rows = [
            Row(case=case.name, mode=mode, timing=how, impl=name, dtype=str(dt).replace("torch.", ""),
                kind="backend" if name in backend_names else "anchor",
                floor_bytes=floors[mode][0], floor_ms=floors[mode][1])
            for name in names for mode in modes for how in timings
        ]
        rows.extend(planned_rows)
        if deadline is not None and time.monotonic() > deadline:
            _mark(planned_rows, "skipped", "time budget spent", bar)
            continue
        try:
            _run_case(case, dt, names, planned_rows, backend_info, device, seed, warmup_ms, rep_ms,
                      deadline, bar, case_lines)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory while building the inputs)
            bar.write(f"{case.name}: {traceback.format_exc()}")
            _mark([r for r in planned_rows if r.status == "pending"], "error", _err_line(e), bar)
        gc.collect()  # the case's inputs, impls and compiled graphs go before the next case
        if gpu:
            try:
                torch.cuda.empty_cache()
            except RuntimeError as e:  # a sticky CUDA error (e.g. a faulting kernel): nothing more can run
                bar.write(f"CUDA is unusable after {case.name}: {_err_line(e)}")
                _mark([r for r in rows if r.status == "pending"], "skipped", "CUDA error in an earlier case", bar)
                return


def _mark(rows: list[Row], status: str, note: str, bar) -> None:
    for r in rows:
        r.status, r.note = status, note
        bar.update()


def _run_case(case: Case, dt: torch.dtype, names: list[str], rows: list[Row], backend_info: dict,
              device: torch.device, seed: int, warmup_ms: float, rep_ms: float, deadline: Optional[float],
              bar, case_lines: dict) -> None:
    """Build the inputs and impls of one case and fill its rows (status "pending" on entry)."""
    torch._dynamo.reset()
    inp = make_inputs(case, device, dt, seed)
    present = int(inp.task_ids.unique().numel())
    if present != case.P:
        raise AssertionError(f"{case.name}: {present} tasks present, the case says {case.P}")
    with torch.no_grad():
        ref = ck.reference.cpoly_lora(inp.x, inp.weights, inp.lora_A, inp.lora_B, **inp.op_kwargs()).float()
    sets = copies(inp, rotation_count(inp, device), requires_grad=True)
    del inp
    case_lines[case.name] += f"; {len(sets)} input copies rotated"
    bar.write(f"== {case.name}: {case_lines[case.name]}")
    tol = REL_TOL[dt]
    for impl in impls_mod.build(case, sets, names, backend_info):
        mine = [r for r in rows if r.impl == impl.name]
        rel_err = failure = None
        if impl.skip is None and (impl.kind == "backend" or impl.name in impls_mod.SAME_FUNCTION):
            try:
                with torch.no_grad():
                    rel_err = _rel_err(impl.fwd(0), ref)
            except Exception as e:  # noqa: BLE001  (reported in the rows)
                if isinstance(e, ck.BackendUnavailable):
                    # the dispatcher refused the call: not an error of the backend
                    impl.skip = "cannot run: " + e.reason
                else:
                    failure = f"forward failed: {_err_line(e)}"
                    bar.write(f"{case.name} {impl.name}: {traceback.format_exc()}")
        if impl.skip is not None:
            _mark(mine, "skipped", impl.skip, bar)
            continue
        if failure is not None:
            _mark(mine, "error", failure, bar)
            continue
        for row in mine:
            bar.describe(f"{case.name} {row.mode} {row.timing} {impl.name}")
            row.rel_err, row.note = rel_err, impl.note
            if deadline is not None and time.monotonic() > deadline:
                row.status, row.note = "skipped", "time budget spent"
            else:
                _measure(row, impl, row.mode, row.timing, sets, device, warmup_ms, rep_ms, bar)
                if row.status == "ok" and rel_err is not None and rel_err > tol:
                    row.status = "error"
                    row.note = f"output differs from the reference: rel err {rel_err:.1e} > {tol:.0e}" + (
                        f"; {row.note}" if row.note else "")
            bar.update()


def _measure(row: Row, impl, mode: str, how: str, sets, device, warmup_ms: float, rep_ms: float, bar) -> None:
    """Time one (impl, mode, timing) into `row` (status "ok"); an exception becomes an error row."""
    row.status = "ok"
    try:
        impl.train_mode(mode != "nograd")
        step = impls_mod.make_step(impl, mode, sets)
        minus = impls_mod.make_step(impl.minus, mode, sets) if impl.minus is not None else None
        if how == "graph":
            for s in (step, minus):
                reason = s and timing.host_sync_reason(s)
                if reason:
                    row.status, row.note = "skipped", reason
                    return
            row.ms = timing.graph_median_ms(step, len(sets), rep_ms)
            if minus is not None:
                minus_ms = timing.graph_median_ms(minus, len(sets), rep_ms)
        else:
            row.first_call_s = timing.first_call_s(step, device)
            row.ms = timing.median_ms(step, device, warmup_ms, rep_ms)
            if minus is not None:
                timing.first_call_s(minus, device)
                minus_ms = timing.median_ms(minus, device, warmup_ms, rep_ms)
            if mode == "fwdbwd" and device.type == "cuda":
                row.peak_mib = timing.peak_extra_mib(step)
        if minus is not None:
            row.note += f" ({row.ms:.4f} - {minus_ms:.4f} ms)"
            row.ms -= minus_ms
            if row.ms <= 0:
                row.status, row.ms = "error", None
                row.note = "the layer timed faster than its base linear alone (noise): " + row.note
    except Exception as e:  # noqa: BLE001  (one failing impl must not stop the run)
        row.status, row.note, row.ms = "error", _err_line(e), None
        bar.write(f"{row.case} {row.mode} {row.timing} {row.impl}: {traceback.format_exc()}")


if __name__ == "__main__":
    sys.exit(main())
