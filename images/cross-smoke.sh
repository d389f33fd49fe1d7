#!/usr/bin/env bash
# Builds `lichen` statically for a foreign board target in one of its two flavours and runs it
# under qemu-user: prints its version (which names the flavour), starts the daemon and waits
# until the `counter` device function has ticked three times.
#
#   images/cross-smoke.sh aarch64-unknown-linux-musl qemu-aarch64-static [full|small]
#   images/cross-smoke.sh riscv64gc-unknown-linux-gnu qemu-riscv64-static [full|small]
#
# full (the default): the node as it ships (`--features full-node`: every runtime, Cranelift,
# the KubeEdge mapper; no operator's tool or benches); the daemon runs its embedded default
# deployment, compiling counter on the (emulated) board.
# small: `--no-default-features --features small-node` (no Cranelift, containers, microVMs,
# KubeEdge, operator or bench). The host's full `lichen` makes a signed bundle with counter
# precompiled for the target and this node's engine (`lichen hub bundle --precompile TARGET`);
# the small node imports it offline and maps the compiled file: it never compiles.
#
# It uses the `smoke` profile (release without whole-program LTO) to keep CI's build time
# down; `release` builds the same code with LTO for the binary that ships.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1
qemu=$2
flavour=${3:-full}
case "$flavour" in
  full) features=(--no-default-features --features full-node) ;;
  small) features=(--no-default-features --features small-node) ;;
  *) echo "error: flavour must be full or small, not $flavour" >&2; exit 2 ;;
esac

cargo build --profile smoke --target "$target" -p lichen "${features[@]}"
target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/$target/smoke/lichen"
echo "== $target ($flavour): $(file -b "$bin")"
file -b "$bin" | grep -q "statically linked" || { echo "error: $bin is not statically linked"; exit 1; }

version=$("$qemu" "$bin" --version)
echo "$version"
case "$version" in
  *"($flavour node)") ;;
  *) echo "error: $bin is not the $flavour node flavour: $version"; exit 1 ;;
esac

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
run_args=()
if [ "$flavour" = small ]; then
  # The operator's side: the host's full lichen signs a bundle with counter precompiled for
  # this target and engine. The node trusts its key; its hub (nothing listens on port 9) is
  # offline, as in the field.
  cargo build -p lichen --bin lichen
  host="$target_dir/debug/lichen"
  "$host" hub keygen "$work/publisher"
  cat >> "$work/agent.toml" <<CONF
[hub]
url = "mqtt://127.0.0.1:9"
node-id = "smoke"
trusted-keys = ["$(cat "$work/publisher.pub")"]
CONF
  # counter as the node embeds it (agent/default-guests/: a checked-in, reproducible build of
  # examples/counter).
  cp agent/default-guests/counter.wasm "$work/counter.wasm"
  cat > "$work/counter.toml" <<DEPLOY
[[workloads]]
name = "counter"
module = "counter.wasm"
triggers = [{ interval = "200ms" }]
DEPLOY
  "$host" hub bundle --node smoke "$work/counter.toml" --key "$work/publisher" --version 1 \
    --out "$work/bundle" --precompile "$target" --engine-max-memory 16MiB --engine-memory-guard 64KiB
  run_args=(--empty)
fi
"$qemu" "$bin" --socket "$work/lichen.sock" run --config "$work/agent.toml" --state-dir "$work/state" "${run_args[@]}" >"$work/daemon.log" 2>&1 &
daemon=$!

imported=no
count=0
for _ in $(seq 1 300); do
  if [ -S "$work/lichen.sock" ]; then
    if [ "$flavour" = small ] && [ "$imported" = no ]; then
      "$qemu" "$bin" --socket "$work/lichen.sock" import "$work/bundle" && imported=yes
    fi
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
  echo "error: counter did not tick three times on $target ($flavour)"; cat "$work/daemon.log"; exit 1
fi
if grep -q "compiling module" "$work/daemon.log" && [ "$flavour" = small ]; then
  echo "error: the small node compiled a module"; cat "$work/daemon.log"; exit 1
fi
"$qemu" "$bin" --socket "$work/lichen.sock" ps
echo "== $target ($flavour): counter ticked $count times under $qemu"
