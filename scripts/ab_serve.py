#!/usr/bin/env python3
"""A/B of two builds of the bench's `--serve` mode (e.g. before and after a change to a CPU
loop), with everything a shared VM lets vary balanced: each run starts both servers, in the
order given (on the development VM the process that allocates second is several percent
faster, whichever it is), then alternates blocks of steps between them; run it with both
orders and compare the ratios.

    python3 scripts/ab_serve.py OLD_BENCH NEW_BENCH --order ab --set gpt2-nowte
    python3 scripts/ab_serve.py OLD_BENCH NEW_BENCH --order ba --set gpt2-nowte

Prints the two medians (ms per step) and A/B (> 1: B is faster).
"""
import argparse
import json
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--order", choices=["ab", "ba"], default="ab")
    ap.add_argument("--set", default="gpt2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="adamw")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=3)
    a = ap.parse_args()

    def start(exe):
        cmd = [exe, "--serve", "--sets", a.set, "--threads", str(a.threads), "--only", a.only]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        names = json.loads(p.stdout.readline())["names"]
        return p, names[0]

    if a.order == "ab":
        sa = start(a.a)
        sb = start(a.b)
    else:
        sb = start(a.b)
        sa = start(a.a)
    times = {id(sa): [], id(sb): []}

    def block(s):
        p, name = s
        p.stdin.write(f"{name} {a.block}\n")
        p.stdin.flush()
        times[id(s)] += json.loads(p.stdout.readline())

    for r in range(a.rounds):
        for s in ((sa, sb) if r % 2 == 0 else (sb, sa)):
            block(s)
    ma, mb = statistics.median(times[id(sa)]), statistics.median(times[id(sb)])
    print(f"order {a.order} set {a.set}: A {ma:.2f} ms, B {mb:.2f} ms, A/B {ma / mb:.3f}")
    for p, _ in (sa, sb):
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
