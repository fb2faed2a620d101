"""Run the CUDA backend over a representative subset of calls, for
compute-sanitizer (memcheck, racecheck) in `gpu_check.sh`:

    compute-sanitizer --tool memcheck --kernel-name kns=cpoly --error-exitcode 1 \\
        python -m benchmarks.sanitize_cuda

Each call runs forward and backward (every gradient) and is compared with the
reference, so a sanitizer run also shows the calls really happened.  Exit
status 1 on a mismatch or when the CUDA backend cannot run here.
"""
from __future__ import annotations

import sys

import torch

import cpoly_kernels as ck

# (name, make-case arguments): padded and packed (empty, one-token, skewed
# segments), both banks, MHR, base=, an odd d (scalar, unaligned paths), r 17.
CASES = [
    ("padded-cpoly-base", dict(b=3, L=37, d_in=64, d_out=48, q=2, r=3, S=4, E=1, T=5, base=True)),
    ("packed-skewed-odd-d", dict(lengths=[0, 1, 300, 2, 0], d_in=1025, d_out=33, q=1, r=17, S=3, E=0, T=1)),
    ("packed-excl-only", dict(lengths=[5, 0, 7], d_in=24, d_out=40, q=4, r=2, S=0, E=2, T=3, base=True)),
]


def _case(b=1, L=1, lengths=None, d_in=8, d_out=8, q=1, r=2, S=2, E=0, T=1, base=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to("cuda", dtype).requires_grad_(True)

    if lengths is not None:
        b, N = len(lengths), sum(lengths)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), device="cuda")
        x, out_shape = randn(N, d_in), (N, d_out)
    else:
        cu, x, out_shape = None, randn(b, L, d_in), (b, L, d_out)
    kw = dict(cu_seqlens=cu, base=randn(*out_shape) if base else None)
    args = [x, None, None, None]
    if S:
        args[1:] = [randn(b, q, S), randn(q, S, d_in // q, r), randn(q, S, r, d_out // q)]
    if E:
        kw.update(task_ids=torch.randint(0, T, (b,), generator=g).cuda(), excl_weights=randn(b, q, E),
                  excl_A=randn(T, q, E, d_in // q, r), excl_B=randn(T, q, E, r, d_out // q))
    return args, kw


def main() -> int:
    report = ck.backends()["cuda"]
    if not report["available"]:
        print(f"the CUDA backend cannot run here: {report['reason']}")
        return 1
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, spec in CASES:
            args, kw = _case(**spec, dtype=dtype)
            leaves = [t for t in args + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            results = []
            for backend in ("cuda", "reference"):
                out = ck.cpoly_lora(*args, **kw, backend=backend)
                dy = torch.ones_like(out)
                results.append([out] + list(torch.autograd.grad(out, leaves, dy)))
            torch.cuda.synchronize()
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            bad = [i for i, (a, b) in enumerate(zip(*results))
                   if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * (1 + b.float().abs().max().item()))]
            print(f"{name} {str(dtype).replace('torch.', '')}: {'ok' if not bad else f'MISMATCH in outputs {bad}'}")
            failures += bool(bad)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
