"""How disaggctl reaches the job's processes on the compute nodes, and `status --check` on a job.

Slurm picks the nodes; the job publishes their run-time addresses in its state file
(`url.<process>=`). Who can reach those addresses:

- sbatch runs on this machine (no `target.submit.host`): disaggctl runs on a login or service
  node of the cluster, which reaches the compute nodes; HTTP goes from here (urllib).
- `target.submit.host`: the operator reaches the login host, typically not the compute nodes
  (a laptop, a CI runner outside the cluster network). Every HTTP request to a node (apply's
  health gate and canary, status's /health, `status --check`'s /metrics) then leaves FROM the
  login host, as a direct-tcpip channel of the SSH connection disaggctl already holds to run
  sbatch/squeue there (`disaggctl.ssh.Connection.http`, the same path as the systemd target's
  bastion-only hosts, `targets/systemd/access.SshHttp`).

Why not a check inside the job (`srun --overlap --jobid N curl ...`): it needs curl or Python
on the nodes (or in the container image), costs one job step and slurmctld round trip per
request (seconds each), and the canary's POSTs would need it too; the login host reaching the
nodes' service ports is already what clients of the endpoint need. What the channel needs:
the login host's sshd allows TCP forwarding (OpenSSH's default; a site with
`AllowTcpForwarding no` answers "Administratively prohibited": the error names the setting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec
    from disaggctl.ssh import Connection
    from disaggctl.targets.invariants import InvariantCheck
    from disaggctl.targets.slurm import cli


class NodeHttp(Protocol):
    """HTTP to the job's processes: probe/fetch for /health and /metrics, request for the canary."""

    where: str

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]: ...

    def fetch(self, url: str, timeout_s: float) -> bytes: ...

    def request(
        self, method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]: ...


class DirectHttp:
    """From this machine."""

    where = "this machine"

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]:
        from disaggctl.health import http_probe

        return http_probe(url, timeout_s)

    def fetch(self, url: str, timeout_s: float) -> bytes:
        from disaggctl.targets.gate import http_fetch

        return http_fetch(url, timeout_s)

    def request(
        self, method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        from disaggctl.health import urllib_request

        return urllib_request(method, url, body, timeout_s, headers)


class LoginHostHttp:
    """From the login host, through the SSH connection that runs sbatch there: every URL goes through it
    (the systemd target's SshHttp with that one connection as the default)."""

    def __init__(self, conn: Connection, where: str) -> None:
        from disaggctl.targets.systemd.access import SshHttp

        self.where = f"{where} (SSH)"
        self._via = SshHttp({where: conn}, {}, where)

    def request(
        self, method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        try:
            return self._via.request(method, url, body, timeout_s, headers)
        except OSError as e:
            if "Administratively prohibited" in str(e):
                raise OSError(f"{e}: the login host's sshd does not allow TCP forwarding (AllowTcpForwarding), "
                              "which disaggctl uses to reach the compute nodes from there") from None  # fmt: skip
            raise

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]:
        try:
            status, _ = self.request("GET", url, None, timeout_s, {})
        except OSError as e:
            return False, str(e)
        return status == 200, str(status) if status == 200 else f"HTTP {status}"

    def fetch(self, url: str, timeout_s: float) -> bytes:
        status, body = self.request("GET", url, None, timeout_s, {})
        if status != 200:
            raise OSError(f"GET {url}: HTTP {status}")
        return body


def job_checks(
    spec: ClusterSpec,
    desired: DesiredState,
    job: cli.Job | None,
    fields: Mapping[str, str],
    digest: str,
    fetch: Callable[[str, float], bytes],
) -> list[InvariantCheck]:
    """`status --check` on the job status reports (the newest running one): its instances' and its
    router's /metrics at the URLs of its state file, read with `fetch`; fingerprints from the argv the
    job runs, which are the spec's compiled argv when the job's script hash is the spec's (the hash
    covers every launcher's argv); a job running another script has its fingerprints unchecked."""
    from disaggctl.targets.invariants import InvariantCheck, scrape_and_check
    from disaggctl.targets.rollout import running_fingerprints

    running = job is not None and job.running
    heads = [p for p in desired.processes if p.role.value in ("prefill", "decode") and p.name == p.instance]
    urls = {p.name: (p.role.value, fields[f"url.{p.name}"]) for p in heads if running and f"url.{p.name}" in fields}
    router_url = (fields.get("url.router") or fields.get("endpoint")) if running else None
    router = router_url.rstrip("/") + "/metrics" if router_url and spec.router.kind == "builtin" else None
    same = bool(running and job is not None and job.tag and job.tag.hash == digest)
    argv = {p.name: p.argv for p in heads} if same else {}
    checks = scrape_and_check(urls, router, running_fingerprints(spec, desired, argv), fetch)
    if running and not same and job is not None:
        why = f"job {job.job_id} runs another script than the spec renders to: its instances' argv are not known here"
        checks = [InvariantCheck(name=c.name, ok=None, detail=why) if c.name == "fingerprints_match" else c
                  for c in checks]  # fmt: skip
    return checks
