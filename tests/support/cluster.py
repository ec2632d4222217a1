"""A real single-node test cluster (Slurm 22.05 with its PBS wrappers, behind sshd).

Built from Debian packages by the project itself, as root, in a few seconds. Everything
it starts reads a private configuration in a fresh state folder: munged on its own
socket, slurmctld and slurmd with their own ``slurm.conf`` (found through
``SLURM_CONF``, which sshd sets for every session), and an sshd with its own host key
that lets the cluster user in with one generated client key. Nothing under ``/etc`` is
changed; the only system-wide traces are the cluster user (kept) and its per-cluster
``authorized_keys`` file (removed by :meth:`TestCluster.stop`).

When the machine allows it, the cluster lives in its own network namespace joined to
this machine by a veth pair: the server reaches sshd at the namespace's address, and
jobs reach the server only at :attr:`TestCluster.server_address`, as on a real cluster.
Otherwise everything listens on 127.0.0.1 (``mode == "loopback"``).

Use it from pytest through the session fixture ``test_cluster`` (``pytest_plugins =
["tests.support.cluster"]``), or by hand: ``python -m tests.support.cluster up``.
See docs/test-cluster.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tests.support import service_unavailable
from tests.support.leaks import watch_folder
from tests.support.processes import descendants

# Its fixture declares the processes that may run until the session ends.
pytest_plugins = ["tests.support.leaks"]

PACKAGES = (
    "openssh-server",
    "munge",
    "slurmctld",
    "slurmd",
    "slurm-client",
    "slurm-wlm-basic-plugins",
    "slurm-wlm-torque",
    "iproute2",
)
INSTALL_SCRIPT = Path(__file__).with_name("install-system-packages.sh")
USER = "msjob"
SSH_PORT = 2222
# Finished jobs stay visible to qstat/scontrol this long (the monitor's tests rely on it).
MIN_JOB_AGE = 300
# Jobs that trap SIGTERM are killed this soon after qdel or a walltime kill.
KILL_WAIT = 5
# /30 subnets tried for the veth pair, one per cluster running on this machine.
SUBNET_BASE = ipaddress.IPv4Network("10.200.0.0/16")

Mode = Literal["netns", "loopback"]


class ClusterError(RuntimeError):
    """The test cluster could not be built; the message says why."""


@dataclass
class TestCluster:
    """A running test cluster, and how to reach it."""

    __test__ = False  # not a pytest test class, despite its name

    host: str
    """Where sshd listens (the namespace's address, or 127.0.0.1)."""
    port: int
    user: str
    key_file: Path
    """The cluster user's private ed25519 key (no passphrase)."""
    known_hosts: Path
    """A known_hosts file that lists exactly this cluster's host key."""
    server_address: str
    """The address a web server must bind so that jobs on the cluster can reach it."""
    state_dir: Path
    mode: Mode
    slurm_conf: Path
    netns: str | None = None
    _veth: str | None = None
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _sshd_argv: list[str] = field(default_factory=list)

    def in_cluster(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it must run to be on the cluster's network (a server on the login
        node, a command as a login would run it)."""
        if self.netns is None:
            return list(argv)
        # Not `ip netns exec`: it remounts /sys, hiding the cgroup mount that slurmd needs.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def run_as_user(
        self, cmd: str | Sequence[str], *, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on the cluster as the cluster user, as a login would (home folder,
        ``SLURM_CONF``): to qdel behind the server's back, or read what a job left.

        A string is a ``sh -c`` command line; a sequence is executed as is.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        home = pwd.getpwnam(self.user).pw_dir
        env = {
            "HOME": home,
            "USER": self.user,
            "LOGNAME": self.user,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SLURM_CONF": str(self.slurm_conf),
            "LANG": "C.UTF-8",
        }
        return subprocess.run(
            self.in_cluster(
                [
                    "setpriv",
                    f"--reuid={self.user}",
                    f"--regid={self.user}",
                    "--init-groups",
                    "--",
                    *argv,
                ]
            ),
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    @contextlib.contextmanager
    def slurm_setting(self, name: str, value: str) -> Iterator[None]:
        """Change one line of ``slurm.conf`` (such as ``MinJobAge``) while the block runs,
        with ``scontrol reconfigure``; the old line comes back after it."""
        line = re.compile(rf"^{re.escape(name)}=.*$", re.MULTILINE)
        if not line.search(self.slurm_conf.read_text()):
            raise ClusterError(f"no {name} line in {self.slurm_conf}")
        with self._slurm_conf_changed(lambda text: line.sub(f"{name}={value}", text)):
            yield

    @contextlib.contextmanager
    def oversubscribed(self, jobs_per_cpu: int) -> Iterator[None]:
        """While the block runs, up to ``jobs_per_cpu`` jobs share each CPU of the node
        (``OverSubscribe=FORCE`` on the default partition): more jobs run at once than
        this machine has CPUs (often 2)."""
        line = re.compile(r"^(PartitionName=batch .*)$", re.MULTILINE)
        with self._slurm_conf_changed(
                lambda text: line.sub(rf"\1 OverSubscribe=FORCE:{jobs_per_cpu}", text)):
            yield

    @contextlib.contextmanager
    def _slurm_conf_changed(self, change: Callable[[str], str]) -> Iterator[None]:
        before = self.slurm_conf.read_text()
        self.slurm_conf.write_text(change(before))
        try:
            self._reconfigure()
            yield
        finally:
            self.slurm_conf.write_text(before)
            self._reconfigure()

    @contextlib.contextmanager
    def without_requeue(self) -> Iterator[None]:
        """While the block runs, jobs submitted are not requeued when their node fails
        (``JobRequeue=0``): they end NODE_FAIL, as on a site that requeues nothing;
        Slurm's default would put them back in the queue."""
        with self._slurm_conf_changed(lambda text: text + "JobRequeue=0\n"):
            yield

    @contextlib.contextmanager
    def failed_node(self) -> Iterator[None]:
        """While the block runs, the node has failed: slurmd is killed (SIGKILL, as in a
        crash) and the node is set DOWN, which ends the jobs running on it NODE_FAIL at
        once: Slurm's own verdict on an unresponsive node waits for SlurmdTimeout (300 s
        by default), too long for a test. Its jobs' processes run on under slurmstepd
        until slurmd is back: it then kills them, as orphans, and the node is resumed."""
        slurmd = self._procs.pop("slurmd")
        slurmd.kill()
        slurmd.wait()
        try:
            self._admin(["scontrol", "update", "nodename=localhost", "state=down",
                         "reason=metis-test node failure"])
            yield
        finally:
            self._spawn_slurmd()
            # With ReturnToService=2 a registering node may be back already: then resume
            # is refused, and that is fine.
            self._admin(["scontrol", "update", "nodename=localhost", "state=resume"],
                        check=False)
            _wait_for(self.node_idle, 60, "the Slurm node to be idle again", self)

    def node_idle(self) -> bool:
        out = self.run_as_user(["sinfo", "-h", "-o", "%T"], timeout=10).stdout.split()
        return "idle" in out

    def _admin(self, argv: Sequence[str], *, check: bool = True) -> None:
        """A Slurm command as root (an administrator's)."""
        subprocess.run(self.in_cluster(argv), check=check, capture_output=True, timeout=60,
                       env={**os.environ, "SLURM_CONF": str(self.slurm_conf)})

    def _spawn_slurmd(self) -> None:
        self._procs["slurmd"] = _spawn(
            self.in_cluster(["slurmd", "-D", "-N", "localhost", "-f", str(self.slurm_conf)]),
            self.state_dir, "slurmd")

    def _reconfigure(self) -> None:
        """``scontrol reconfigure``, as root (an administrator's command)."""
        self._admin(["scontrol", "reconfigure"])

    def restart_sshd(self) -> None:
        """Stop sshd and start it again on the same address and port. Open SSH
        connections drop, as when a login node reboots."""
        self.stop_sshd()
        self.start_sshd()

    def stop_sshd(self) -> None:
        """Stop sshd and every connection it serves: nothing reaches the cluster over SSH
        (connection refused) until :meth:`start_sshd`. Jobs run on."""
        # A connection's processes outlive the listener: end them too.
        self.drop_connections()
        _stop_process(self._procs.pop("sshd"))

    def start_sshd(self) -> None:
        """Start sshd (again) on the cluster's address and port; returns once it listens."""
        self._procs["sshd"] = _spawn(self.in_cluster(self._sshd_argv), self.state_dir, "sshd")
        _wait_for(lambda: _port_open(self.host, self.port), 10, "sshd to listen", self)

    def stop_slurmctld(self) -> None:
        """Stop slurmctld (it saves its state): Slurm's commands fail, as when the
        controller is down, while running jobs go on under slurmd."""
        _stop_process(self._procs.pop("slurmctld"))

    def start_slurmctld(self) -> None:
        """Start slurmctld (again) from its saved state; returns once it answers."""
        self._spawn_slurmctld()

        def answers() -> bool:
            return self.run_as_user(["squeue", "-h"], timeout=10).returncode == 0

        _wait_for(answers, 30, "slurmctld to answer", self)

    def _spawn_slurmctld(self) -> None:
        self._procs["slurmctld"] = _spawn(
            self.in_cluster(["slurmctld", "-D", "-f", str(self.slurm_conf)]),
            self.state_dir, "slurmctld")

    def drop_connections(self) -> None:
        """Cut every open SSH connection (as a network failure would); sshd keeps
        accepting new ones."""
        # Each connection has its own sshd processes, forked from the listener.
        for process in descendants(self._procs["sshd"].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    def forge_known_hosts(self, path: Path) -> Path:
        """Write a known_hosts file that lists a *different* key for this cluster's
        address, as after a host key change (or an attack): a client must refuse it."""
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / "forged"
            _keygen(key, "forged")
            public = key.with_suffix(".pub").read_text().split()[:2]
        path.write_text(f"{_known_hosts_name(self.host, self.port)} {' '.join(public)}\n")
        return path

    def config_toml(self) -> str:
        """``[clusters.*]`` blocks for metis-stream's config: the same cluster through
        its PBS wrappers and through Slurm."""
        blocks = []
        for name, scheduler in (("test", "pbs"), ("test_slurm", "slurm")):
            blocks.append(
                f"[clusters.{name}]\n"
                f'scheduler = "{scheduler}"\n'
                f'host = "{self.host}"\n'
                f"port = {self.port}\n"
                f'user = "{self.user}"\n'
                f'key_file = "{self.key_file}"\n'
                f'known_hosts = "{self.known_hosts}"\n'
                'workdir = "metis-stream"\n'
                "poll_interval = 2\n"
            )
        return f'[server]\nhost = "{self.server_address}"\n\n' + "\n".join(blocks)

    def logs(self) -> str:
        """The tail of every daemon's log, for error messages."""
        parts = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the cluster's jobs, stop exactly the daemons this cluster started,
        and remove its namespace, veth pair, authorized key and state folder."""
        if "slurmctld" in self._procs:
            # Running jobs live in slurmstepd processes that outlive slurmd: end them first.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run_as_user(["scancel", "--user", self.user], timeout=10)
                deadline = time.monotonic() + KILL_WAIT + 5
                while time.monotonic() < deadline:
                    out = self.run_as_user(["squeue", "-h", "-t", "RUNNING,COMPLETING"]).stdout
                    if not out.strip():
                        break
                    time.sleep(0.2)
        if "sshd" in self._procs:
            self.stop_sshd()
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self._procs:
                _stop_process(self._procs.pop(name))
        _authorized_keys(self.user, self.state_dir.name).unlink(missing_ok=True)
        if self._veth is not None:
            subprocess.run(["ip", "link", "del", self._veth], capture_output=True)
        if self.netns is not None:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- building


def build_cluster(*, netns: bool = True) -> TestCluster:
    """Install what is missing, then configure and start a new cluster.

    Raises ClusterError with the reason (and daemon logs) when it cannot.
    """
    if os.geteuid() != 0:
        raise ClusterError("building the test cluster needs root")
    install = subprocess.run([str(INSTALL_SCRIPT), *PACKAGES], capture_output=True, text=True)
    if install.returncode != 0:
        raise ClusterError(f"installing {' '.join(PACKAGES)} failed:\n{install.stderr}")
    _ensure_user(USER)

    # Traversable by the cluster user and by slurm (munge socket, slurm.conf); the secrets
    # inside have their own modes.
    state = Path(tempfile.mkdtemp(prefix="metis-cluster-"))
    state.chmod(0o755)
    for sub in ("log", "run", "ssh"):
        (state / sub).mkdir()
    slurm_conf = state / "slurm.conf"
    cluster = TestCluster(
        host="127.0.0.1",
        port=SSH_PORT,
        user=USER,
        key_file=state / "ssh" / "id_ed25519",
        known_hosts=state / "ssh" / "known_hosts",
        server_address="127.0.0.1",
        state_dir=state,
        mode="loopback",
        slurm_conf=slurm_conf,
    )
    try:
        if netns:
            _try_netns(cluster)
        if cluster.mode == "loopback":
            cluster.port = _free_port()
            ctld_port, slurmd_port = _free_port(), _free_port()
        else:
            ctld_port, slurmd_port = 6817, 6818  # alone in the namespace: the defaults
        _start_munge(cluster)
        _write_slurm_conf(cluster, ctld_port, slurmd_port)
        _start_slurm(cluster)
        _setup_ssh(cluster)
        cluster.start_sshd()
    except BaseException as exc:
        logs = cluster.logs()
        cluster.stop()
        if isinstance(exc, ClusterError | subprocess.SubprocessError | OSError):
            raise ClusterError(f"{exc}\n{logs}") from exc
        raise
    return cluster


def _try_netns(cluster: TestCluster) -> None:
    """Put the cluster in a namespace of its own, or leave it on loopback if refused."""
    name = f"metis-{os.getpid()}-{secrets.token_hex(2)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return
    cluster.netns = name
    subnet = _free_subnet()
    host_ip, ns_ip = (str(a) for a in list(subnet.hosts())[:2])
    tag = secrets.token_hex(3)
    outside, inside = f"msv{tag}h", f"msv{tag}c"  # interface names: 15 characters at most
    steps = [
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", name],
        ["ip", "addr", "add", f"{host_ip}/{subnet.prefixlen}", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", name, "addr", "add", f"{ns_ip}/{subnet.prefixlen}", "dev", inside],
        ["ip", "-n", name, "link", "set", inside, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    for step in steps:
        if subprocess.run(step, capture_output=True).returncode != 0:
            # A sandbox may allow namespaces but not veth pairs: fall back as a whole.
            if step is not steps[0]:
                subprocess.run(["ip", "link", "del", outside], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            cluster.netns = None
            return
        if step is steps[0]:
            cluster._veth = outside
    cluster.mode, cluster.host, cluster.server_address = "netns", ns_ip, host_ip


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /30 of SUBNET_BASE that no interface on this machine uses."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    taken = [ipaddress.IPv4Interface(m).network for m in re.findall(r"inet (\S+)", used.stdout)]
    for subnet in SUBNET_BASE.subnets(new_prefix=30):
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise ClusterError(f"no free /30 left in {SUBNET_BASE}")


def _ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        _run(["useradd", "--create-home", "--shell", "/bin/bash", user])
    # A '!' (locked) password makes sshd refuse even key logins when UsePAM is off.
    _run(["usermod", "-p", "*", user])


def _start_munge(cluster: TestCluster) -> None:
    """munged on a socket of its own: a socket is a file, so it serves the namespace too."""
    munge = cluster.state_dir / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    log = cluster.state_dir / "log" / "munged.log"
    log.touch()
    for path in (munge, key, log):
        shutil.chown(path, "munge", "munge")
    socket_path = munge / "munge.socket"
    argv = [
        "munged",
        "--foreground",
        f"--socket={socket_path}",
        f"--key-file={key}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--seed-file={munge / 'munged.seed'}",
        f"--log-file={log}",
    ]
    cluster._procs["munged"] = _spawn(argv, cluster.state_dir, "munged", user="munge")
    _wait_for(socket_path.exists, 10, "munged's socket", cluster)


def _write_slurm_conf(cluster: TestCluster, ctld_port: int, slurmd_port: int) -> None:
    state = cluster.state_dir
    for sub in ("slurmctld", "slurmd"):
        (state / sub).mkdir(mode=0o755)
    # slurmctld runs as slurm and must write its state and log.
    shutil.chown(state / "slurmctld", "slurm", "slurm")
    shutil.chown(state / "log", "slurm", "slurm")
    plugstack = state / "plugstack.conf"
    # spank_pbs gives jobs PBS_JOBID, PBS_O_WORKDIR, ... as PBS would.
    plugstack.write_text("required spank_pbs.so\n")
    cpus = os.cpu_count() or 1
    memory_mb = _memory_mb() * 9 // 10  # slurmd drains a node that has less than announced
    cluster.slurm_conf.write_text(f"""\
# Written by tests/support/cluster.py for one test cluster.
ClusterName=metistest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=socket={state / "munge" / "munge.socket"}
CredType=cred/munge
StateSaveLocation={state / "slurmctld"}
SlurmdSpoolDir={state / "slurmd"}
SlurmctldPidFile={state / "run" / "slurmctld.pid"}
SlurmdPidFile={state / "run" / "slurmd.pid"}
SlurmctldLogFile={state / "log" / "slurmctld.log"}
SlurmdLogFile={state / "log" / "slurmd.log"}
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
EnforcePartLimits=ALL
KillWait={KILL_WAIT}
MinJobAge={MIN_JOB_AGE}
ReturnToService=2
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=batch Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost MaxTime=00:10:00 State=UP
""")


def _start_slurm(cluster: TestCluster) -> None:
    cluster._spawn_slurmctld()
    cluster._spawn_slurmd()
    _wait_for(cluster.node_idle, 30, "the Slurm node to be idle", cluster)


def _setup_ssh(cluster: TestCluster) -> None:
    ssh = cluster.state_dir / "ssh"
    ssh.chmod(0o700)
    host_key = ssh / "ssh_host_ed25519_key"
    _keygen(host_key, "metis-test-host")
    _keygen(cluster.key_file, "metis-test-client")
    host_public = host_key.with_suffix(".pub").read_text().split()[:2]
    cluster.known_hosts.write_text(
        f"{_known_hosts_name(cluster.host, cluster.port)} {' '.join(host_public)}\n"
    )
    # StrictModes wants the key under the user's own ~/.ssh; one file per cluster, so that
    # two clusters (a developer's and a test run's) can share the user.
    user = pwd.getpwnam(cluster.user)
    dot_ssh = Path(user.pw_dir) / ".ssh"
    dot_ssh.mkdir(mode=0o700, exist_ok=True)
    os.chown(dot_ssh, user.pw_uid, user.pw_gid)
    keys = _authorized_keys(cluster.user, cluster.state_dir.name)
    keys.write_text(cluster.key_file.with_suffix(".pub").read_text())
    os.chown(keys, user.pw_uid, user.pw_gid)
    keys.chmod(0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    config = ssh / "sshd_config"
    config.write_text(f"""\
ListenAddress {cluster.host}
Port {cluster.port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile .ssh/{keys.name}
AllowUsers {cluster.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
MaxSessions 10
MaxStartups 50:30:100
# VERBOSE: a "Starting session: command" line for each command run, which tests count.
LogLevel VERBOSE
SetEnv SLURM_CONF={cluster.slurm_conf}
Subsystem sftp internal-sftp
""")
    cluster._sshd_argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]


def _keygen(path: Path, comment: str) -> None:
    """A new ed25519 key pair without a passphrase: ``path`` and ``path.pub``."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _authorized_keys(user: str, cluster_name: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir) / ".ssh" / f"authorized_keys.{cluster_name}"


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


# ---------------------------------------------------------------------------- processes


def _spawn(
    argv: Sequence[str], state: Path, name: str, *, user: str | None = None
) -> subprocess.Popen[bytes]:
    """Start a daemon in the foreground as our own child, so its PID is known for certain
    and it is reaped when stopped. Its own session keeps a terminal's Ctrl-C away from it:
    the cluster stops it in order."""
    log = (state / "log" / f"{name}.out").open("ab")
    with log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for(check: Callable[[], bool], timeout: float, what: str, cluster: TestCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if check():
                return
        dead = [n for n, p in cluster._procs.items() if p.poll() is not None]
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}")
        time.sleep(0.1)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("no MemTotal in /proc/meminfo")


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")


# ---------------------------------------------------------------------------- pytest


@pytest.fixture(scope="session")
def test_cluster(pytestconfig: pytest.Config) -> Iterator[TestCluster]:
    """The session's test cluster. In CI (CI=true) a cluster that cannot be built fails
    the test; elsewhere the test is skipped only when not running as root."""
    if os.geteuid() != 0:
        service_unavailable("the test cluster needs root (it installs packages and starts "
                            "daemons)")
    try:
        cluster = build_cluster()
    except ClusterError as exc:
        pytest.fail(f"could not build the test cluster: {exc}", pytrace=False)
    # Its daemons and jobs (under slurmstepd, outside this process's tree, each with
    # SLURM_CONF) may run until the session ends: then stop() ends them.
    watch_folder(pytestconfig, cluster.state_dir, session_wide=True)
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------- by hand


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["up"]:
        print("usage: python -m tests.support.cluster up", file=sys.stderr)
        return 2
    try:
        cluster = build_cluster()
    except ClusterError as exc:
        print(f"could not build the test cluster: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"mode:            {cluster.mode}")
        print(f"ssh:             {cluster.user}@{cluster.host} port {cluster.port}")
        print(f"key_file:        {cluster.key_file}")
        print(f"known_hosts:     {cluster.known_hosts}")
        print(f"server_address:  {cluster.server_address}  (bind the server here)")
        print(f"state_dir:       {cluster.state_dir}")
        print(f"netns:           {cluster.netns or '-'}")
        print(
            f"try:  ssh -i {cluster.key_file} -o UserKnownHostsFile={cluster.known_hosts}"
            f" -p {cluster.port} {cluster.user}@{cluster.host} sinfo"
        )
        print("\n# metis-stream config:\n" + cluster.config_toml())
        print("Up. Ctrl-C stops the cluster.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", file=sys.stderr)
        cluster.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # `kill` stops the cluster as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main(sys.argv[1:]))
