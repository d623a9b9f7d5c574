"""A cheaper unit-state probe than `systemctl show` for a no-op apply: read the cgroup tree.

systemd puts every process of `NAME.service` in the cgroup `system.slice/NAME.service`, and the
service's main process is the one whose parent is PID 1 (systemd) - for the Type=exec/simple
units disaggctl renders. Reading `cgroup.procs` and `/proc/PID/stat` answers "is it running,
which is its MainPID, what is its command line" without starting `systemctl`, without a D-Bus
round trip and without sudo (all of it is world-readable), in one shell with one fork per
running unit (base64 of the command line).

Same answer as `systemctl show` (checked against it on real systemd hosts in
tests/test_unitstate.py) for: running (ActiveState active, SubState running), stopped
(inactive/dead), failed, and waiting to restart (activating/auto-restart: no process).
Not answered, callers keep `systemctl show` for these: NeedDaemonReload, NRestarts,
LoadState, `.target` units (no processes), and transitions in flight (a unit that is
`deactivating` still has processes and reads as running here; `activating` with an
ExecStartPre reads as running the pre-command).

    argv = unit_state_argv(units)             # conn.run(argv) - no sudo needed
    states = parse_unit_states(out, units)    # {unit: UnitState}
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

# Arguments: unit names (NAME.service). Prints per unit one line:
#   <unit> <nprocs> <main pid or 0> <enabled 0|1> <base64 of the main pid's cmdline, "-" or empty>
# and adds the units with no main process to $US_IDLE.
# Builtins only, except base64 (once per running unit). Cgroup v2 (/sys/fs/cgroup), hybrid
# (unified/, systemd/) and v1 named hierarchy layouts.
UNIT_STATE_SCRIPT = r"""
set -f
_ppid() { MAIN_PPID=$2; }
for u in "$@"; do
  procs=""
  for cg in /sys/fs/cgroup/system.slice /sys/fs/cgroup/unified/system.slice /sys/fs/cgroup/systemd/system.slice; do
    if [ -r "$cg/$u/cgroup.procs" ]; then procs=$cg/$u/cgroup.procs; break; fi
  done
  n=0; main=0
  if [ -n "$procs" ]; then
    while read -r pid; do
      n=$((n + 1))
      [ "$main" = 0 ] || continue
      stat=""
      { read -r stat < "/proc/$pid/stat"; } 2>/dev/null || continue
      # shellcheck disable=SC2086 # split the fields after "(comm) "
      _ppid ${stat##*) }
      [ "$MAIN_PPID" = 1 ] && main=$pid
    done < "$procs"
  fi
  en=0
  set +f
  for w in /etc/systemd/system/*.wants/"$u"; do [ -e "$w" ] && en=1; done
  set -f
  if [ "$main" = 0 ]; then
    printf '%s %s 0 %s -\n' "$u" "$n" "$en"
    US_IDLE="$US_IDLE $u"  # for a caller that sources this as a function: the units not running
  else
    # base64 straight to stdout: no subshell to capture it (one fork less per running unit)
    printf '%s %s %s %s ' "$u" "$n" "$main" "$en"
    base64 -w0 2>/dev/null < "/proc/$main/cmdline" || printf -
    echo
  fi
done
"""


@dataclass(frozen=True)
class UnitState:
    unit: str
    processes: int = 0  # in the unit's cgroup
    main_pid: int = 0  # the process whose parent is systemd; 0 when none
    enabled: bool = False  # linked into some /etc/systemd/system/*.wants/
    cmdline: tuple[str, ...] | None = None  # of main_pid

    @property
    def running(self) -> bool:
        """systemctl's ActiveState=active SubState=running for a Type=exec/simple unit."""
        return self.main_pid > 0


def unit_state_argv(units: list[str]) -> list[str]:
    """The command for Connection.run (no sudo needed); only `.service` units are answered."""
    bad = [u for u in units if not u.endswith(".service") or "/" in u or u.startswith(".")]
    if bad:
        raise ValueError(f"only NAME.service units have a cgroup to read: {bad}")
    return ["sh", "-c", UNIT_STATE_SCRIPT, "unit-state", *units]


def _cmdline(b64: str) -> tuple[str, ...] | None:
    if b64 in ("-", ""):
        return None
    raw = base64.b64decode(b64)
    if not raw:
        return None  # a zombie or kernel thread: no command line
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0"))


def parse_unit_states(out: str, units: list[str]) -> dict[str, UnitState]:
    """UNIT_STATE_SCRIPT's output -> {unit: UnitState}; a unit it did not print is not running."""
    states = {u: UnitState(u) for u in units}
    for line in out.splitlines():
        parts = line.split(" ")
        if len(parts) != 5 or parts[0] not in states:
            continue
        unit, n, main, en, cmd = parts
        states[unit] = UnitState(unit, int(n), int(main), en == "1", _cmdline(cmd))
    return states
