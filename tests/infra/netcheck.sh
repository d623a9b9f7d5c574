# Sourced by the test network scripts (fakehosts.sh, systemd_hosts.sh, slurm_netns_up.sh).
# net_free NET BRIDGE: refuse a /24 that another bridge already routes - two test networks on one
# subnet break both without an error (a Slurm node could not reach its controller, jobs hung).
net_free() { local dev; dev=$(ip -o route show "$1.0/24" | awk '{print $3; exit}')
  [ -z "$dev" ] || [ "$dev" = "$2" ] || { echo "$1.0/24 is already routed via $dev: pick another network for $2" >&2; exit 1; }; }
