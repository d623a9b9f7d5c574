"""Slurm's command-line tools as data: argv builders and pure parsers of their output.

Nothing here runs a command; the Slurm target runs the argv (locally or on the login host over
SSH) and hands the text to these parsers, which tests feed with recorded output.
Formats are those of Slurm 22.05+ (`sbatch --parsable`, `squeue -o` with our own delimiter,
`scontrol show job -o`, one record per line and per het component).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Job states after which nothing of the job runs any more (scontrol/squeue long names).
TERMINAL = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
SEP = "\x1f"  # squeue field separator: a byte no job name or comment contains
SQUEUE_FIELDS = ("%i", "%j", "%T", "%r", "%N", "%k", "%L", "%S", "%o")
COMMENT_PREFIX = "disaggctl:"


class SlurmOutputError(ValueError):
    """Output of a Slurm command that does not have the expected shape."""


# --------------------------------------------------------------------------- argv builders


def sbatch_argv(
    extra: list[str] | None = None, script: str | None = None, env_drop: list[str] | None = None
) -> list[str]:
    """`sbatch --parsable [extra...] [script]`; without a script path sbatch reads it from stdin.
    env_drop: variables removed from sbatch's environment first (`env -u`): sbatch exports it into the job."""
    drop = [w for name in (env_drop or []) for w in ("-u", name)]
    return [*(["env", *drop] if drop else []), "sbatch", "--parsable", *(extra or []), *([script] if script else [])]


def sbatch_test_argv(script: str) -> list[str]:
    return ["sbatch", "--test-only", script]


def squeue_argv(job_name: str) -> list[str]:
    """Our pending or running jobs (and het components) named `job_name`, as parseable rows.

    `--me`: on a shared cluster another user's job of the same name is not ours to plan or cancel.
    """
    return ["squeue", "--me", "--noheader", f"--name={job_name}", f"--format={SEP.join(SQUEUE_FIELDS)}"]


def scontrol_job_argv(job_id: str) -> list[str]:
    return ["scontrol", "show", "job", "--oneliner", job_id]


def scancel_argv(job_id: str, signal: str | None = None, batch: bool = False) -> list[str]:
    """Cancel a job, or (with `signal`) only signal it; `batch` signals only the batch shell,
    whose trap then shuts the steps down in order."""
    argv = ["scancel"]
    if batch:
        argv.append("--batch")
    if signal:
        argv.append(f"--signal={signal}")
    return [*argv, job_id]


# --------------------------------------------------------------------------- parsers


def parse_sbatch(out: str) -> str:
    """`sbatch --parsable` prints `jobid` or `jobid;cluster` (a het job prints its leader's id)."""
    line = out.strip().splitlines()[-1].strip() if out.strip() else ""
    job = line.split(";", 1)[0]
    if not re.fullmatch(r"\d+", job):
        raise SlurmOutputError(f"sbatch --parsable printed {out.strip()!r}, not a job id")
    return job


@dataclass(frozen=True)
class QueueRow:
    """One line of squeue: a job or one component of a het job (`12+0`)."""

    job_id: str  # "12" or "12+1"
    name: str
    state: str
    reason: str
    nodes: str
    comment: str
    time_left: str
    start: str
    command: str

    @property
    def leader(self) -> str:
        """The id scancel/scontrol take for the whole job."""
        return self.job_id.split("+", 1)[0].split("_", 1)[0]

    @property
    def component(self) -> int:
        return int(self.job_id.split("+", 1)[1]) if "+" in self.job_id else 0


def parse_squeue(out: str) -> list[QueueRow]:
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = line.split(SEP)
        if len(parts) != len(SQUEUE_FIELDS):
            raise SlurmOutputError(f"squeue line has {len(parts)} fields, expected {len(SQUEUE_FIELDS)}: {line!r}")
        rows.append(QueueRow(*(p.strip() for p in parts)))
    return rows


@dataclass(frozen=True)
class Job:
    """A job (all its het components) as squeue or scontrol shows it."""

    job_id: str
    name: str
    state: str  # of component 0
    reason: str
    nodes: list[str]  # one entry per component (a node list expression each)
    comment: str
    time_left: str = ""
    start: str = ""
    stdout: str = ""
    exit_code: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # component 0's scontrol fields

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @property
    def tag(self) -> Comment | None:
        return parse_comment(self.comment)


