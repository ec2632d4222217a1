"""Logins with a second factor on the real test cluster (docs/login.md): a second sshd asks
for the key and then a TOTP code through keyboard-interactive (pam_google_authenticator),
and ``oathtool`` computes the codes an operator would read off an authenticator app.

The shell refuses to work with the key alone and says why; ``metis-stream login`` (the real
CLI, against a real server process) opens the connection that the server then keeps; a
job runs over it; a dropped connection makes the cluster ``login_needed`` without failing
its running job, and a new login brings it back.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from metis_stream.clusters import CAUSES
from metis_stream.errors import LoginNeeded, LoginRefused
from metis_stream.shells.ssh import SSHShell
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.second_factor import SecondFactorSshd, mfa_sshd  # noqa: F401
from tests.support.server import ServerProcess, script_templates

if TYPE_CHECKING:
    from playwright.sync_api import Browser
from tests.test_cluster_e2e import API_KEY, HEADERS, get_job, home_of, make_server, submit
from tests.test_cluster_outage import cluster_health, polls_after, wait_for
from tests.test_launcher_cluster import log_lines, watch
from tests.test_viewer import browser, viewer_on  # noqa: F401

pytestmark = pytest.mark.cluster

CLUSTER = "mfa"
WAITER = 'while [ ! -e "$METIS_JOB_DIR/go" ]; do sleep 0.2; done\necho "after the login"\n'
"""A job that runs until the test lets it end."""


def mfa_shell(sshd: SecondFactorSshd, *, second_factor: bool = False) -> SSHShell:
    cluster = sshd.cluster
    return SSHShell(cluster.host, port=sshd.port, user=cluster.user,
                    known_hosts=sshd.known_hosts, key_file=cluster.key_file, use_agent=False,
                    cluster=CLUSTER, second_factor=second_factor)


def key_logins(sshd: SecondFactorSshd) -> int:
    """Logins whose key sshd accepted, each then asked for the code."""
    return sshd.log.read_text().count("Partial publickey for")


# ---------------------------------------------------------------------------- the shell


@pytest.fixture
async def shell(mfa_sshd: SecondFactorSshd) -> AsyncIterator[SSHShell]:  # noqa: F811
    shell = mfa_shell(mfa_sshd)
    yield shell
    await shell.close()


async def test_the_key_alone_is_refused_with_a_second_factor_error(
        shell: SSHShell, mfa_sshd: SecondFactorSshd) -> None:  # noqa: F811
    before = key_logins(mfa_sshd)
    with pytest.raises(LoginNeeded, match="second factor") as info:
        await shell.run(["true"])
    assert f"metis-stream login {CLUSTER}" in str(info.value)
    assert shell.needs_login() is not None
    # Learned once: no command tries the key alone again, each would be a failed login.
    with pytest.raises(LoginNeeded):
        await shell.write_file("metis-mfa/never", b"x")
    assert key_logins(mfa_sshd) == before + 1
    assert shell.connections_opened == 0


async def test_a_wrong_code_is_refused_and_changes_nothing(
        shell: SSHShell, mfa_sshd: SecondFactorSshd) -> None:  # noqa: F811
    with pytest.raises(LoginNeeded):
        await shell.run(["true"])
    wrong = mfa_sshd.wrong_code()
    with pytest.raises(LoginRefused, match="refused the code") as info:
        await shell.login(wrong)
    assert wrong not in str(info.value)
    assert shell.needs_login() is not None and shell.connections_opened == 0
    with pytest.raises(LoginNeeded):
        await shell.run(["true"])


async def test_a_login_opens_the_connection_that_commands_share_until_it_drops(
        mfa_sshd: SecondFactorSshd) -> None:  # noqa: F811
    # Configured: the shell never tries the key alone.
    shell = mfa_shell(mfa_sshd, second_factor=True)
    before = key_logins(mfa_sshd)
    try:
        with pytest.raises(LoginNeeded):
            await shell.run(["true"])
        assert key_logins(mfa_sshd) == before
        assert await shell.login(mfa_sshd.fresh_code()) is True
        assert shell.needs_login() is None
        assert (await shell.run(["id", "-un"])).stdout == f"{mfa_sshd.cluster.user}\n"
        await shell.write_file("metis-mfa/file", b"over the login")
        assert await shell.read_file("metis-mfa/file", max_bytes=100) == b"over the login"
        # A second login while the connection is open uses no code.
        assert await shell.login("000000") is False
        assert shell.connections_opened == 1

        await anyio.to_thread.run_sync(mfa_sshd.drop_connections)
        with pytest.raises(LoginNeeded, match=f"metis-stream login {CLUSTER}"):
            await shell.run(["true"])
        assert shell.needs_login() is not None
        assert await shell.login(mfa_sshd.fresh_code()) is True
        assert (await shell.run(["rm", "-r", "metis-mfa"])).exit_status == 0
        assert shell.connections_opened == 2
    finally:
        await shell.close()


# ---------------------------------------------------------------------------- the server


@dataclass
class Env:
    cluster: TestCluster
    sshd: SecondFactorSshd
    server: ServerProcess
    base: str


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster, mfa_sshd: SecondFactorSshd,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("login")
    base = f"login-{folder.name}"
    config = (f"\n[clusters.{CLUSTER}]\nscheduler = \"slurm\"\nhost = \"{test_cluster.host}\"\n"
              f"port = {mfa_sshd.port}\nuser = \"{test_cluster.user}\"\n"
              f"key_file = \"{test_cluster.key_file}\"\n"
              f"known_hosts = \"{mfa_sshd.known_hosts}\"\nuse_agent = false\n"
              f"second_factor = true\nworkdir = \"{base}\"\npoll_interval = 1\n"
              + script_templates(folder / "scripts", {"waiter": WAITER}, cluster=CLUSTER))
    server = make_server(test_cluster, folder / "server", config)
    try:
        yield Env(test_cluster, mfa_sshd, server, base)
    finally:
        server.stop()
        # Whatever job a failed test left waits for its go file: let it end.
        test_cluster.run_as_user(f'for d in {base}/jobs/*/; do touch "$d/go"; done; sleep 1; '
                                 f"rm -rf {base}")


def login(server: ServerProcess, code: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``metis-stream login`` as an operator runs it, the code on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "login", CLUSTER, "--url", server.url,
         "--key", API_KEY, *options], input=f"{code}\n", capture_output=True, text=True,
        timeout=60)


def state_of(server: ServerProcess) -> str:
    state: str = cluster_health(server, CLUSTER)["state"]
    return state


def metric(server: ServerProcess, state: str) -> str:
    text = httpx.get(f"{server.url}/metrics", headers=HEADERS, timeout=10).text
    return next(line for line in text.splitlines()
                if line.startswith(f'metis_cluster_state{{cluster="{CLUSTER}",state="{state}"}}'))


def test_a_second_factor_cluster_waits_for_a_login_and_keeps_it(
        env: Env, browser: Browser) -> None:  # noqa: F811
    server, sshd, cluster = env.server, env.sshd, env.cluster
    # Before any login: shown as such, even without jobs, and submissions are refused.
    health = wait_for(lambda: (h := cluster_health(server, CLUSTER))["state"] == "login_needed"
                      and h, 10, "the cluster to wait for a login")
    assert "second factor" in health["last_error"]
    assert metric(server, "login_needed").endswith(" 1.0")
    refused = httpx.post(f"{server.url}/api/jobs", headers=HEADERS, timeout=10,
                         json={"template": "waiter"})
    assert refused.status_code == 503, refused.text
    assert f"metis-stream login {CLUSTER}" in refused.json()["error"]
    assert httpx.get(f"{server.url}/api/jobs", headers=HEADERS, timeout=10).json()["jobs"] == []

    wrong = sshd.wrong_code()
    refusal = login(server, "", "--code", wrong)
    assert refusal.returncode == 1 and "refused the code" in refusal.stderr, refusal.stderr
    assert state_of(server) == "login_needed"

    codes = [sshd.fresh_code()]
    logged_in = login(server, codes[0])
    assert logged_in.returncode == 0, logged_in.stderr
    assert "logged in to mfa" in logged_in.stdout
    assert state_of(server) == "ok"  # at once, not at the next poll
    assert metric(server, "ok").endswith(" 1.0")

    job = submit(server, "waiter")
    wait_for(lambda: get_job(server, job["id"])["state"] == "running", 30, "the job to run")
    from playwright.sync_api import expect  # the browser fixture found it

    job_dir = f"{home_of(cluster)}/{env.base}/jobs/{job['id']}"
    watcher = _Watcher(server, job["id"])
    try:
        with viewer_on(browser, server) as view:
            view.open(f"#key={API_KEY}")
            view.open(f"#/jobs/{job['id']}")
            view.expect_state("running")
            banner = view.page.locator("#cluster-stale")
            sshd.drop_connections()
            down = wait_for(lambda: (h := cluster_health(server, CLUSTER))["state"] != "ok" and h,
                            15, "the lost login to be seen")
            assert down["state"] == "login_needed", down
            expect(banner).to_contain_text("mfa has waited for an operator to log in since")
            expect(banner).to_contain_text("The job runs on")
            # Polls go on failing, and judge no job.
            polls_after(server, CLUSTER, time.time(), 3, 30)
            assert get_job(server, job["id"])["state"] == "running"
            again = httpx.post(f"{server.url}/api/jobs", headers=HEADERS, timeout=10,
                               json={"template": "waiter"})
            assert again.status_code == 503 and "metis-stream login" in again.json()["error"]

            codes.append(sshd.fresh_code())
            assert login(server, codes[1]).returncode == 0
            assert state_of(server) == "ok"
            expect(banner).to_be_hidden()
            view.expect_state("running")
    finally:
        # The job ends now, whatever happened above, and its watcher with it.
        cluster.run_as_user(["touch", f"{job_dir}/go"])
    events = watcher.events()
    kinds = [e["type"] for e in events]
    assert kinds.count("stale") == 1 and kinds.count("recovered") == 1, kinds
    stale = events[kinds.index("stale")]
    assert stale["data"] == {"cluster": CLUSTER, "state": "login_needed",
                             "cause": CAUSES["login_needed"]}
    assert events[-1]["type"] == "completed", events[-1]
    assert log_lines(events) == ["after the login"]
    # The codes went to the cluster, and nowhere else.
    log = server.log()
    assert not [code for code in [*codes, wrong] if re.search(rf"(?<!\d){code}(?!\d)", log)]
    assert "logged in by an operator" in log


class _Watcher:
    """A websocket watcher of one job in a thread of its own, from now to its end."""

    def __init__(self, server: ServerProcess, job_id: str) -> None:
        self._pool = ThreadPoolExecutor(1)
        self._future = self._pool.submit(watch, server, job_id, 120)

    def events(self) -> list[dict[str, object]]:
        try:
            return self._future.result().events
        finally:
            self._pool.shutdown()

