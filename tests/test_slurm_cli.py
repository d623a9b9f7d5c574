"""Pure parsers of sbatch/squeue/scontrol output, fed with output recorded from Slurm 22.05."""

from __future__ import annotations

from pathlib import Path

import pytest

from disaggctl.slurmtime import SIGNAL_EARLY_S, grace_s, time_limit_s
from disaggctl.targets.slurm import cli
from disaggctl.targets.slurm.backend import compute_plan

REPO = Path(__file__).resolve().parents[1]

# `scontrol show job -o 5` of a running het job (two components), recorded on the test cluster.
SCONTROL_HET = (
    "JobId=5 HetJobId=5 HetJobOffset=0 JobName=het3 HetJobIdSet=5-6 UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901755 Nice=0 Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 "
    "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:03 TimeLimit=00:05:00 TimeMin=N/A "
    "SubmitTime=2026-11-27T14:05:41 EligibleTime=2026-11-27T14:05:41 AccrueTime=2026-11-27T14:05:41 "
    "StartTime=2026-11-27T14:05:41 EndTime=2026-11-27T14:10:41 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-27T14:05:41 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:14901 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=n1 BatchHost=n1 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/exp/het3.sh WorkDir=/tmp/exp "
    "Comment=disaggctl:abc:ready:http://10.2.0.1:8000  StdErr=/tmp/exp/het3-5.out StdIn=/dev/null "
    "StdOut=/tmp/exp/het3-5.out Power= TresPerNode=gres:gpu:1 \n"
    "JobId=6 HetJobId=5 HetJobOffset=1 JobName=het3 HetJobIdSet=5-6 UserId=root(0) GroupId=root(0) "
    "JobState=RUNNING Reason=None Dependency=(null) ExitCode=0:0 NodeList=n2 SchedNodeList=n2 BatchHost=n2 "
    "Command=/tmp/exp/het3.sh WorkDir=/tmp/exp Comment=disaggctl:abc:ready:http://10.2.0.1:8000  "
    "StdErr=/tmp/exp/het3-6.out StdIn=/dev/null StdOut=/tmp/exp/het3-6.out Power= TresPerNode=gres:gpu:2 \n"
)

S = cli.SEP
SQUEUE_HET = (
    f"5+0{S}het3{S}RUNNING{S}None{S}n1{S}disaggctl:abc:ready:http://10.2.0.1:8000{S}4:57{S}2026-11-27T14:05:41"
    f"{S}/tmp/exp/het3.sh\n"
    f"5+1{S}het3{S}RUNNING{S}None{S}n2{S}disaggctl:abc:ready:http://10.2.0.1:8000{S}4:57{S}2026-11-27T14:05:41"
    f"{S}/tmp/exp/het3.sh\n"
    f"9+0{S}het3{S}PENDING{S}Resources{S}{S}disaggctl:def{S}5:00{S}N/A{S}/tmp/exp/het3.sh\n"
    f"9+1{S}het3{S}PENDING{S}Resources{S}{S}disaggctl:def{S}5:00{S}N/A{S}/tmp/exp/het3.sh\n"
)


def test_parse_sbatch_parsable() -> None:
    assert cli.parse_sbatch("1\n") == "1"
    assert cli.parse_sbatch("42;cluster-a\n") == "42"
    with pytest.raises(cli.SlurmOutputError):
        cli.parse_sbatch("sbatch: error: Batch job submission failed\n")
    with pytest.raises(cli.SlurmOutputError):
        cli.parse_sbatch("")


def test_parse_scontrol_het_job() -> None:
    jobs = cli.parse_scontrol_jobs(SCONTROL_HET)
    assert len(jobs) == 1
    j = jobs[0]
    assert (j.job_id, j.name, j.state, j.nodes, j.stdout) == ("5", "het3", "RUNNING", ["n1", "n2"],
                                                              "/tmp/exp/het3-5.out")
    assert j.running and not j.finished
    assert j.tag == cli.Comment("abc", "ready", "http://10.2.0.1:8000")
    assert j.fields["AllocNode:Sid"] == "localhost:14901"
    assert j.fields["TimeLimit"] == "00:05:00"


def test_scontrol_values_with_spaces_continue() -> None:
    rec = cli.parse_scontrol_record("JobId=7 JobName=a b c Comment=x y JobState=FAILED Reason=NonZeroExitCode")
    assert rec["JobName"] == "a b c" and rec["Comment"] == "x y" and rec["JobState"] == "FAILED"


def test_parse_squeue_groups_components() -> None:
    jobs = cli.jobs_from_queue(cli.parse_squeue(SQUEUE_HET))
    assert [j.job_id for j in jobs] == ["5", "9"]
    assert jobs[0].nodes == ["n1", "n2"] and jobs[0].tag == cli.Comment("abc", "ready", "http://10.2.0.1:8000")
    assert jobs[1].state == "PENDING" and jobs[1].reason == "Resources" and jobs[1].tag == cli.Comment("def")
    with pytest.raises(cli.SlurmOutputError):
        cli.parse_squeue("5+0 het3 RUNNING\n")


def test_comment_and_state_file() -> None:
    assert cli.parse_comment("hello") is None
    assert cli.parse_comment("disaggctl:") is None
    assert cli.parse_comment("disaggctl:h1:failed") == cli.Comment("h1", "failed", "")
    text = "job=12\nstate=ready\nendpoint=http://10.0.0.2:8000\nurl.decode-0=http://10.0.0.3:8100\n"
    assert cli.parse_state_file(text)["url.decode-0"] == "http://10.0.0.3:8100"


