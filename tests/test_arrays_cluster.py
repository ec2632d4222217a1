"""Job arrays on the real test cluster (Slurm 22.05 and its PBS wrappers, behind sshd),
for both dialects: an array of 5 whose element 3 exits 1 fails, with the tally and
every element's events, each tagged with its index; one whose elements all succeed
completes. A real server process; elements call back with curl."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.server import ServerProcess, script_templates
from tests.test_cluster_e2e import cluster_block, follow, get_job, make_server, submit

pytestmark = pytest.mark.cluster

SCHEDULERS = ("pbs", "slurm")
SCRIPTS = {
    "array": ('"$METIS_EMIT" step "element $METIS_ARRAY_INDEX"\n'
              'echo "out of $METIS_ARRAY_INDEX"\n'
              '[ "$METIS_ARRAY_INDEX" = "$FAIL_AT" ] && { echo "element failed" >&2; exit 1; }\n'
              'exit 0\n'),
}
TEMPLATE = 'array = "1-5"\nparams.fail_at = { type = "int", default = 0 }\n'


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("arrays")
    base = f"arrays-{folder.name}"
    config = ""
    for name in SCHEDULERS:
        config += cluster_block(test_cluster, name, name, known_hosts=test_cluster.known_hosts,
                                workdir=f"{base}/{name}")
        config += script_templates(folder / "scripts" / name, SCRIPTS, {"array": TEMPLATE},
                                   cluster=name, suffix=f"_{name}")
    server = make_server(test_cluster, folder / "server", config)
    try:
        yield Env(test_cluster, server)
    finally:
        server.stop()
        test_cluster.run_as_user(["scancel", "--user", test_cluster.user])
        test_cluster.run_as_user(["rm", "-rf", base])


def by_element(events: list[dict[str, Any]]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for event in events:
        if "element" in event:
            found.setdefault(event["element"], []).append(event["type"])
    return found


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_an_array_with_a_failing_element_fails(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"array_{scheduler}", {"fail_at": 3})
    assert job["array"] == "1-5"
    events = follow(env.server, job["id"], timeout=120)
    final = events[-1]
    assert final["type"] == "fatal", final
    assert "element" not in final
    assert final["data"]["error"].startswith("1 of 5 elements failed: 3 (exit 1)"), final
    assert final["data"]["elements"] == {"queued": 0, "running": 0, "done": 4, "failed": 1}
    assert [f["element"] for f in final["data"]["failed"]] == [3]
    elements = by_element(events)
    assert sorted(elements) == [1, 2, 3, 4, 5]
    for index, types in elements.items():
        assert "step" in types and "log" in types, (index, types)
        assert types[-1] == ("element.fatal" if index == 3 else "element.completed"), types
    failing = next(e for e in events if e.get("element") == 3 and e["type"] == "element.fatal")
    assert failing["data"]["exit_status"] == 1
    assert failing["data"]["stderr_tail"] == ["element failed"]
    steps = {e["element"]: e["data"] for e in events if e["type"] == "step"}
    assert steps == {i: f"element {i}" for i in range(1, 6)}
    assert any(e["type"] == "elements" for e in events)
    record = get_job(env.server, job["id"])
    assert record["state"] == "failed"
    assert record["elements"] == final["data"]["elements"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_an_array_whose_elements_all_succeed_completes(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"array_{scheduler}")
    events = follow(env.server, job["id"], timeout=120)
    assert events[-1]["type"] == "completed", events[-1]
    assert events[-1]["data"]["elements"] == {"queued": 0, "running": 0, "done": 5,
                                              "failed": 0}
    assert sorted(by_element(events)) == [1, 2, 3, 4, 5]
    assert get_job(env.server, job["id"])["state"] == "completed"
