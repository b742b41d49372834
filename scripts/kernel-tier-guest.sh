#!/usr/bin/env bash
# Runs INSIDE the kernel-tier VM (scripts/kernel-tier.sh boots it): loads the modules this
# host's kernel lacks, then runs pytest -m kernel, or one command with --exec.
# The root is shared read-only: no bytecode, no pytest cache; /tmp is a guest-only overlay.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1 PATH="$PWD/.venv/bin:$PATH"

# Modules whose absence is the reason for this tier. A failed modprobe is not fatal here: the
# test that needs the module skips with require_module()'s message naming it.
for m in tls cls_flower act_pedit act_csum act_mirred act_gact veth bridge psample; do
  modprobe "$m" 2>/dev/null || echo "kernel-tier guest: modprobe $m failed" >&2
done
# bpffs for tests that pin maps (not mounted by default).
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

mode=${1:?usage: kernel-tier-guest.sh --pytest [FILES] [ARGS] | --exec CMD [ARGS]}
shift
case "$mode" in
  --exec) exec "$@" ;;
  # Python startup is slow over 9p in TCG: skip plugins kernel tests do not need (hypothesis'
  # pytest plugin alone costs ~1 min there; @given still works without it).
  --pytest) exec .venv/bin/pytest -m kernel -p no:cacheprovider -p no:hypothesispytest \
    --durations=5 "$@" ;;
  *) echo "kernel-tier guest: unknown mode $mode" >&2; exit 2 ;;
esac