def test_argv_builders() -> None:
    assert cli.sbatch_argv() == ["sbatch", "--parsable"]
    assert cli.sbatch_argv(["--hold"], "/x/job.sbatch") == ["sbatch", "--parsable", "--hold", "/x/job.sbatch"]
    assert cli.scancel_argv("5", signal="TERM", batch=True) == ["scancel", "--batch", "--signal=TERM", "5"]
    assert cli.scancel_argv("5") == ["scancel", "5"]
    assert "--name=disaggctl-x" in cli.squeue_argv("disaggctl-x") and "--me" in cli.squeue_argv("x")


def test_relevant_lines_start_at_the_failure_report() -> None:
    out = ("2026 disaggctl[3]: starting decode-0 on n1\nsrun: error: n1: task 0: Exited with exit code 3\n"
           "2026 disaggctl[3]: FAILED: decode-0 exited before http://10.0.0.1:8100/health answered\n"
           "  | fatal: cannot load model\n2026 disaggctl[3]: stopped\n")
    lines = cli.relevant_lines(out)
    assert lines[0].endswith("answered") and "  | fatal: cannot load model" in lines
    # no report (killed before): Slurm's own error lines
    assert cli.relevant_lines("ok\nslurmstepd: error: *** JOB 3 CANCELLED DUE TO TIME LIMIT ***\nok\n") == [
        "slurmstepd: error: *** JOB 3 CANCELLED DUE TO TIME LIMIT ***"]


@pytest.mark.parametrize(("limit", "seconds"), [
    ("30", 1800), ("1:30", 90), ("04:00:00", 14400), ("2-0", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_time_limit(limit: str, seconds: int) -> None:
    assert time_limit_s(limit) == seconds


def test_grace_is_bounded() -> None:
    assert grace_s(14400) == 120 and grace_s(120) == 30 and grace_s(20) == 10


def test_signal_early_slack_is_what_the_installed_sbatch_says() -> None:
    """SIGNAL_EARLY_S comes from the installed Slurm's own sbatch(1): --signal "may be sent up to 60 seconds
    earlier than specified" (a successor must take over before that earliest moment)."""
    import gzip
    import re

    page = Path("/usr/share/man/man1/sbatch.1.gz")
    assert page.exists(), "sbatch(1) not installed (slurm-client from scripts/install-test-deps.sh)"
    text = " ".join(gzip.decompress(page.read_bytes()).decode(errors="replace").split())
    m = re.search(r"the signal may be sent up to (\d+) seconds earlier than specified", text)
    assert m, "sbatch(1) no longer says how early --signal may come"
    assert int(m.group(1)) == SIGNAL_EARLY_S


@pytest.mark.parametrize(("limit", "lead", "ok"), [
    ("2", 1, False), ("2", 30, False), ("3", 1, False), ("3", 2, True), ("4", 2, False), ("4", 3, True),
    ("12:00:00", 3, False), ("12:00:00", 4, True), ("04:00:00", 30, True),
])
def test_successor_lead_must_beat_the_shutdown_signal(limit: str, lead: int, ok: bool) -> None:
    """validate refuses a lead with which the job's own --signal (up to 60 s early) could stop it before its
    successor takes over; the error names target.successor.lead_minutes and says the lead that works."""
    from disaggctl.errors import SpecError
    from disaggctl.loader import load_text

    text = (REPO / "examples" / "h100-slurm.yaml").read_text()
    text = text.replace('time_limit: "12:00:00"', f'time_limit: "{limit}"').replace("lead_minutes: 30",
                                                                                  f"lead_minutes: {lead}")
    if ok:
        load_text(text, "s.yaml")
        return
    with pytest.raises(SpecError) as e:
        load_text(text, "s.yaml")
    msg = str(e.value)
    assert "target.successor.lead_minutes" in msg and "s.yaml:" in msg and "up to 60 s early" in msg, msg
    assert "at least" in msg or "longer time_limit" in msg, msg


def _job(job_id: str, comment: str, state: str = "RUNNING") -> cli.Job:
    return cli.Job(job_id=job_id, name="disaggctl-x", state=state, reason="None", nodes=["n1"], comment=comment)


def test_compute_plan() -> None:
    assert compute_plan("h", []).submit and not compute_plan("h", []).cancel
    p = compute_plan("h", [_job("4", "disaggctl:h:ready:http://a:1")])
    assert not p.changes and p.keep == "4"
    p = compute_plan("h", [_job("4", "disaggctl:old:ready:http://a:1")])
    assert p.cancel == ["4"] and p.submit
    # a successor overlapping its predecessor (same script): both kept, the newest is the one
    p = compute_plan("h", [_job("4", "disaggctl:h:ready"), _job("7", "disaggctl:h:starting")])
    assert p.keep == "7" and not p.changes
    # a failed job with the right script is replaced
    p = compute_plan("h", [_job("4", "disaggctl:h:failed")])
    assert p.cancel == ["4"] and p.submit
    # somebody else's job under our name (no disaggctl comment) is cancelled too
    assert compute_plan("h", [_job("4", "")]).cancel == ["4"]