def jobs_from_queue(rows: list[QueueRow]) -> list[Job]:
    """Group het components by leader id; oldest job first."""
    by: dict[str, list[QueueRow]] = {}
    for r in rows:
        by.setdefault(r.leader, []).append(r)
    jobs = []
    for leader, comps in by.items():
        comps.sort(key=lambda r: r.component)
        c0 = comps[0]
        jobs.append(
            Job(
                job_id=leader,
                name=c0.name,
                state=c0.state,
                reason=c0.reason,
                nodes=[c.nodes for c in comps],
                comment=c0.comment,
                time_left=c0.time_left,
                start=c0.start,
            )
        )
    return sorted(jobs, key=lambda j: int(j.job_id) if j.job_id.isdigit() else 0)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show job -o` line as key -> value.

    Values may contain spaces (a comment, a command with arguments): a token without `=` or
    whose key is not a plain field name continues the previous value.
    """
    out: dict[str, str] = {}
    last: str | None = None
    for tok in line.strip().split(" "):
        key, eq, value = tok.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9/:_]*", key) and (last is None or key not in out):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + tok
    return {k: v.rstrip() for k, v in out.items()}


def parse_scontrol_jobs(out: str) -> list[Job]:
    """`scontrol show job -o ID`: one record per het component; grouped into one Job."""
    records = [parse_scontrol_record(line) for line in out.splitlines() if line.strip()]
    if not records:
        return []
    by: dict[str, list[dict[str, str]]] = {}
    for r in records:
        if "JobId" not in r:
            raise SlurmOutputError(f"scontrol record without JobId: {r}")
        by.setdefault(r.get("HetJobId", r["JobId"]), []).append(r)
    jobs = []
    for leader, comps in by.items():
        comps.sort(key=lambda r: int(r.get("HetJobOffset", "0")))
        c0 = comps[0]
        jobs.append(
            Job(
                job_id=leader,
                name=c0.get("JobName", ""),
                state=c0.get("JobState", ""),
                reason=c0.get("Reason", ""),
                nodes=[c.get("NodeList", "") for c in comps],
                comment=c0.get("Comment", "").strip(),
                stdout=c0.get("StdOut", ""),
                exit_code=c0.get("ExitCode", ""),
                start=c0.get("StartTime", ""),
                fields=c0,
            )
        )
    return jobs


def scontrol_missing(err: str) -> bool:
    """The job is gone from slurmctld's memory (after MinJobAge)."""
    return "Invalid job id" in err


# --------------------------------------------------------------------------- the job's comment


@dataclass(frozen=True)
class Comment:
    """`disaggctl:<hash>[:<state>[:<endpoint>]]`, set at submit and updated by the running job."""

    hash: str
    state: str = "submitted"
    endpoint: str = ""


def parse_comment(comment: str) -> Comment | None:
    if not comment.startswith(COMMENT_PREFIX):
        return None
    parts = comment[len(COMMENT_PREFIX) :].split(":", 2)
    if not parts[0]:
        return None
    return Comment(
        parts[0], parts[1] if len(parts) > 1 and parts[1] else "submitted", parts[2] if len(parts) > 2 else ""
    )


def parse_state_file(text: str) -> dict[str, str]:
    """The job's `state.<jobid>` / `endpoint` file: key=value lines (`url.<process>=...` among them)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------- output of a failed job

_RELEVANT = re.compile(r"FAILED|error|Error|ERROR|Traceback|exited|not healthy|Killed|CANCELLED|DUE TO TIME LIMIT")


def relevant_lines(output: str, limit: int = 40) -> list[str]:
    """The lines of a job's output file that explain a failure: from the first `FAILED` report on
    (it carries the failing step's last log lines), else Slurm's own error lines, else the tail."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "FAILED:" in line:
            return lines[i : i + limit]
    hits = [ln for ln in lines if _RELEVANT.search(ln)]
    return (hits or lines)[-limit:]
