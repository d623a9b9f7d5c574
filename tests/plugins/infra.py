"""Session fixtures that start REAL test infrastructure with the scripts in tests/infra/:
sshd hosts in network namespaces, systemd in systemd-nspawn containers, and a Slurm cluster.

They never skip: a real-component test that cannot get its infrastructure fails (CI must
provide it; `.ci/run` installs the packages). Each is started once per session.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "infra"
BASE = Path(os.environ.get("INFRA_BASE", "/tmp/dctl-infra"))


def _sh(*args: object, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([str(a) for a in args], env=e, text=True, capture_output=True, timeout=timeout)


# login users on every test host (fakehosts.sh, systemd_hosts.sh), all with the client key authorized
SUDO_USER = "deploy"  # sudo NOPASSWD
PASSWORD_USER = "askpass"  # sudo needs a password: `sudo -n` refuses
SUDO_PASSWORD = "askpass-pw"


@dataclass
class TestHosts:
    """Hosts reachable over SSH with `key` as root, SUDO_USER and PASSWORD_USER; host keys pinned
    in `known_hosts`. `jump`: the only host reachable from here when the hosts sit behind one."""

    __test__ = False  # a fixture value, not a test class

    base: Path
    hosts: list[tuple[str, str]]  # (name, ip)
    key: Path
    known_hosts: Path
    jump: tuple[str, str] | None = None  # (name, ip) of the bastion
    sudo_user: str = SUDO_USER
    password_user: str = PASSWORD_USER
    sudo_password: str = SUDO_PASSWORD

    def ip(self, name: str) -> str:
        return dict(self.hosts)[name]

    def names(self) -> list[str]:
        return [n for n, _ in self.hosts]

    def fs(self, name: str) -> Path:
        """Where a fakehost's private dirs (/root /opt /srv /home /var/tmp) are visible from here."""
        return self.base / name / "fs"


def _inventory(base: Path) -> list[tuple[str, str]]:
    out = []
    for line in (base / "inventory").read_text().splitlines():
        if line.strip():
            name, ip = line.split()[:2]
            out.append((name, ip))
    return out


def _hosts(base: Path) -> TestHosts:
    return TestHosts(base, _inventory(base), base / "client_key", base / "known_hosts")


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[TestHosts]:
    """8 sshd hosts h1..h8 at 10.200.0.11.. (own netns, hostname, private /root /opt /srv /home /var/tmp,
    own accounts: root, SUDO_USER, PASSWORD_USER)."""
    base = BASE / "hosts"
    env = {"FAKEHOSTS_BASE": str(base)}
    r = _sh(SCRIPTS / "fakehosts.sh", "up", os.environ.get("INFRA_SSH_HOSTS", "8"), env=env)
    if r.returncode:
        pytest.fail(f"fakehosts.sh up failed (needs root, iproute2, openssh-server):\n{r.stdout}{r.stderr}")
    yield _hosts(base)
    _sh(SCRIPTS / "fakehosts.sh", "down", env=env)


BASTION_ENV = {
    "FAKEHOSTS_BASE": str(BASE / "bastion"),
    "FAKEHOSTS_PREFIX": "tbst",
    "FAKEHOSTS_NET": "10.202.0",  # the jump host j1 = .10; the root namespace .1
    "FAKEHOSTS_PRIVATE_NET": "10.206.0",  # h1.. behind j1: no interface, no route from here
}


@pytest.fixture(scope="session")
def bastion_hosts() -> Iterator[TestHosts]:
    """3 sshd hosts h1..h3 at 10.206.0.11.. that only the jump host j1 (10.202.0.10) reaches:
    their network is a bridge inside j1's namespace. `hosts` lists h1..h3, `jump` is j1."""
    r = _sh(SCRIPTS / "fakehosts.sh", "bastion", os.environ.get("INFRA_BASTION_HOSTS", "3"), env=BASTION_ENV)
    if r.returncode:
        pytest.fail(f"fakehosts.sh bastion failed (needs root, iproute2, openssh-server, sudo):\n{r.stdout}{r.stderr}")
    base = BASE / "bastion"
    inv = _inventory(base)
    yield TestHosts(base, [h for h in inv if h[0] != "j1"], base / "client_key", base / "known_hosts", jump=inv[0])
    _sh(SCRIPTS / "fakehosts.sh", "down", env=BASTION_ENV)


