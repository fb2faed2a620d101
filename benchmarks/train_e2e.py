"""End-to-end training benchmark: a small T5 (built from a config, random
weights) with PEFT Poly adapters, trained for a fixed number of steps on a
synthetic multi-task seq2seq stream, once with PEFT's Poly layers as they are
and once patched by `cpoly_kernels.peft.patch(model, backend=...)`.

Same seed, same data, same initial weights for both; reports tokens/s
(steps after --warmup), peak memory (CUDA only) and the per-step loss
difference.  `python -m benchmarks.train_e2e --help`; without a GPU it runs
tiny settings on the CPU (a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

TARGETS = ["q", "k", "v", "o", "wi", "wo"]  # T5's attention and MLP linears


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (automatic without a GPU)")
    p.add_argument("--steps", type=int, help="training steps (default 40 on GPU, 8 tiny)")
    p.add_argument("--warmup", type=int, help="steps left out of tokens/s (default 5 on GPU, 2 tiny)")
    p.add_argument("--batch", type=int, help="examples per step (default 32 on GPU, 8 tiny)")
    p.add_argument("--src-len", type=int, help="input tokens (default 256 on GPU, 32 tiny)")
    p.add_argument("--tgt-len", type=int, help="target tokens (default 64 on GPU, 8 tiny)")
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--skills", type=int, default=8)
    p.add_argument("--splits", type=int, default=1, help="MHR heads q (1: Poly)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), help="autocast dtype (default bf16 on GPU, none on CPU)")
    p.add_argument("--backend", default="auto", help="cpoly_kernels backend for the patched run")
    p.add_argument("--loss-tol", type=float,
                   help="max |loss difference| per step for the curves to match (default 5e-2 under "
                        "bf16/fp16 autocast, 1e-4 without)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on the CPU (default 1: steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    return p.parse_args(argv)


def _settings(args: argparse.Namespace, tiny: bool) -> dict:
    pick = lambda v, gpu, small: v if v is not None else (small if tiny else gpu)  # noqa: E731
    return dict(
        steps=pick(args.steps, 40, 8), warmup=pick(args.warmup, 5, 2), batch=pick(args.batch, 32, 8),
        src_len=pick(args.src_len, 256, 32), tgt_len=pick(args.tgt_len, 64, 8),
        model=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512) if tiny else
        dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64, vocab_size=32128),  # t5-small sizes
    )


def make_batches(s: dict, tasks: int, seed: int, device: torch.device) -> list[dict]:
    """Synthetic tasks: task t maps input token v to (v * (t + 2) + t) mod V' (shifted past the
    special ids), on the first tgt_len tokens.  Learnable, deterministic, different per task."""
    g = torch.Generator().manual_seed(seed)
    V = s["model"]["vocab_size"]
    batches = []
    for _ in range(s["steps"]):
        task_ids = torch.randint(tasks, (s["batch"],), generator=g)
        src = torch.randint(2, V, (s["batch"], s["src_len"]), generator=g)
        head = src[:, : s["tgt_len"]] - 2
        labels = (head * (task_ids[:, None] + 2) + task_ids[:, None]) % (V - 2) + 2
        batches.append(dict(input_ids=src.to(device), attention_mask=torch.ones_like(src).to(device),
                            labels=labels.to(device), task_ids=task_ids.to(device)))
    return batches


def build_model(s: dict, args: argparse.Namespace, device: torch.device):
    from peft import PolyConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(args.seed)
    m = s["model"]
    config = T5Config(**m, num_decoder_layers=m["num_layers"], dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    poly = PolyConfig(task_type="SEQ_2_SEQ_LM", poly_type="poly", r=args.rank, n_tasks=args.tasks,
                      n_skills=args.skills, n_splits=args.splits, target_modules=TARGETS)
    return get_peft_model(model, poly).to(device)


def train(s: dict, args: argparse.Namespace, batches: list[dict], device: torch.device, patched: bool) -> dict:
    model = build_model(s, args, device)
    if patched:
        from cpoly_kernels.peft import patch

        n = patch(model, backend=args.backend)
        if n == 0:
            raise RuntimeError("cpoly_kernels.peft.patch found no PEFT Poly layer to patch")
        print(f"patched {n} PEFT Poly layers (backend {args.backend!r})")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    torch.manual_seed(args.seed + 1)  # the routers' RelaxedBernoulli noise: same draws in both runs
    model.train()
    losses = []
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if i == s["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed = len(batches) - s["warmup"]
    tokens = timed * s["batch"] * (s["src_len"] + s["tgt_len"])
    return dict(
        losses=torch.stack(losses).float().tolist(),
        tokens_per_s=tokens / seconds if timed > 0 else None,
        seconds=seconds,
        peak_extra_mib=(torch.cuda.max_memory_allocated() - mem0) / 2**20 if cuda else None,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    tiny = args.tiny or device.type != "cuda"
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"
    if device.type != "cuda":
        print("No GPU: tiny settings on the CPU (a smoke run; it says nothing about GPU performance).")
        torch.set_num_threads(args.cpu_threads)
    s = _settings(args, tiny)
    if s["warmup"] >= s["steps"]:
        print(f"--warmup ({s['warmup']}) must be below --steps ({s['steps']})", file=sys.stderr)
        return 2
    print(f"model {s['model']}, Poly: {args.tasks} tasks, {args.skills} skills, q={args.splits}, r={args.rank} on "
          f"{', '.join(TARGETS)}; {s['steps']} steps ({s['warmup']} warm-up) of {s['batch']} x "
          f"({s['src_len']} + {s['tgt_len']}) tokens; amp {args.amp}; device {device}")
    batches = make_batches(s, args.tasks, args.seed, device)

    results = {"unpatched": train(s, args, batches, device, patched=False)}
    try:
        import cpoly_kernels.peft  # noqa: F401
    except ImportError as e:
        print(f"cpoly_kernels.peft is not importable ({e}): only the unpatched run was made", file=sys.stderr)
        patched_ok = False
    else:
        results["patched"] = train(s, args, batches, device, patched=True)
        patched_ok = True

    print(f"{'run':10s} {'tokens/s':>12s} {'peak MiB':>10s} {'final loss':>11s}")
    for name, r in results.items():
        peak = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"{name:10s} {r['tokens_per_s']:12.0f} {peak:>10s} {r['losses'][-1]:11.5f}")
    summary = {}
    if patched_ok:
        diffs = [abs(a - b) for a, b in zip(results["unpatched"]["losses"], results["patched"]["losses"])]
        tol = args.loss_tol if args.loss_tol is not None else (1e-4 if args.amp == "none" else 5e-2)
        summary = dict(
            loss_abs_diff_per_step=diffs, max_loss_abs_diff=max(diffs), loss_tol=tol, losses_match=max(diffs) <= tol,
            speedup=results["patched"]["tokens_per_s"] / results["unpatched"]["tokens_per_s"],
        )
        print("loss |unpatched - patched| per step: " + " ".join(f"{d:.2e}" for d in diffs))
        print(f"max {summary['max_loss_abs_diff']:.3e} -> loss curves {'match' if summary['losses_match'] else 'DIFFER'}"
              f" (tolerance {tol:.0e}); patched/unpatched tokens/s {summary['speedup']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_e2e.json")
    with open(path, "w") as f:
        json.dump(dict(settings=s, args=vars(args), device=str(device), torch=torch.__version__,
                       results=results, **summary), f, indent=1)
    print(f"wrote {path}")
    return 0 if patched_ok and summary["losses_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
