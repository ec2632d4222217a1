"""A second sshd on the test cluster whose login asks for a real second factor: the key,
then a time-based one-time code (TOTP) through keyboard-interactive, checked by Debian's
``pam_google_authenticator``; ``oathtool`` computes the codes (docs/login.md).

sshd always uses the PAM service ``sshd`` (``/etc/pam.d/sshd``): this one runs in a mount
namespace of its own, where a private PAM file is bind-mounted over that one, so nothing
under ``/etc`` changes for anyone else. It listens on its own port beside the cluster's
sshd, which keeps plain key logins for the other tests.

Use it through the module fixture ``mfa_sshd`` (with ``test_cluster``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cluster import (
    INSTALL_SCRIPT,
    SSH_PORT,
    TestCluster,
    _free_port,
    _known_hosts_name,
    _port_open,
    _spawn,
    _stop_process,
    _wait_for,
)
from tests.support.processes import descendants

PACKAGES = ("libpam-google-authenticator", "oathtool")
STEP = 30
"""Seconds a TOTP code lasts (pam_google_authenticator's default)."""


@dataclass
class SecondFactorSshd:
    """The second sshd, and the codes it takes."""

    cluster: TestCluster
    port: int
    known_hosts: Path
    secret: str
    """The TOTP secret, base32, as an authenticator app would hold it."""
    folder: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    _used: set[int] = field(default_factory=set)

    def code(self, step: int) -> str:
        """The code of TOTP time step ``step`` (seconds since the epoch // 30)."""
        result = subprocess.run(["oathtool", "--totp", "-b", "-N", f"@{step * STEP}",
                                 self.secret], capture_output=True, text=True, check=True)
        return result.stdout.strip()

    def fresh_code(self) -> str:
        """A valid code that no login has used yet: the secret's file says DISALLOW_REUSE,
        so a second login within 30 s takes the next step's code (the module accepts one
        step either side of now), and a third waits for the next step."""
        while True:
            now = int(time.time()) // STEP
            for step in (now, now + 1):
                if step not in self._used:
                    self._used.add(step)
                    return self.code(step)
            time.sleep(STEP - time.time() % STEP + 0.1)

    def wrong_code(self) -> str:
        """Six digits that are no code of any step near now."""
        now = int(time.time()) // STEP
        near = {self.code(step) for step in range(now - 3, now + 4)}
        while (code := f"{secrets.randbelow(10**6):06d}") in near:
            pass
        return code

    def drop_connections(self) -> None:
        """Cut every open connection to this sshd, as a network failure would."""
        assert self.process is not None
        for process in descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    def start(self) -> None:
        pam, config = self.folder / "pam-sshd", self.folder / "sshd_config"
        self.process = _spawn(self.cluster.in_cluster([
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount --bind "$1" /etc/pam.d/sshd && exec /usr/sbin/sshd -D -e -f "$2"',
            "sh", str(pam), str(config)]), self.folder, "sshd")
        _wait_for(lambda: _port_open(self.cluster.host, self.port), 10,
                  "the second-factor sshd to listen", self.cluster)

    def stop(self) -> None:
        if self.process is not None:
            self.drop_connections()
            _stop_process(self.process)
            self.process = None


def build(cluster: TestCluster) -> SecondFactorSshd:
    """Write the second sshd's configuration, PAM file and TOTP secret; not started."""
    install = subprocess.run([str(INSTALL_SCRIPT), *PACKAGES], capture_output=True, text=True)
    if install.returncode != 0:
        raise RuntimeError(f"installing {' '.join(PACKAGES)} failed:\n{install.stderr}")
    # Under the cluster's state folder: the PAM module reads the secret as the cluster
    # user, who must be able to reach it.
    folder = cluster.state_dir / f"mfa-{secrets.token_hex(3)}"
    (folder / "log").mkdir(parents=True)
    folder.chmod(0o755)
    user = pwd.getpwnam(cluster.user)
    private = folder / "secret"
    private.mkdir(mode=0o700)
    os.chown(private, user.pw_uid, user.pw_gid)
    secret = base64.b32encode(secrets.token_bytes(10)).decode()
    secret_file = private / "google_authenticator"
    # The module rewrites the file (DISALLOW_REUSE keeps the steps used), as that user.
    secret_file.write_text(f'{secret}\n" TOTP_AUTH\n" DISALLOW_REUSE\n" WINDOW_SIZE 3\n')
    secret_file.chmod(0o600)
    os.chown(secret_file, user.pw_uid, user.pw_gid)
    (folder / "pam-sshd").write_text(
        f"auth required pam_google_authenticator.so secret={secret_file} user={cluster.user}\n"
        "account required pam_permit.so\n"
        "session required pam_permit.so\n"
        "password required pam_deny.so\n")
    port = SSH_PORT + 1 if cluster.mode == "netns" else _free_port()
    # The cluster's own sshd's configuration, but on its own port and with
    # keyboard-interactive through PAM after the key.
    lines = []
    for line in (cluster.state_dir / "ssh" / "sshd_config").read_text().splitlines():
        setting = line.split(" ", 1)[0]
        if setting == "Port":
            line = f"Port {port}"
        elif setting == "UsePAM":
            line = "UsePAM yes"
        elif setting == "KbdInteractiveAuthentication":
            line = "KbdInteractiveAuthentication yes"
        lines.append(line)
    lines.append("AuthenticationMethods publickey,keyboard-interactive")
    (folder / "sshd_config").write_text("\n".join(lines) + "\n")
    host_public = (cluster.state_dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"{_known_hosts_name(cluster.host, port)} "
                           f"{' '.join(host_public[:2])}\n")
    return SecondFactorSshd(cluster=cluster, port=port, known_hosts=known_hosts,
                            secret=secret, folder=folder, log=folder / "log" / "sshd.out")


@pytest.fixture(scope="module")
def mfa_sshd(test_cluster: TestCluster) -> Iterator[SecondFactorSshd]:
    """A second sshd on the test cluster that asks for the key, then a TOTP code."""
    sshd = build(test_cluster)
    sshd.start()
    try:
        yield sshd
    finally:
        sshd.stop()
        subprocess.run(["rm", "-rf", str(sshd.folder)], check=False)