@pytest.fixture(scope="session")
def systemd_hosts() -> Iterator[TestHosts]:
    """2 hosts s1, s2 at 10.201.0.11.. with a real systemd as PID 1 (systemd-nspawn) and sshd.

    A rootfs of an older recipe (e.g. without sudo) is rebuilt first (~75 s, once)."""
    base = BASE / "syshosts"
    env = {"SYSHOSTS_BASE": str(base), "SYSHOSTS_ROOTFS": os.environ.get("INFRA_ROOTFS", str(BASE / "rootfs"))}
    r = _sh(SCRIPTS / "systemd_hosts.sh", "up", os.environ.get("INFRA_SYSTEMD_HOSTS", "2"), env=env)
    if r.returncode:
        pytest.fail(f"systemd_hosts.sh up failed:\n{r.stdout}{r.stderr}")
    yield _hosts(base)
    _sh(SCRIPTS / "systemd_hosts.sh", "down", env=env)


@pytest.fixture(scope="session")
def systemd_bastion_hosts() -> Iterator[TestHosts]:
    """2 systemd-nspawn hosts s1, s2 at 10.205.0.11.. that only the jump host j1 (10.204.0.10, an
    sshd like fakehosts') reaches: their bridge lives in j1's namespace. `jump` is j1."""
    base = BASE / "syshosts-bastion"
    env = {"SYSHOSTS_BASE": str(base), "SYSHOSTS_ROOTFS": os.environ.get("INFRA_ROOTFS", str(BASE / "rootfs")),
           "SYSHOSTS_PREFIX": "tsb", "SYSHOSTS_NET": "10.205.0", "SYSHOSTS_JUMP_NET": "10.204.0"}
    r = _sh(SCRIPTS / "systemd_hosts.sh", "up", os.environ.get("INFRA_SYSTEMD_BASTION_HOSTS", "2"), env=env)
    if r.returncode:
        _sh(SCRIPTS / "systemd_hosts.sh", "down", env=env)
        pytest.fail(f"systemd_hosts.sh up (bastion) failed:\n{r.stdout}{r.stderr}")
    inv = _inventory(base)
    yield TestHosts(base, [h for h in inv if h[0] != "j1"], base / "client_key", base / "known_hosts", jump=inv[0])
    _sh(SCRIPTS / "systemd_hosts.sh", "down", env=env)


@dataclass
class SlurmCluster:
    env: dict[str, str]  # os.environ plus SLURM_CONF
    base: Path


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munge + slurmctld + 2 slurmd (n1, n2), 4 fake GPUs each (gres)."""
    sb = BASE / "slurm"
    env = {"SLURM_BASE": str(sb), "SLURM_NODES": os.environ.get("INFRA_SLURM_NODES", "2")}
    r = _sh(SCRIPTS / "slurm_up.sh", "up", env=env)
    if r.returncode:
        pytest.fail(f"slurm_up.sh up failed:\n{r.stdout}{r.stderr}")
    yield SlurmCluster(dict(os.environ, SLURM_CONF=str(sb / "etc" / "slurm.conf")), sb)
    _sh(SCRIPTS / "slurm_up.sh", "down", env=env)


@pytest.fixture(scope="session")
def slurm_netns_cluster() -> Iterator[SlurmCluster]:
    """4 Slurm nodes, each in its own network namespace with its own address and hostname."""
    sb = BASE / "slurm-ns"
    env = {"SLURM_BASE": str(sb), "SLURM_NODES": "4", "SLURM_CPUS": "8", "SLURM_FAKE_GPUS": "8"}
    r = _sh(SCRIPTS / "slurm_netns_up.sh", "up", env=env)
    if r.returncode:
        pytest.fail(f"slurm_netns_up.sh up failed:\n{r.stdout}{r.stderr}")
    yield SlurmCluster(dict(os.environ, SLURM_CONF=str(sb / "etc" / "slurm.conf")), sb)
    _sh(SCRIPTS / "slurm_netns_up.sh", "down", env=env)
