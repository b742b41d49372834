#!/usr/bin/env bash
# Builds netdevsim out of tree for the VM tier's kernel: Debian's kernel ships no netdevsim.
# Two modules from linux-source-6.1, against linux-headers for KVER:
#   stock/netdevsim.ko    unmodified: refuses flower ("only offload of BPF classifiers supported")
#   flower/netdevsim.ko   with accept-flower.patch: skip_sw flower rules report in_hw
# Cached under .cache/netdevsim/KVER-PATCHHASH/; a second run only checks.
#   scripts/netdevsim/build.sh KVER        prints the cache directory
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
kver=${1:?usage: build.sh KVER (e.g. 6.1.0-56-amd64)}
patch="$here/scripts/netdevsim/accept-flower.patch"
headers="/usr/src/linux-headers-$kver"
source_tar=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1)
[ -d "$headers" ] || { echo "netdevsim: no $headers (apt install linux-headers-$kver)" >&2; exit 1; }
[ -n "$source_tar" ] || { echo "netdevsim: no /usr/src/linux-source-*.tar.xz (apt install linux-source-6.1)" >&2; exit 1; }

key=$({ cat "$patch"; stat -c '%n %s %Y' "$source_tar"; } | sha256sum | cut -c1-12)
cache="$here/.cache/netdevsim/$kver-$key"
if [ -f "$cache/stock/netdevsim.ko" ] && [ -f "$cache/flower/netdevsim.ko" ]; then
  echo "$cache"
  exit 0
fi

mkdir -p "$here/.cache/netdevsim"
# Several engineers share the checkout: one build at a time, published by an atomic rename.
exec 9>"$here/.cache/netdevsim/.lock"
flock 9
if [ -f "$cache/flower/netdevsim.ko" ]; then echo "$cache"; exit 0; fi
work=$(mktemp -d "$here/.cache/netdevsim/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "netdevsim: building for $kver from $(basename "$source_tar")" >&2
tar -xJf "$source_tar" -C "$work" --strip-components=3 --wildcards '*/drivers/net/netdevsim/*'
mv "$work/netdevsim" "$work/stock"
cp -r "$work/stock" "$work/flower"
patch -s -d "$work/flower" -p4 < "$patch"
for variant in stock flower; do
  make -s -C "$headers" M="$work/$variant" CONFIG_NETDEVSIM=m modules >"$work/$variant.log" 2>&1 \
    || { cat "$work/$variant.log" >&2; exit 1; }
done
mkdir -p "$work/out/stock" "$work/out/flower"
cp "$work/stock/netdevsim.ko" "$work/out/stock/"
cp "$work/flower/netdevsim.ko" "$work/out/flower/"
rm -rf "$cache"
mv "$work/out" "$cache"
echo "$cache"
