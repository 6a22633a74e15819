#!/usr/bin/env bash
# Builds a Linux kernel from Debian's linux-source-6.1 package: `make tinyconfig` plus the given config
# fragments, checked after olddefconfig. Results are cached outside the checkout, keyed by
# (source package version, fragments, this recipe), so a second run only copies files.
#
#   guest-kernel/build.sh NAME OUTDIR FRAGMENT...
#
# Writes OUTDIR/vmlinux (ELF, with a PVH note) and OUTDIR/bzImage.
set -euo pipefail

RECIPE=2 # bump when the way a kernel is built changes
name=${1:?usage: build.sh NAME OUTDIR FRAGMENT...}
out=${2:?usage: build.sh NAME OUTDIR FRAGMENT...}
shift 2
[ $# -gt 0 ] || { echo "build.sh: no config fragment given" >&2; exit 2; }
for f in "$@"; do [ -r "$f" ] || { echo "build.sh: config fragment $f not found" >&2; exit 2; }; done

cache=${HUSK_CACHE:-$HOME/.cache/husk}
tarball=/usr/src/linux-source-6.1.tar.xz
if [ ! -r "$tarball" ]; then
    echo "build.sh: $tarball missing: install the linux-source-6.1 package (make deps)" >&2
    exit 1
fi
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "recipe=$RECIPE source=$version"; for f in "$@"; do cat "$f"; done; } | sha256sum | cut -c1-16)
build="$cache/kernel/$name-$key"
mkdir -p "$cache/kernel" "$cache/src" "$out"

exec 9>"$cache/kernel/.lock"
flock 9

if [ ! -f "$build/.done" ]; then
    src="$cache/src/linux-source-6.1-$version"
    if [ ! -f "$src/.done" ]; then
        echo "[kernel] unpacking linux-source-6.1 $version"
        rm -rf "$src" && mkdir -p "$src"
        tar -xf "$tarball" -C "$src" --strip-components=1
        touch "$src/.done"
    fi
    rm -rf "$build" && mkdir -p "$build"
    echo "[kernel $name] configuring (tinyconfig + $*)"
    mk() { make -C "$src" O="$build" ARCH=x86_64 "$@"; }
    mk tinyconfig >"$build/config.log" 2>&1
    "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$@" >>"$build/config.log" 2>&1
    mk olddefconfig >>"$build/config.log" 2>&1
    # A symbol that does not stick (unmet dependency, renamed) would silently drop a feature: refuse.
    # The last fragment that sets a symbol wins (as in merge_config.sh).
    missing=$(cat "$@" | sed -n 's/^\(CONFIG_[A-Za-z0-9_]*\)=\(.*\)$/\1=\2/p' |
        awk -F= '{want[$1]=$0} END {for (k in want) print want[k]}' | while IFS= read -r want; do
        grep -qxF "$want" "$build/.config" || echo "  $want (got: $(grep -E "^(# )?${want%%=*}[= ]" "$build/.config" || echo unset))"
    done)
    if [ -n "$missing" ]; then
        echo "[kernel $name] these options did not take effect:" >&2
        echo "$missing" >&2
        exit 1
    fi
    echo "[kernel $name] building vmlinux and bzImage with $(nproc) jobs (log: $build/build.log)"
    start=$(date +%s)
    # Progress: one line per 250 compiled objects instead of thousands.
    mk -j"$(nproc)" vmlinux bzImage 2>&1 | tee "$build/build.log" |
        awk '/^  CC /{n++; if (n % 250 == 0) {printf "[kernel] %d objects compiled\n", n; fflush()}}'
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[kernel $name] build failed, see $build/build.log" >&2; tail -20 "$build/build.log" >&2; exit 1; }
    echo "[kernel $name] built in $(( $(date +%s) - start )) s"
    touch "$build/.done"
else
    echo "[kernel $name] cached: $build"
fi
cp "$build/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$build/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
echo "[kernel $name] $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1)), $out/bzImage ($(du -h "$out/bzImage" | cut -f1))"
