#!/usr/bin/env bash
# Packaging checks (CI): (a) no dependency the library builds needs a newer Rust than our
# `rust-version`; (b) the files `cargo package` would ship stay under a size cap, so data,
# fonts and plots of the examples and tests cannot slip into the crate again.
set -euo pipefail
cd "$(dirname "$0")/.."
# 900 kB: the sources with the state formats, Muon and their CUDA kernels, README.md,
# ALGORITHMS.md and the Cargo.lock cargo always adds are ~820 kB (about 230 kB as the
# compressed .crate); a data file, font or plot is megabytes.
LIMIT_BYTES=${LIMIT_BYTES:-900000}

# (a) Normal and build dependencies, transitively, for this host (dev-dependencies do not
# build the library; other platforms' dependencies are not built here).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo metadata --format-version 1 --filter-platform "$host" | python3 -c '
import json, sys
m = json.load(sys.stdin)
pkgs = {p["id"]: p for p in m["packages"]}
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
root = m["resolve"]["root"]
ver = lambda s: tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])  # "1.85" == "1.85.0"
ours = pkgs[root].get("rust_version")
if not ours:
    sys.exit("Cargo.toml has no rust-version")
seen, todo = set(), [root]
while todo:
    for d in nodes[todo.pop()]["deps"]:
        if all(k["kind"] == "dev" for k in d["dep_kinds"]) or d["pkg"] in seen:
            continue
        seen.add(d["pkg"])
        todo.append(d["pkg"])
newer = sorted(
    (ver(pkgs[i]["rust_version"]), pkgs[i]["rust_version"], pkgs[i]["name"], pkgs[i]["version"])
    for i in seen
    if pkgs[i].get("rust_version") and ver(pkgs[i]["rust_version"]) > ver(ours)
)
for _, needs, name, version in newer:
    print(f"{name} {version} needs Rust {needs}, rust-version is {ours}")
if newer:
    sys.exit(1)
print(f"rust-version {ours}: every one of {len(seen)} dependencies accepts it")
'

# (b) Sizes of the packaged files (the generated Cargo.toml and .cargo_vcs_info.json are
# small and not on disk; Cargo.toml.orig is Cargo.toml).
total=0
while IFS= read -r f; do
  [ "$f" = Cargo.toml.orig ] && f=Cargo.toml
  [ -f "$f" ] && total=$((total + $(wc -c < "$f")))
done < <(cargo package --list --allow-dirty --quiet)
echo "package: $total bytes in the packaged files (limit $LIMIT_BYTES)"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "the package is too large: see 'cargo package --list'; exclude what the library does not need" >&2
  exit 1
fi
