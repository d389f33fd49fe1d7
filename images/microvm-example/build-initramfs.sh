#!/usr/bin/env bash
# Builds the example microVM workload from Debian packages, never committed: a gzip'd cpio
# initramfs holding busybox-static, the power-button and evdev modules of the kernel that
# images/fetch-kernel.sh unpacks, and an init that
#   - prints the ready marker `LICHEN-READY` on the serial console,
#   - logs `lichen-example tick N` every LICHEN_TICK seconds (kernel cmdline, default 1),
#   - powers off cleanly when the ACPI power button is pressed (QMP `system_powerdown`: on
#     `-M microvm` QEMU's generic event device raises it, the `button` module turns it into a
#     key event on /dev/input/event*, which the init waits on).
# `never-ready` as the first argument builds a variant whose init never prints the marker (for
# the boot-timeout test); `deaf` one that ignores the power button (for the grace-period test).
#
# Prints the image's path. Cached under $LICHEN_GUEST_CACHE (default
# <cargo target dir>/guest)/microvm-example/<key>, where the key hashes this script, the
# busybox binary and the kernel release, so a changed input builds a new image.
#
# Usage: images/microvm-example/build-initramfs.sh [ready|never-ready|deaf]
set -euo pipefail

variant=${1:-ready}
case "$variant" in ready | never-ready | deaf) ;; *)
  echo "build-initramfs: unknown variant $variant (ready, never-ready or deaf)" >&2
  exit 2
  ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LICHEN_GUEST_CACHE:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}/guest}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build-initramfs: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }
if ! "$busybox" --list >/dev/null 2>&1 || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-initramfs: $busybox is not a static busybox (apt-get install busybox-static)" >&2
  exit 1
fi
command -v cpio >/dev/null || { echo "build-initramfs: cpio missing (apt-get install cpio)" >&2; exit 1; }
kernel_dir=$("$here/../fetch-kernel.sh")
kver=$(cat "$kernel_dir/kver")

key=$(cat "$0" "$busybox" "$kernel_dir/kver" | sha256sum | cut -c1-16)
dir="$cache_root/microvm-example/$key"
image="$dir/$variant.cpio.gz"
if [ ! -f "$image" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  for m in drivers/acpi/button.ko drivers/input/evdev.ko; do
    cp "$kernel_dir/modules/kernel/$m" "$root/lib/modules/"
  done
  marker='echo LICHEN-READY'
  [ "$variant" != never-ready ] || marker=': marker never printed'
  button=1
  [ "$variant" != deaf ] || button=0
  cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
insmod /lib/modules/evdev.ko 2>/dev/null
insmod /lib/modules/button.ko 2>/dev/null
tick=1
for arg in \$(cat /proc/cmdline); do
  case "\$arg" in LICHEN_TICK=*) tick=\${arg#LICHEN_TICK=} ;; esac
done
down() { echo "lichen-example: \$1, powering off"; sync; poweroff -f; }
# The power button (QMP system_powerdown) arrives as an input event. The button module's input
# device shows up asynchronously, later on a busy host: wait for it (bounded, 30 s) before the
# marker, so that a stop requested once the marker is seen is never missed.
if [ $button = 1 ]; then
  waited=0
  until [ -e /dev/input/event0 ] || [ \$waited -ge 300 ]; do
    usleep 100000
    waited=\$((waited + 1))
  done
  [ -e /dev/input/event0 ] || echo "lichen-example: no power-button input device after 30 s"
fi
for ev in /dev/input/event*; do
  [ -e "\$ev" ] && [ $button = 1 ] || continue
  ( head -c 1 "\$ev" >/dev/null && down "power button" ) &
  # An input event reaches only readers that have the device open: wait (bounded, 30 s) until
  # the reader has it open before the marker, so a press right after the marker is not lost.
  waited=0
  until ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q "\$ev\$" || [ \$waited -ge 300 ]; do
    usleep 100000
    waited=\$((waited + 1))
  done
done
$marker
n=0
while true; do
  n=\$((n + 1))
  echo "lichen-example tick \$n"
  sleep "\$tick"
done
INIT
  chmod 755 "$root/init"
  mkdir -p "$dir"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) >"$work/image"
  mv "$work/image" "$image"
fi
echo "$image"
