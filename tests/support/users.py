"""Another local user of this machine, for tests of what other accounts can reach.

Loopback is no trust boundary: on a login node, every user of the machine can connect to
a server on 127.0.0.1. The tests run as root; the session fixture ``other_user`` makes an
unprivileged account without a home or a login shell (once, and keeps it, as the test
cluster keeps its user), and :func:`run_as` runs a command as that account.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Sequence

import pytest

from tests.support import service_unavailable

OTHER_USER = "msother"


def run_as(user: str, argv: Sequence[str], *, timeout: float = 30
           ) -> subprocess.CompletedProcess[str]:
    """``argv`` run as ``user``, with an environment of its own (nothing of this process's,
    so nothing the test knows, such as a key, reaches it unless it is in ``argv``)."""
    account = pwd.getpwnam(user)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": account.pw_dir, "USER": user, "LOGNAME": user, "LANG": "C.UTF-8"}
    return subprocess.run(["runuser", "-u", user, "--", *argv], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def other_user() -> str:
    """The name of an unprivileged local account that is not the one the server runs as."""
    if os.geteuid() != 0:
        service_unavailable("another local user needs root to be created (useradd)")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               OTHER_USER], capture_output=True, text=True)
        try:
            pwd.getpwnam(OTHER_USER)  # or another test run made it meanwhile
        except KeyError:
            pytest.fail(f"useradd {OTHER_USER} failed: {made.stderr}", pytrace=False)
    return OTHER_USER
