"""Per-tenant limits through the real HTTPS API (one gateway process with its in-process engine):
a flooding tenant is held to its own concurrency and never gets another tenant refused; token
budgets per day are enforced and reported; refused requests spend no budget; a non-streaming
request whose client leaves is aborted; /v1/completions works streaming and not."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.appliance.fleet_lab import MODEL, FleetLab
from tests.appliance.support import tls_ctx

POLICY = {
    "tenants": {
        "flooder": {"allowed_models": ["*"], "sla_class": "batch", "max_concurrent_requests": 4,
                    "rate_limit_rpm": 1000, "max_tokens_per_minute": 1000000},
        "victim": {"allowed_models": ["*"], "sla_class": "interactive", "rate_limit_rpm": 1000,
                   "max_tokens_per_minute": 1000000},
        "metered": {"allowed_models": ["*"], "max_tokens_per_day": 400, "rate_limit_rpm": 1000,
                    "max_tokens_per_minute": 1000000},
        "twice": {"allowed_models": ["*"], "rate_limit_rpm": 2},
        "leaver": {"allowed_models": ["*"]},
        "legacy": {"allowed_models": ["*"]},
        "sloppy": {"allowed_models": ["*"]},
        "bulky": {"allowed_models": ["*"], "rate_limit_rpm": 1000, "max_tokens_per_minute": 100000000},
    },
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook, in ten chapters."}]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("single"), model_dir)
    lab.build_single(POLICY)
    try:
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


def test_flooding_tenant_is_held_to_its_own_concurrency_and_never_refuses_another(lab: FleetLab) -> None:
    flood = lab.client(lab.tenant_key("flooder"), timeout=300)
    codes: list[str] = []
    lock = threading.Lock()

    def hold_a_stream() -> None:
        try:
            for _ in flood.chat.completions.create(model=MODEL, messages=STORY, max_tokens=48, temperature=0,
                                                   stream=True):
                pass
            outcome = "served"
        except openai.APIStatusError as exc:
            outcome = str(exc.code)
        with lock:
            codes.append(outcome)

    threads = [threading.Thread(target=hold_a_stream) for _ in range(24)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the flood holds its streams now
    victim = lab.client(lab.tenant_key("victim"), timeout=300)
    for _ in range(3):  # never refused because of another tenant's load
        reply = victim.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
    for t in threads:
        t.join(300)
    assert len(codes) == 24
    assert codes.count("served") >= 4
    assert set(codes) <= {"served", "concurrency_limit_exceeded"}, codes
    assert "concurrency_limit_exceeded" in codes
    rejected = [d for kind, _, d in lab.records("flooder") if kind == "rejected"]
    assert rejected and all(d["code"] == "concurrency_limit_exceeded" for d in rejected)
    assert not [d for kind, _, d in lab.records("victim") if kind == "rejected"]


def test_day_budget_is_enforced_and_reported(lab: FleetLab) -> None:
    key = lab.tenant_key("metered")
    client = lab.client(key)
    refused = None
    for _ in range(20):
        try:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None and refused.code == "token_budget_exceeded"
    assert "per UTC day" in refused.message and refused.response.headers.get("retry-after")
    usage = httpx.get(f"{lab.url}/v1/usage", verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"),
                      headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["day"]["limit"] == 400 and usage["day"]["remaining"] == 400 - usage["day"]["tokens"]
    served = [d for kind, _, d in lab.records("metered") if kind == "completed"]
    used = sum(int(d["prompt_tokens"]) + int(d["completion_tokens"]) for d in served)  # type: ignore[call-overload]
    assert 0 < used <= 400


def test_refused_requests_spend_no_request_budget(lab: FleetLab) -> None:
    client = lab.client(lab.tenant_key("twice"))
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100000)
    for _ in range(2):  # the two requests of the minute are still there
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    with pytest.raises(openai.RateLimitError, match="2 requests per minute"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)


def test_non_streaming_request_whose_client_leaves_is_aborted(lab: FleetLab) -> None:
    key = lab.tenant_key("leaver")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{lab.url}/v1/chat/completions", verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"),
                   headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30, read=3),
                   json={"model": MODEL, "messages": STORY, "max_tokens": 500, "temperature": 0})
    deadline = time.monotonic() + 30
    kinds: list[str] = []
    while time.monotonic() < deadline and len(kinds) < 2:
        kinds = [k for k, _, _ in lab.records("leaver")]
        time.sleep(0.2)
    assert kinds == ["accepted", "aborted"]
    aborted = lab.records("leaver")[-1][2]
    assert int(aborted["completion_tokens"]) < 500  # type: ignore[call-overload]


def test_legacy_completions_streaming_and_not(lab: FleetLab) -> None:
    client = lab.client(lab.tenant_key("legacy"))
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert reply.id.startswith("cmpl-") and reply.usage and reply.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    # a stream read to its end is recorded completed (not aborted when the server closes it)
    kinds = [k for k, rid, _ in lab.records("legacy") if rid == chunks[0].id]
    assert kinds == ["accepted", "completed"]
    # a tenant without budgets is still counted, once per request, for /v1/usage
    usage = httpx.get(f"{lab.url}/v1/usage", verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"),
                      headers={"Authorization": f"Bearer {client.api_key}"}).json()
    served = [d for kind, _, d in lab.records("legacy") if kind == "completed"]
    tokens = sum(int(d["prompt_tokens"]) + int(d["completion_tokens"]) for d in served)  # type: ignore[call-overload]
    assert usage["day"]["requests"] == len(served) == 2 and usage["day"]["tokens"] == tokens
    assert usage["day"]["limit"] is None and usage["month"]["tokens"] == tokens
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                       temperature=0, echo=True)
    prompt, text = "The capital of France is", echoed.choices[0].text
    assert text.startswith(prompt) and text[len(prompt):] and reply.choices[0].text.startswith(text[len(prompt):])
    with pytest.raises(openai.BadRequestError, match="echo"):  # it would need the prompt's logprobs
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4)


def test_malformed_requests_and_refusals_are_recorded_with_the_http_request_id(lab: FleetLab) -> None:
    key = lab.tenant_key("sloppy")
    ctx = tls_ctx(lab.gateway_root / "tls" / "ca.pem")
    bad = httpx.post(f"{lab.url}/v1/chat/completions", verify=ctx, headers={"Authorization": f"Bearer {key}"},
                     json={"model": MODEL, "messages": [], "max_tokens": "10"})
    assert bad.status_code == 400
    unknown = httpx.post(f"{lab.url}/v1/chat/completions", verify=ctx, headers={"Authorization": f"Bearer {key}"},
                         json={"model": "x" * 5000, "messages": QUESTION})
    assert unknown.status_code in (400, 404)
    served = httpx.post(f"{lab.url}/v1/chat/completions", verify=ctx, headers={"Authorization": f"Bearer {key}"},
                        json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0})
    assert served.status_code == 200
    records = lab.records("sloppy")
    rejected = [d for kind, _, d in records if kind == "rejected"]
    assert rejected[0]["code"] == "invalid_request" and rejected[0]["x_request_id"] == bad.headers["x-request-id"]
    assert rejected[1]["x_request_id"] == unknown.headers["x-request-id"]
    assert all(len(str(d.get("model", ""))) <= 65 and len(str(d["reason"])) <= 501 for d in rejected)
    accepted = [d for kind, rid, d in records if kind == "accepted" and rid == served.json()["id"]]
    assert accepted[0]["x_request_id"] == served.headers["x-request-id"]


def _health_p99_ms(url: str, ctx: object, n: int) -> float:
    times = []
    with httpx.Client(verify=ctx, timeout=30) as http:  # type: ignore[arg-type]
        for _ in range(n):
            start = time.perf_counter()
            assert http.get(f"{url}/health").status_code == 200
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    return sorted(times)[int(0.99 * (len(times) - 1))]


def test_huge_prompts_are_tokenized_off_the_event_loop(lab: FleetLab) -> None:
    """The review's attack: four near-limit prompts at once (about 3.6 MB of text each, under the body
    and character caps) used to freeze /health for seconds while they were tokenized on the event
    loop. Now /health stays within a few times its idle latency, and each gets a clear 400."""
    ctx = tls_ctx(lab.gateway_root / "tls" / "ca.pem")
    idle = _health_p99_ms(lab.url, ctx, 50)
    key = lab.tenant_key("bulky")
    text = "lorem ipsum dolor sit amet, " * 35_000  # 980,000 characters: ~200k tokens, far past the context
    answers: list[httpx.Response] = []

    def attack() -> None:
        answers.append(httpx.post(f"{lab.url}/v1/chat/completions", verify=ctx, timeout=300,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": MODEL, "max_tokens": 4,
                                        "messages": [{"role": "user", "content": text}]}))

    threads = [threading.Thread(target=attack) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the bodies are in; tokenizing has begun
    busy = _health_p99_ms(lab.url, ctx, 50)
    for t in threads:
        t.join(300)
    assert len(answers) == 4
    for resp in answers:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "prompt_too_long", resp.text
    assert busy < max(10 * idle, 250), (idle, busy)

