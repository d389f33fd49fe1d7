#!/usr/bin/env bash
# Boots the test guest for a person at the terminal: builds it (or reuses the cache) and runs
# QEMU with the guest's serial console on this terminal. After LICHEN-GUEST-READY the guest
# reads one shell command per line (no prompt, no echo); guest.sh's helpers are defined,
# e.g. `gpio_pull 27 down; gpio_value 22`. Leave with Ctrl-A X.
#
# TCG, not KVM: /dev/kvm on the development machines is KVM-PVM, where stock kernels hang;
# tsc_early_khz (in the guest's cmdline) keeps TCG boots from hanging at TSC calibration.
set -euo pipefail
dir=$("$(dirname "$0")/build.sh" "$@")
exec qemu-system-x86_64 -accel tcg -M microvm -m 512 -smp 1 -nographic -no-reboot \
  -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.gz" -append "$(cat "$dir/cmdline")"
