#!/usr/bin/env python3
"""PyTorch <-> moe-routers through safetensors (docs/saving.md).

Builds a router nn.Linear(D, E, bias=False) and E SwiGLU experts in PyTorch, writes their
weights under the library's names and layout, with an input x, using the standard library only
(struct, json); runs the C++ program tests/io/torch_interop.cpp on that file; reads back its
logits and layer output y; and compares them with the same computation in PyTorch.

    /usr/bin/python3 torch_interop.py <path of the torch_interop binary>

Exit status: 0 on agreement, 1 on a mismatch or a bad output file, 77 when torch cannot be
imported (ctest then reports the test as skipped, not passed).
"""
import os
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError as error:  # a machine without torch: skipped, not passed
    print(f"torch_interop: skipped, torch cannot be imported ({error})")
    sys.exit(77)

from safetensors_format import read_safetensors, write_safetensors  # noqa: E402 (after torch)

T, D, E, H, K = 64, 32, 8, 48, 2
SEED = 20240611

# Comparison tolerance, as forward_tol in tests/support.hpp: a few float roundings per term of
# the longest reduction that feeds a value, relative to the values' magnitude. The logits are
# one length-D dot product; y is x Wg / x Wu (length D), then h Wd (length H).
EPS = torch.finfo(torch.float32).eps


def forward_tol(n):
    return 8 * n * EPS


# ---- the model in PyTorch --------------------------------------------------------------------

def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    torch.manual_seed(SEED)
    router = torch.nn.Linear(D, E, bias=False)
    gate = [torch.nn.Linear(D, H, bias=False) for _ in range(E)]
    up = [torch.nn.Linear(D, H, bias=False) for _ in range(E)]
    down = [torch.nn.Linear(H, D, bias=False) for _ in range(E)]
    x = torch.randn(T, D)

    # The library's layout: y = x W for a [D, H] block, so expert e's block is its Linear's
    # weight transposed, stacked by expert: w_gate / w_up [E*D, H], w_down [E*H, D].
    params = {
        "router.weight": router.weight,  # [E, D], as nn.Linear stores it: logits = x W^T
        "experts.w_gate": torch.cat([g.weight.t() for g in gate]),
        "experts.w_up": torch.cat([u.weight.t() for u in up]),
        "experts.w_down": torch.cat([d.weight.t() for d in down]),
    }

    with tempfile.TemporaryDirectory() as tmp:
        in_path = os.path.join(tmp, "in.safetensors")
        out_path = os.path.join(tmp, "out.safetensors")
        write_safetensors(in_path, {**params, "x": x}, {"producer": "torch_interop.py"})
        run = subprocess.run([binary, in_path, out_path], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"torch_interop: the C++ program failed ({run.returncode}):\n{run.stdout}{run.stderr}")
            return 1
        result = read_safetensors(out_path)

    # The reference, in double from the same float32 weights: its own rounding is negligible.
    with torch.no_grad():
        xd = x.double()
        logits = xd @ router.weight.double().t()
        kept, experts = logits.topk(K, dim=1)
        weights = torch.softmax(kept, dim=1)  # softmax over the kept logits of each token
        y = torch.zeros(T, D, dtype=torch.float64)
        for e in range(E):
            h = torch.nn.functional.silu(xd @ gate[e].weight.double().t()) * (xd @ up[e].weight.double().t())
            out = h @ down[e].weight.double().t()
            w = (weights * (experts == e)).sum(dim=1, keepdim=True)
            y += w * out
        # A near tie between the K-th and the next logit could route differently in float: say so.
        ordered = logits.sort(dim=1, descending=True).values
        tie_gap = (ordered[:, K - 1] - ordered[:, K]).min().item()

    ok = True
    for name, ref, n in (("logits", logits, D), ("y", y, D + H)):
        got = result[name].double()
        if got.shape != ref.shape:
            print(f"torch_interop: {name} has shape {list(got.shape)}, PyTorch {list(ref.shape)}")
            ok = False
            continue
        scale = max(1.0, ref.abs().max().item())
        tol = forward_tol(n) * scale
        err = (got - ref).abs().max().item()
        print(f"torch_interop: {name} [{T} x {ref.shape[1]}]: max |C++ - PyTorch| = {err:.3e}, "
              f"tolerance forward_tol({n}) x {scale:.3g} = {tol:.3e}")
        ok = ok and err <= tol
    logits_tol = forward_tol(D) * max(1.0, logits.abs().max().item())
    if tie_gap <= 2 * logits_tol:
        print(f"torch_interop: smallest gap between the 2nd and 3rd logit {tie_gap:.3e} is within "
              f"rounding: choose another seed")
        ok = False
    print("torch_interop: " + ("agree" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
