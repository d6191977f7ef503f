#!/usr/bin/env bash
# Short learning-rate sweeps for the cifar and gpt2 examples: trains each optimizer at each
# learning rate given and prints one line per run (final train loss, validation loss/accuracy).
#
#   scripts/lr_sweep.sh EXAMPLE "EXTRA ARGS" "algo=lr,lr,... algo=lr,..."
#   scripts/lr_sweep.sh cifar "--steps 120 --eval-size 1000" "sgd_sai=3e-3,1e-2,3e-2 adamw=1e-3,3e-3"
#
# The examples' default_lr tables come from sweeps like these (examples/results/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
example=$1 extra=$2 grid=$3
cargo build --release --example "$example" >/dev/null 2>&1 || cargo build --release --example "$example"
for spec in $grid; do
  algo=${spec%%=*}
  IFS=, read -ra lrs <<<"${spec#*=}"
  for lr in "${lrs[@]}"; do
    # shellcheck disable=SC2086
    line=$(./target/release/examples/"$example" --optimizer "$algo" --lr "$lr" --eval-every 0 $extra 2>&1 \
      | grep -E "^ *$algo: [0-9]+ steps" || echo "$algo: failed")
    echo "$algo lr=$lr  ${line#*: }"
  done
done
