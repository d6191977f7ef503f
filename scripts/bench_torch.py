#!/usr/bin/env python3
"""The torch side of examples/bench.rs (CPU) and examples/gpu_check.rs (CUDA): the same
parameter shapes and thread count, one JSON list of rows {name, ms: [per-step ms], bytes} on
stdout.

Measures torch.optim.AdamW (fused=True, foreach=True, and the for-loop path),
torch.optim.SGD(momentum=0.9) and torch.optim.Muon (torch >= 2.9) on the hidden matrices with
torch's fused AdamW (betas (0.9, 0.95), eps 1e-10) on the embeddings and every tensor of rank != 2,
as examples/bench.rs runs this crate's Muon. PyTorch is not a dependency of the crate: this runs only when the
bench is given --torch and a python with torch.

    python3 scripts/bench_torch.py --set gpt2 --threads 2 --steps 10
    python3 scripts/bench_torch.py --device cuda --set xl --steps 20
    python3 scripts/bench_torch.py --serve --set gpt2 --threads 2   # driven by examples/bench.rs

--variants keeps only some rows (adamw_fused, adamw_foreach, adamw_forloop, sgd_momentum, muon,
bnb_adamw8bit: bitsandbytes' AdamW8bit, when bitsandbytes is installed).
With --serve it sets everything up (one step of each optimizer, so its state exists), prints
one JSON line {"names": [...], "bytes": [...]}, and then answers each line "NAME K" on stdin
with one untimed and K timed steps of that optimizer, printing their times as a JSON list: the
Rust bench interleaves these blocks with its own, so both are measured in the same moments of
a noisy machine.
"""
import argparse
import json
import time

import torch


def gpt2_small():
    s = [[50257, 768], [1024, 768]]
    for _ in range(12):
        s += [[768], [768], [768, 2304], [2304], [768, 768], [768], [768], [768],
              [768, 3072], [3072], [3072, 768], [768]]
    return s + [[768], [768]]


def gpt2(layers, d):
    s = [[50257, d], [1024, d]]
    for _ in range(layers):
        s += [[d], [d], [d, 3 * d], [3 * d], [d, d], [d], [d], [d], [d, 4 * d], [4 * d], [4 * d, d], [d]]
    return s + [[d], [d]]


def ten_m():
    s = [[20000, 256], [512, 256]]
    for _ in range(6):
        s += [[256], [256], [256, 768], [768], [256, 256], [256], [256], [256],
              [256, 1024], [1024], [1024, 256], [256]]
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="gpt2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--variants", default="", help="comma list, e.g. adamw_fused,sgd_momentum (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = {"gpt2": gpt2_small, "gpt2-flat": lambda: [[124439808]], "gpt2-nowte": lambda: gpt2_small()[1:], "10m": ten_m, "xl": lambda: gpt2(48, 1600)}[a.set]()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    params = [torch.nn.Parameter(torch.randn(*s, device=dev) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(*p.shape, device=dev) * 1e-3
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = sum(p.numel() for p in params)
    rows = []
    variants = [
        ("torch_adamw_fused", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True), 28),
        ("torch_adamw_foreach", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True), 28),
        ("torch_adamw_forloop", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False), 28),
        ("torch_sgd_momentum", lambda: torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True), 20),
    ]
    try:
        import bitsandbytes as bnb  # 8-bit AdamW (its CPU backend), when installed

        variants.append(("torch_bnb_adamw8bit", lambda: bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01), 16))
    except ImportError:
        pass
    if hasattr(torch.optim, "Muon"):
        # The first two tensors of every set are the token and position embeddings.
        mats = [p for i, p in enumerate(params) if p.ndim == 2 and i >= 2]
        rest = [p for i, p in enumerate(params) if not (p.ndim == 2 and i >= 2)]
        m = sum(p.numel() for p in mats)
        variants.append((
            "torch_muon",
            lambda: Pair(
                torch.optim.Muon(mats, lr=1e-4, weight_decay=0.01),
                torch.optim.AdamW(rest, lr=1e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01, fused=True),
            ),
            # Element-wise bytes only (momentum 20 B, AdamW 28 B per element), as the Rust side.
            (20 * m + 28 * (n - m)) / n,
        ))
    if a.variants:
        keep = a.variants.split(",")
        variants = [v for v in variants if v[0].removeprefix("torch_") in keep]
    if a.serve:
        import sys
        opts = {name: make() for name, make, _ in variants}
        # One step each first: all of this process's memory is in place before it answers
        # (the bench controls which side allocates first).
        for opt in opts.values():
            opt.step()
        print(json.dumps({"names": [v[0] for v in variants], "bytes": [int(v[2] * n) for v in variants]}), flush=True)
        for line in sys.stdin:
            name, k = line.split()
            opt = opts[name]
            opt.step()
            sync()
            ms = []
            for _ in range(int(k)):
                t = time.perf_counter()
                opt.step()
                sync()
                ms.append((time.perf_counter() - t) * 1e3)
            print(json.dumps(ms), flush=True)
        return
    if dev.type == "cuda":
        # A device-to-device copy as large as the parameters (8 B per element moved).
        src = torch.zeros(n, device=dev)
        dst = torch.empty_like(src)
        variants.insert(0, ("torch_device_copy", lambda: Copy(src, dst), 8))
    for name, make, bpe in variants:
        opt = make()
        for _ in range(3):
            opt.step()
        sync()
        # "ms": one step, then synchronize. "ms_host": the time to enqueue that step.
        # "ms_tput" (GPU only): per step over `steps` steps enqueued back to back, 5 runs.
        ms, host, tput = [], [], []
        for _ in range(a.steps):
            t = time.perf_counter()
            opt.step()
            host.append((time.perf_counter() - t) * 1e3)
            sync()
            ms.append((time.perf_counter() - t) * 1e3)
        if dev.type == "cuda":
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(a.steps):
                    opt.step()
                sync()
                tput.append((time.perf_counter() - t) * 1e3 / a.steps)
        rows.append({"name": name, "ms": ms, "ms_host": host, "ms_tput": tput, "bytes": int(bpe * n)})
        del opt
    print(json.dumps(rows))


class Pair:
    """Two optimizers stepped as one."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def step(self):
        self.a.step()
        self.b.step()


class Copy:
    """A copy posing as an optimizer, so it is timed like one."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def step(self):
        self.dst.copy_(self.src)


if __name__ == "__main__":
    with torch.no_grad():
        main()
