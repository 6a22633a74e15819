#!/usr/bin/env bash
# Builds the L1 test host's root filesystem image from Debian packages (debootstrap), cached outside the
# checkout by content hash (package list, this script, l1-boot).
#
#   tests/testhost/build-rootfs.sh OUT_IMAGE
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-rootfs.sh OUT_IMAGE}
cache=${HUSK_CACHE:-$HOME/.cache/husk}
suite=bookworm
mirror=${HUSK_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
mirror=${mirror:-http://deb.debian.org/debian}
packages=$(grep -v '^#' "$here/packages" | tr '\n' ',' | sed 's/,,*/,/g; s/^,//; s/,$//')
key=$(cat "$0" "$here/packages" "$here/l1-boot" | sha256sum | cut -c1-16)
img="$cache/testhost/rootfs-$key.ext4"
mkdir -p "$cache/testhost" "$(dirname "$out")"
exec 9>"$cache/testhost/.lock"
flock 9
if [ ! -f "$img" ]; then
    for tool in debootstrap mkfs.ext4; do
        command -v "$tool" >/dev/null || { echo "build-rootfs: $tool missing (make deps)" >&2; exit 1; }
    done
    dir="$cache/testhost/rootfs-$key.d"
    rm -rf "$dir"
    echo "[testhost] debootstrap $suite from $mirror with: $packages"
    start=$(date +%s)
    debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" >"$cache/testhost/debootstrap.log" 2>&1 ||
        { echo "[testhost] debootstrap failed; see $cache/testhost/debootstrap.log" >&2; tail -20 "$cache/testhost/debootstrap.log" >&2; exit 1; }
    # Trim what no test reads.
    rm -rf "$dir"/usr/share/{doc,man,info,locale,lintian} "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/*
    install -m 0755 "$here/l1-boot" "$dir/sbin/husk-l1-boot"
    echo husk-l1 >"$dir/etc/hostname"
    size=$(( $(du -sm "$dir" | cut -f1) * 13 / 10 + 64 ))
    rm -f "$img.tmp"
    mkfs.ext4 -q -O ^has_journal -L husk-l1 -d "$dir" "$img.tmp" "${size}M"
    mv "$img.tmp" "$img"
    rm -rf "$dir"
    echo "[testhost] rootfs image built in $(( $(date +%s) - start )) s: $img (${size} MiB)"
else
    echo "[testhost] rootfs cached: $img"
fi
ln -sf "$img" "$out"
