#!/usr/bin/env bash
# Fetches the Debian kernel that test guests and example microVMs boot, without installing it
# on this machine: downloads the linux-image package that linux-image-amd64 points at and
# unpacks it into a cache keyed by package name and version. Prints the cache directory, which
# holds `vmlinuz`, `kver` (the kernel release, e.g. 6.1.0-56-amd64) and `modules/` (that
# release's lib/modules tree). A second run with the same Debian version only prints the path.
#
# Usage: images/fetch-kernel.sh            (cache under $LICHEN_GUEST_CACHE,
#                                           default <cargo target dir>/guest)
set -euo pipefail

cache_root=${LICHEN_GUEST_CACHE:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}/guest}

resolve() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(resolve || true)
if [ -z "$pkg" ]; then
  # A fresh machine may not have read the package lists yet.
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve linux-image-amd64 to a kernel package" >&2; exit 1; }
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
dir="$cache_root/kernel/${pkg}_${version}"

if [ ! -f "$dir/.complete" ]; then
  work=$(mktemp -d)
  chmod a+rwx "$work" # apt-get download writes as the _apt user
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -qq "$pkg=$version" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/root"
  kver=${pkg#linux-image-}
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$work/root/boot/vmlinuz-$kver" "$dir/vmlinuz"
  mv "$work/root/lib/modules/$kver" "$dir/modules"
  echo "$kver" >"$dir/kver"
  touch "$dir/.complete"
fi
echo "$dir"
