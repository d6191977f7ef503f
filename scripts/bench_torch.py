#!/usr/bin/env python3
"""The torch side of examples/bench.rs: the same parameter shapes and thread count, one JSON list
of rows {name, ms: [per-step ms], bytes} on stdout.

Measures torch.optim.AdamW (fused=True, foreach=True, and the for-loop path) and
torch.optim.SGD(momentum=0.9). PyTorch is not a dependency of the crate: this runs only when the
bench is given --torch and a python with torch.

    python3 scripts/bench_torch.py --set gpt2 --threads 2 --steps 10
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = gpt2_small() if a.set == "gpt2" else ten_m()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(*p.shape) * 1e-3
    n = sum(p.numel() for p in params)
    rows = []
    variants = [
        ("torch_adamw_fused", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True), 28),
        ("torch_adamw_foreach", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True), 28),
        ("torch_adamw_forloop", lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False), 28),
        ("torch_sgd_momentum", lambda: torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True), 20),
    ]
    for name, make, bpe in variants:
        opt = make()
        for _ in range(2):
            opt.step()
        ms = []
        for _ in range(a.steps):
            t = time.perf_counter()
            opt.step()
            ms.append((time.perf_counter() - t) * 1e3)
        rows.append({"name": name, "ms": ms, "bytes": bpe * n})
        del opt
    print(json.dumps(rows))


if __name__ == "__main__":
    with torch.no_grad():
        main()
