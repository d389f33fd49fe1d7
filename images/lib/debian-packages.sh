#!/usr/bin/env bash
# Downloads Debian packages of one architecture with apt's own client, into a private apt
# root (no dpkg architecture is added to this machine, nothing is installed), and unpacks
# them. Prints the directory holding, per package, `<name>/` (its files) and `packages` (one
# line per package: name, version, sha256 of the .deb).
#
#   images/lib/debian-packages.sh ARCH PACKAGE...        (ARCH: amd64 or arm64)
#
# `linux-image` in the list stands for the kernel package that `linux-image-ARCH` depends on
# (e.g. linux-image-6.1.0-57-arm64), so the kernel release is pinned by the package lists.
#
# The package lists are read once per architecture and kept (under
# $LICHEN_IMAGE_CACHE/apt-ARCH); `LICHEN_APT_REFRESH=1` reads them again, which is when
# newer Debian packages come in. With the same lists the same packages come out, so image
# builds stay reproducible between refreshes. Unpacked packages are cached by their .deb
# file names and hashes.
set -euo pipefail
arch=$1
shift
[ $# -gt 0 ] || { echo "usage: $0 ARCH PACKAGE..." >&2; exit 2; }
suite=bookworm
cache_root=${LICHEN_IMAGE_CACHE:-/var/tmp/lichen-target/image}
root=$cache_root/apt-$arch
say() { echo "debian-packages ($arch): $*" >&2; }

mkdir -p "$root"/etc/apt/apt.conf.d "$root"/etc/apt/preferences.d "$root"/var/lib/apt/lists/partial \
  "$root"/var/cache/apt/archives/partial "$root"/var/lib/dpkg "$root/debs"
touch "$root/var/lib/dpkg/status"
# One run at a time per architecture (tests build images in parallel): apt's lists and the
# unpacked packages are shared.
exec 9>"$root/.lock"
flock 9
cat >"$root/apt.conf" <<CONF
Apt::Architecture "$arch";
Apt::Architectures "$arch";
Dir "$root/";
Dir::State::status "$root/var/lib/dpkg/status";
Dir::Etc::Trusted "/etc/apt/trusted.gpg";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d/";
APT::Sandbox::User "root";
Acquire::Languages "none";
CONF
cat >"$root/etc/apt/sources.list" <<LIST
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $suite-security main
LIST
export APT_CONFIG=$root/apt.conf
if [ ! -f "$root/.lists-complete" ] || [ "${LICHEN_APT_REFRESH:-0}" = 1 ]; then
  say "reading the package lists of Debian $suite"
  apt-get update -qq >&2
  touch "$root/.lists-complete"
  rm -f "$root"/resolved-*
fi

# Resolving names to files asks apt-cache (seconds each) and hashes the .debs: done once per
# list of names and kept until the package lists are read again.
memo=$root/resolved-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)
lines=()
if [ -f "$memo" ] && [ "$memo" -nt "$root/.lists-complete" ]; then
  mapfile -t lines <"$memo"
fi
for line in "${lines[@]}"; do
  read -r p version _ <<<"$line"
  ls "$root/debs/${p}_${version//:/%3a}_"*.deb >/dev/null 2>&1 || { lines=(); break; }
done
if [ ${#lines[@]} = 0 ]; then
  names=()
  for p in "$@"; do
    if [ "$p" = linux-image ]; then
      p=$(apt-cache depends "linux-image-$arch" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
      [ -n "$p" ] || { say "error: cannot resolve linux-image-$arch to a kernel package"; exit 1; }
    fi
    names+=("$p")
  done

  lines=()
  for p in "${names[@]}"; do
    version=$(apt-cache policy "$p" | awk '/Candidate:/ { print $2 }')
    [ -n "$version" ] && [ "$version" != "(none)" ] || { say "error: no candidate version of $p"; exit 1; }
    # apt names the file <name>_<version with ':' as %3a>_<arch>.deb.
    file=$root/debs/${p}_${version//:/%3a}_$(apt-cache show "$p=$version" | awk '/^Architecture:/ { print $2; exit }').deb
    if [ ! -f "$file" ]; then
      say "downloading $p $version"
      (cd "$root/debs" && apt-get download -qq "$p=$version" >&2)
    fi
    [ -f "$file" ] || { say "error: apt-get download did not leave $file"; exit 1; }
    lines+=("$p $version $(sha256sum "$file" | cut -d' ' -f1)")
  done
  printf '%s\n' "${lines[@]}" >"$memo.new"
  mv "$memo.new" "$memo"
fi

key=$(printf '%s\n' "${lines[@]}" | sha256sum | cut -c1-16)
out=$cache_root/debs-$arch/$key
if [ ! -f "$out/.complete" ]; then
  rm -rf "$out"
  mkdir -p "$out"
  for line in "${lines[@]}"; do
    read -r p version _ <<<"$line"
    file=$(ls "$root/debs/${p}_${version//:/%3a}_"*.deb)
    say "unpacking $p $version"
    dpkg-deb -x "$file" "$out/$p"
  done
  printf '%s\n' "${lines[@]}" >"$out/packages"
  touch "$out/.complete"
fi
echo "$out"
