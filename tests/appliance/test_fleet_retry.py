"""A node that dies between health probes: the request routed to it is retried once, before its
first token, on another compliant node -- the client gets a normal answer, the tenant's stream
records ``retried`` naming the dead node and ``completed`` naming the one that served, and the
dead node is reported down at once (no wait for the next probe)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.fleet_lab import MODEL, FleetLab

SITE_A = {"region": "eu", "site": "a", "classification": "internal"}
POLICY = {
    "residency": {"site-a": {"regions": ["*"], "sites": ["a"], "classifications": ["*"]}},
    "tenants": {"pinned": {"allowed_models": ["*"], "residency": "site-a", "rate_limit_rpm": 1000,
                           "max_tokens_per_minute": 1000000}},
}
# longer than the router's affinity prefix (64 tokens), so a repeat goes back to the same node
QUESTION = [{"role": "system", "content": "You are a careful assistant for an air-gapped appliance. " * 6},
            {"role": "user", "content": "Name three colours of the rainbow."}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("retry"), model_dir)
    # probes far apart: the gateway can only learn of the death from the request itself
    lab.build({"a1": SITE_A, "a2": SITE_A}, POLICY,
              {"health_interval_s": 600.0, "health_backoff_max_s": 600.0, "connect_timeout_s": 3.0,
               "read_timeout_s": 30.0})
    try:
        lab.start_all()
        yield lab
    finally:
        lab.close()


def test_a_request_to_a_node_that_died_is_retried_on_another(lab: FleetLab) -> None:
    client = lab.client(lab.tenant_key("pinned"))
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    served = [d for kind, rid, d in lab.records("pinned") if rid == first.id and kind == "completed"]
    victim = str(served[0]["node"])
    other = ({"a1", "a2"} - {victim}).pop()
    lab.stop_node(victim, signal.SIGKILL)
    # the same prompt again: prefix affinity sends it to the node that holds its prefix -- the dead one
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: same answer
    records = [(kind, d) for kind, rid, d in lab.records("pinned") if rid == again.id]
    kinds = [kind for kind, _ in records]
    assert kinds == ["accepted", "retried", "completed"], kinds
    retried = records[1][1]
    assert retried["node"] == victim or victim in json.dumps(retried)
    assert records[2][1]["node"] == other and records[2][1]["retried_from"] == [victim]
    states = {n["name"]: n["health"] for n in json.loads(lab.appliance("nodes", "list", "--json").stdout)}
    assert states[victim] == "down" and states[other] == "up"
