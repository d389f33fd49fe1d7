#!/usr/bin/env bash
# Builds `lichen` statically for a foreign board target and runs it under qemu-user: prints
# its version, starts the daemon on the embedded default deployment (the `counter` device
# function on the simulated board) and waits until counter has ticked three times.
#
#   images/cross-smoke.sh aarch64-unknown-linux-musl qemu-aarch64-static
#   images/cross-smoke.sh riscv64gc-unknown-linux-gnu qemu-riscv64-static
#
# It uses the `smoke` profile (release without whole-program LTO) to keep CI's build time
# down; `release` builds the same code with LTO for the binary that ships.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1
qemu=$2

cargo build --profile smoke --target "$target" -p lichen
target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/$target/smoke/lichen"
echo "== $target: $(file -b "$bin")"
file -b "$bin" | grep -q "statically linked" || { echo "error: $bin is not statically linked"; exit 1; }

"$qemu" "$bin" --version

work=$(mktemp -d)
daemon=""
cleanup() {
  if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
# A small engine: qemu-user emulates the board's address space inside this process.
cat > "$work/agent.toml" <<CONF
board = "sim"
[wasm]
max-instances = 8
max-memory = "16MiB"
memory-guard = "64KiB"
CONF
"$qemu" "$bin" --socket "$work/lichen.sock" run --config "$work/agent.toml" --state-dir "$work/state" >"$work/daemon.log" 2>&1 &
daemon=$!

count=0
for _ in $(seq 1 300); do
  if [ -S "$work/lichen.sock" ]; then
    count=$("$qemu" "$bin" --socket "$work/lichen.sock" --json kv counter count 2>/dev/null \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d[0]["value"] if d else 0)' 2>/dev/null) || count=0
    [ "${count:-0}" -ge 3 ] && break
  fi
  if ! kill -0 "$daemon" 2>/dev/null; then
    echo "error: the $target daemon exited"; cat "$work/daemon.log"; exit 1
  fi
  sleep 1
done
if [ "${count:-0}" -lt 3 ]; then
  echo "error: counter did not tick three times on $target"; cat "$work/daemon.log"; exit 1
fi
"$qemu" "$bin" --socket "$work/lichen.sock" ps
echo "== $target: counter ticked $count times under $qemu"
