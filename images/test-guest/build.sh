#!/usr/bin/env bash
# Builds the real-kernel test guest of issue 3 and prints its directory, which holds
# `vmlinuz` (Debian's kernel, from images/fetch-kernel.sh), `initramfs.gz` and `cmdline`.
#
# The initramfs holds busybox (static), a static musl `lichen`, the example device functions,
# a deployment for the qemu-x86-test board (devices.toml), and kernel modules:
# - configfs, i2c-stub and i2c-dev from the Debian kernel's own modules;
# - irq_sim and gpio-sim, built out of tree from linux-source-6.1 (build-modules.sh);
# - spi-lichen-mock (modules/spi-lichen-mock.c, ours): SPI bus 0 with an MCP3008 model.
#
# Everything is cached under $LICHEN_GUEST_CACHE (default <cargo target dir>/guest):
# the kernel by its package version, the modules by kernel, source and module-source hashes
# (build-modules.sh), the initramfs by the hash of every file it holds. A second run with unchanged inputs only checks the hashes
# (and asks cargo whether lichen is fresh).
#
# Usage: images/test-guest/build.sh [MODULE.wasm ...]
#   The .wasm files (named after their workload: button-led.wasm ...) go to /guest; without
#   arguments the examples are built from examples/ with cargo.
#   LICHEN_GUEST_LICHEN=/path/to/lichen uses that static binary instead of building one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache_root=${LICHEN_GUEST_CACHE:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}/guest}
musl=x86_64-unknown-linux-musl

say() { echo "test-guest: $*" >&2; }
die() { say "error: $*"; exit 1; }
hash_of() { sha256sum "$@" | awk '{ print $1 }'; }

# --- The kernel and the modules ----------------------------------------------------------
kernel_dir=$("$repo/images/fetch-kernel.sh")
kver=$(cat "$kernel_dir/kver")
mod_dir=$("$here/build-modules.sh" "$kernel_dir")

# --- lichen, busybox, the device functions ------------------------------------------------
if [ -n "${LICHEN_GUEST_LICHEN:-}" ]; then
  lichen=$LICHEN_GUEST_LICHEN
else
  # The `smoke` profile (optimised, no LTO, no debug info): Wasmtime at opt-level 1 runs fast
  # enough under TCG, the binary is small for the initramfs, and it builds in a fraction of
  # `release`'s LTO time.
  # The node as it ships (--features full-node), the same binary images/build puts in the
  # flashable image.
  (cd "$repo" && cargo build -q --profile smoke --target "$musl" -p lichen --bin lichen \
    --no-default-features --features full-node) >&2
  target_dir=${CARGO_TARGET_DIR:-$(cd "$repo" && cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
  lichen=$target_dir/$musl/smoke/lichen
fi
[ -x "$lichen" ] || die "$lichen is not an executable"
file -b "$lichen" | grep -Eq 'static(-pie)? linked' || die "$lichen is not statically linked"

busybox=/bin/busybox
file -b "$busybox" | grep -q 'statically linked' ||
  die "$busybox is not the static busybox: install busybox-static (scripts/install-deps)"

wasm=("$@")
if [ ${#wasm[@]} -eq 0 ]; then
  (cd "$repo/examples" &&
    cargo build -q --release --target wasm32-wasip2 -p blinky -p adc-sampler -p env-sensor -p button-led) >&2
  target_dir=$(cd "$repo/examples" && cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  for name in blinky adc-sampler env-sensor button-led; do
    wasm+=("$target_dir/wasm32-wasip2/release/${name//-/_}.wasm")
  done
fi

# --- The initramfs -------------------------------------------------------------------------
kmods=$kernel_dir/modules/kernel
kernel_modules=("$kmods/fs/configfs/configfs.ko" "$kmods/drivers/i2c/i2c-stub.ko" "$kmods/drivers/i2c/i2c-dev.ko")
for m in "${kernel_modules[@]}"; do [ -f "$m" ] || die "$m is missing from the kernel package"; done

inputs=("$kernel_dir/vmlinuz" "$mod_dir"/*.ko "${kernel_modules[@]}" "$lichen" "$busybox"
  "$here/init" "$here/guest.sh" "$here/devices.toml" "$here/lichen.toml" "$here/build.sh" "${wasm[@]}")
key=$( (hash_of "${inputs[@]}"; printf '%s\n' "${wasm[@]##*/}") | sha256sum | cut -c1-16)
out=$cache_root/test-guest/$key
if [ ! -f "$out/.complete" ]; then
  say "packing the initramfs ($key)"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  chmod 755 "$root" # mktemp's 0700 would become the guest's /, closed to non-root users
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,guest,lib/modules/lichen,var/lib/lichen}
  cp "$busybox" "$root/bin/busybox"
  cp "$lichen" "$root/bin/lichen"
  cp "$here/init" "$root/init"
  chmod 755 "$root/init"
  cp "$here/guest.sh" "$here/devices.toml" "$root/guest/"
  cp "$here/lichen.toml" "$root/etc/lichen.toml"
  cp "$mod_dir"/*.ko "${kernel_modules[@]}" "$root/lib/modules/lichen/"
  for w in "${wasm[@]}"; do
    name=${w##*/}
    cp "$w" "$root/guest/${name//_/-}"
  done
  # A user without privileges, for the permission-denied scenario.
  printf 'root:x:0:0:root:/:/bin/sh\nlichen:x:1000:1000:lichen:/tmp:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nlichen:x:1000:\n' >"$root/etc/group"
  rm -rf "$out"
  mkdir -p "$out"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
    gzip -1 >"$out/initramfs.gz"
  cp "$kernel_dir/vmlinuz" "$out/vmlinuz"
  echo "console=ttyS0 tsc_early_khz=2600000 tsc=reliable quiet panic=-1 rdinit=/init" >"$out/cmdline"
  echo "$kver" >"$out/kver"
  touch "$out/.complete"
  rm -rf "$root"
  trap - EXIT
  # Keep the three newest guests; each is ~10 MB.
  ls -1dt "$cache_root"/test-guest/*/ | tail -n +4 | xargs -r rm -rf
fi
echo "$out"
