"""Slurm job timing: the time limit, the clean-shutdown signal and walltime chaining (pure).

Shared by the spec rules (validate refuses a successor that cannot take over in time) and the
Slurm renderer (the `#SBATCH --signal` and the successor timer in the batch script).
"""

from __future__ import annotations

MAX_GRACE_S = 120  # `--signal=B:TERM@<grace>`: time to shut down before the limit
HANDOVER_S = 10  # walltime chaining: old and new router both serve this long after the endpoint switched
# sbatch(1), --signal: "Due to the resolution of event handling by Slurm, the signal may be sent up to
# 60 seconds earlier than specified." (tests/test_slurm_cli.py reads it in the installed man page)
SIGNAL_EARLY_S = 60
MIN_SUCCESSOR_AFTER_S = 60  # the successor timer never fires sooner after the job starts


def time_limit_s(limit: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
        parts = [int(x) for x in limit.split(":")]
        h, m, s = [*parts, 0, 0][:3]
    else:
        parts = [int(x) for x in limit.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def grace_s(limit_s: int) -> int:
    """Seconds before the time limit at which the batch shell gets SIGTERM (clean shutdown)."""
    return max(10, min(MAX_GRACE_S, limit_s // 4))


def successor_after_s(limit_s: int, lead_minutes: int) -> int:
    """When the successor is submitted, in seconds after the job started."""
    return max(MIN_SUCCESSOR_AFTER_S, limit_s - lead_minutes * 60)


def earliest_stop_s(limit_s: int) -> int:
    """The earliest moment (seconds after start) the shutdown signal may reach the batch shell."""
    return limit_s - grace_s(limit_s) - SIGNAL_EARLY_S


def hands_over_in_time(limit_s: int, lead_minutes: int) -> bool:
    """The successor is submitted and has taken over before the job's shutdown signal can arrive."""
    return successor_after_s(limit_s, lead_minutes) + HANDOVER_S < earliest_stop_s(limit_s)


def min_lead_minutes(limit_s: int) -> int:
    """The smallest lead that submits the successor, with a handover to spare, before the earliest stop."""
    need = grace_s(limit_s) + SIGNAL_EARLY_S + HANDOVER_S
    return need // 60 + 1
