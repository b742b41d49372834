#!/usr/bin/env bash
# Sets up everything XO needs on a Debian 12 host, as root. Idempotent: each step checks
# before it acts, so a second run costs a few seconds.
#   scripts/setup.sh            apt packages, BCC kernel headers, venv (.venv), pip deps
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (apt, kernel header links, network namespaces need it)" >&2
  exit 1
fi

# --- Debian packages -------------------------------------------------------------------------
# python3-bpfcc: BCC, importable only from Debian's /usr/bin/python3.
# linux-headers-amd64: headers BCC compiles TC programs against (this kernel ships none).
# linux-image-amd64 + qemu-system-x86: the kernel VM tier (virtme-ng boots Debian's kernel).
# linux-source-6.1: netdevsim, built out of tree for the VM tier.
APT_PACKAGES=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-pip python3-dev
  nftables tcpdump ethtool iproute2 curl wrk openssl kmod busybox-static
  nginx nginx-dev qemu-system-x86 linux-image-amd64 linux-source-6.1 xz-utils
  build-essential patch
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "apt: all ${#APT_PACKAGES[@]} packages present"
fi
# nginx from Debian starts a service on :80 at install; the tests run their own instances.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
pkill -f 'nginx: master process /usr/sbin/nginx -g daemon on' 2>/dev/null || true

# --- BCC kernel headers ----------------------------------------------------------------------
# BCC looks under /lib/modules/$(uname -r)/{build,source}. Debian splits the headers into an
# arch tree (generated/autoconf.h) and a common tree (include/linux/kconfig.h); link both.
kver=$(uname -r)
hdr_arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
if [ ! -e "/lib/modules/$kver/build/include/generated/autoconf.h" ] && [ -n "$hdr_arch" ]; then
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr_arch" "/lib/modules/$kver/build"
  ln -sfn "$hdr_common" "/lib/modules/$kver/source"
  log "bcc: linked /lib/modules/$kver/{build,source} to $hdr_arch, $hdr_common"
fi

# --- Python venv -----------------------------------------------------------------------------
# Debian's python3 with system site packages, so that `import bcc` works inside the venv.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "venv: creating .venv from /usr/bin/python3"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.xo-deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "pip: installing xo and its pinned dependencies"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.xo-deps-*
  touch "$stamp"
else
  log "pip: dependencies up to date"
fi
.venv/bin/python -c 'import bcc, pyroute2, grpc, google.protobuf, boto3' \
  || { echo "setup.sh: the venv cannot import its dependencies" >&2; exit 1; }
# nginx handoff module (integrations/nginx), rebuilt only when its sources change.
nginx_module=$(integrations/nginx/build.sh)
log "nginx: $nginx_module"
log "ready: .venv/bin/xo"
