#!/usr/bin/env bash
# Install what the test suite's real components need on a Debian 12 machine (run as root):
# OpenSSH, sudo (the test hosts' non-root operators), Slurm (slurmctld + slurmd + munge), systemd-nspawn + debootstrap for the systemd
# test hosts, shellcheck, and the Debian rootfs the nspawn hosts boot. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
INFRA_BASE=${INFRA_BASE:-/tmp/dctl-infra}
need=()
for cmd in sshd sudo openssl slurmctld slurmd munged systemd-nspawn debootstrap shellcheck ip nsenter unshare; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: installing packages for: ${need[*]}"
  rm -f /var/lib/man-db/auto-update   # skip the man-db rebuild in apt triggers
  # no init system here: package scripts must not try to start sshd/munge/slurm
  [ -x /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    openssh-server openssh-client sudo openssl iproute2 procps util-linux psmisc \
    slurmctld slurmd slurm-client munge \
    systemd systemd-container debootstrap shellcheck python3 >/dev/null
fi
# many nspawn containers => many systemd inotify instances, all owned by root (default 128)
sysctl -q -w fs.inotify.max_user_instances=8192 fs.inotify.max_user_watches=1048576 || true
SYSHOSTS_ROOTFS=${SYSHOSTS_ROOTFS:-$INFRA_BASE/rootfs} tests/infra/systemd_hosts.sh rootfs
echo "install-test-deps: ready"
