#!/usr/bin/env bash
# The kernel test tier: boots Debian's stock kernel (linux-image-amd64) with virtme-ng, the
# host root shared read-only, and runs every kernel-marked test inside ONE boot, for what this
# host's kernel lacks (kTLS, cls_flower, act_pedit/csum, netdevsim). Exit code = pytest's.
#   scripts/kernel-tier.sh                       pytest -m kernel over tests/ in the VM
#   scripts/kernel-tier.sh -k flower             extra pytest arguments
#   scripts/kernel-tier.sh --exec CMD [ARG...]   run any command in the VM (benchmarks, fixtures)
# Environment: XO_VM_CPUS (2), XO_VM_MEMORY (2G), XO_VM_KERNEL (newest /boot/vmlinuz-*),
# XO_VM_RWDIR (a host directory the guest may write, e.g. to record fixtures).
# KVM here cannot boot a stock kernel, so QEMU runs in TCG (--disable-kvm): boot ~20 s.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export PATH="$here/.venv/bin:$PATH"  # vng runs virtme-run by name

kernel=${XO_VM_KERNEL:-$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)}
[ -n "$kernel" ] && [ -f "$kernel" ] \
  || { echo "kernel-tier: no /boot/vmlinuz-* (scripts/setup.sh installs linux-image-amd64)" >&2; exit 1; }
kver=${kernel##*/vmlinuz-}
command -v vng >/dev/null || { echo "kernel-tier: no vng in .venv (run scripts/setup.sh)" >&2; exit 1; }

# Cached between runs: netdevsim built out of tree for this kernel (stock + flower patch).
netdevsim_dir=$(scripts/netdevsim/build.sh "$kver")

guest=(scripts/kernel-tier-guest.sh)
if [ "${1:-}" = "--exec" ]; then
  shift
  [ $# -gt 0 ] || { echo "kernel-tier: --exec needs a command" >&2; exit 2; }
  guest+=(--exec "$@")
else
  # Collect on the host first: zero kernel tests is a failure (exit 5) without booting a VM,
  # and the guest (TCG: slow) then imports only the files that hold kernel tests.
  ids=$(.venv/bin/pytest -m kernel --collect-only -q -p no:cacheprovider tests "$@" 2>/dev/null \
    | grep '::' || true)
  if [ -z "$ids" ]; then
    echo "kernel-tier: no kernel-marked tests were collected" >&2
    exit 5
  fi
  mapfile -t files < <(printf '%s\n' "$ids" | sed 's/::.*//' | sort -u)
  echo "kernel-tier: $(printf '%s\n' "$ids" | wc -l) kernel tests in ${#files[@]} files, booting $kver (TCG)"
  guest+=(--pytest "${files[@]}" "$@")
fi

vng_args=(--run "$kernel" --disable-kvm --cpus "${XO_VM_CPUS:-2}" --memory "${XO_VM_MEMORY:-2G}"
  --cwd "$here")
[ -n "${XO_VM_RWDIR:-}" ] && vng_args+=(--rwdir "$XO_VM_RWDIR")
# vng's --exec takes one shell string: quote every word.
printf -v cmd '%q ' env "XO_NETDEVSIM_DIR=$netdevsim_dir" "XO_KERNEL_TIER=1" "${guest[@]}"
# Never redirect vng straight to a file (QEMU reopens stdout and truncates it): pipe it.
# vng (and QEMU under it) get a session of their own, so that stopping this script stops the
# VM too instead of leaving it running.
exec 3> >(cat)
setsid vng "${vng_args[@]}" --exec "$cmd" >&3 2>&3 &
vm=$!  # = vng's pid = its process group (setsid execs in place: no subshell in between)
trap 'kill -TERM -- "-$vm" 2>/dev/null; wait "$vm"; exit 143' TERM INT HUP
set +e
wait "$vm"
rc=$?
set -e
exit "$rc"
