#!/usr/bin/env bash
# Builds the out-of-tree kernel modules of the test guest for the kernel images/fetch-kernel.sh
# fetches, and prints the directory holding them (irq_sim.ko, gpio-sim.ko,
# spi-lichen-mock.ko). Debian's kernel lacks IRQ_SIM and GPIO_SIM: both are built from
# linux-source-6.1 against linux-headers-<kver>, with irq_sim.c patched as it is copied
# (handle_simple_irq(irq_to_desc()) becomes generic_handle_irq(), as irq_to_desc is not
# exported, and it gains a MODULE_LICENSE). spi-lichen-mock is ours (modules/).
# Cached under $LICHEN_GUEST_CACHE/modules, keyed by the kernel, the source package and the
# hash of this script and modules/; no kernel source is kept.
#
# Usage: images/test-guest/build-modules.sh KERNEL_DIR   (the directory fetch-kernel.sh printed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LICHEN_GUEST_CACHE:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}/guest}
[ $# -eq 1 ] || die "usage: $0 KERNEL_DIR (the directory images/fetch-kernel.sh printed)"
kernel_dir=$1

say() { echo "test-guest: $*" >&2; }
die() { say "error: $*"; exit 1; }
hash_of() { sha256sum "$@" | awk '{ print $1 }'; }

# --- The kernel, its headers and sources -------------------------------------------------
kver=$(cat "$kernel_dir/kver")
headers=/usr/src/linux-headers-$kver
[ -f "$headers/Module.symvers" ] ||
  die "$headers is missing: install linux-headers-$kver (scripts/install-deps installs linux-headers-amd64, which must match linux-image-amd64's $kver)"
source_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$source_tar" ] || die "$source_tar is missing: install linux-source-6.1 (scripts/install-deps)"
source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
kernel_version=${kernel_dir##*_}
[ "$source_version" = "$kernel_version" ] ||
  say "note: linux-source-6.1 is $source_version, the kernel is $kernel_version; building gpio-sim from it anyway"

# --- Out-of-tree modules -----------------------------------------------------------------
mod_key=$(printf '%s\n' "$kver" "$kernel_version" "$source_version" \
  "$(hash_of "$here"/modules/* "$here/build-modules.sh")" | sha256sum | cut -c1-16)
mod_dir=$cache_root/modules/$mod_key
if [ ! -f "$mod_dir/.complete" ]; then
  say "building irq_sim, gpio-sim and spi-lichen-mock for $kver"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xJf "$source_tar" -C "$work" \
    linux-source-6.1/kernel/irq/irq_sim.c \
    linux-source-6.1/drivers/gpio/gpio-sim.c \
    linux-source-6.1/drivers/gpio/gpiolib.h
  src=$work/linux-source-6.1
  mkdir "$work/build"
  cp "$src/drivers/gpio/gpio-sim.c" "$src/drivers/gpio/gpiolib.h" "$here/modules/spi-lichen-mock.c" "$work/build/"
  # irq_sim as a module: irq_to_desc() is not exported, generic_handle_irq() is and does the
  # same for a simple-irq descriptor; a module needs a licence to use GPL symbols.
  sed -e 's/handle_simple_irq(irq_to_desc(irqnum));/generic_handle_irq(irqnum);/' \
    -e 's/^#include <linux\/irq.h>$/#include <linux\/module.h>\n#include <linux\/irq.h>/' \
    "$src/kernel/irq/irq_sim.c" >"$work/build/irq_sim.c"
  grep -q 'generic_handle_irq(irqnum);' "$work/build/irq_sim.c" ||
    die "irq_sim.c of linux-source $source_version no longer has the line the patch replaces"
  printf '\nMODULE_LICENSE("GPL");\nMODULE_DESCRIPTION("Interrupt simulator, built out of tree for the Lichen test guest");\n' \
    >>"$work/build/irq_sim.c"
  echo 'obj-m := irq_sim.o gpio-sim.o spi-lichen-mock.o' >"$work/build/Kbuild"
  make -s -C "$headers" M="$work/build" modules >"$work/make.log" 2>&1 ||
    { cat "$work/make.log" >&2; die "the modules did not build against $headers"; }
  if grep -q 'undefined!' "$work/make.log"; then
    cat "$work/make.log" >&2
    die "the modules use symbols $kver does not export"
  fi
  rm -rf "$mod_dir"
  mkdir -p "$mod_dir"
  cp "$work/build"/*.ko "$mod_dir/"
  touch "$mod_dir/.complete"
  rm -rf "$work"
  trap - EXIT
fi

echo "$mod_dir"
