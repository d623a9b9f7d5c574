#!/usr/bin/env bash
# Stop whatever test infrastructure an earlier (interrupted) run left behind: sshd hosts,
# systemd-nspawn hosts, Slurm clusters. Safe to run when nothing is up.
set -u
cd "$(dirname "$0")/.."
B=${INFRA_BASE:-/tmp/dctl-infra}
FAKEHOSTS_BASE=$B/hosts tests/infra/fakehosts.sh down >/dev/null 2>&1
FAKEHOSTS_BASE=$B/bastion FAKEHOSTS_PREFIX=tbst tests/infra/fakehosts.sh down >/dev/null 2>&1
SYSHOSTS_BASE=$B/syshosts tests/infra/systemd_hosts.sh down >/dev/null 2>&1
SYSHOSTS_BASE=$B/syshosts-bastion SYSHOSTS_PREFIX=tsb tests/infra/systemd_hosts.sh down >/dev/null 2>&1
SLURM_BASE=$B/slurm tests/infra/slurm_up.sh down >/dev/null 2>&1
SLURM_BASE=$B/slurm-ns tests/infra/slurm_netns_up.sh down >/dev/null 2>&1
exit 0
