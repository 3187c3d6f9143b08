"""The node server over real mutual TLS: refused without a trusted client certificate; with one,
RemoteEngine streams exactly what LLM.generate returns; abort, bad requests and metrics."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import LLM, PromptTooLongError, SamplingParams, StreamDelta
from engine.remote import RemoteEngine
from tests.engine.node_server import node_server
from tests.engine.tls_certs import TlsSet, make_tls_set

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsSet:
    return make_tls_set(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def node(engine_model_dir: Path, tls: TlsSet) -> Iterator[str]:
    with node_server(engine_model_dir, tls, {"check_integrity": True}) as url:
        yield url


def _remote(url: str, tls: TlsSet) -> RemoteEngine:
    return RemoteEngine(url, ca_cert=tls.ca, client_cert=tls.client.cert, client_key=tls.client.key)


def test_client_without_trusted_certificate_is_refused(node: str, tls: TlsSet) -> None:
    with pytest.raises(httpx.TransportError):
        with httpx.Client(verify=ssl.create_default_context(cafile=str(tls.ca))) as client:
            client.get(f"{node}/health")
    rogue = ssl.create_default_context(cafile=str(tls.ca))
    rogue.load_cert_chain(str(tls.rogue_client.cert), str(tls.rogue_client.key))
    with pytest.raises(httpx.TransportError):
        with httpx.Client(verify=rogue) as client:
            client.get(f"{node}/health")
    good = ssl.create_default_context(cafile=str(tls.ca))
    good.load_cert_chain(str(tls.client.cert), str(tls.client.key))
    with httpx.Client(verify=good) as client:
        assert client.get(f"{node}/health").json() == {"status": "ok"}


def test_remote_stream_equals_offline_and_metrics(node: str, tls: TlsSet, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=24)
    prompt = llm.tokenizer.apply_chat_template(QUESTION)  # text with the template's special tokens
    offline = llm.generate([prompt], params)[0]
    assert offline.text == "The capital of France is Paris."

    async def main() -> tuple[list[StreamDelta], list[StreamDelta], str]:
        remote = _remote(node, tls)
        await remote.start()
        try:
            assert remote.tokenizer.apply_chat_template(QUESTION) == prompt
            by_text = [d async for d in remote.generate("t-text", prompt, params, cache_salt="tenant-a")]
            ids = llm.tokenizer.encode(prompt)
            by_ids = [d async for d in remote.generate("t-ids", ids, params, cache_salt="tenant-a", priority=1,
                                                       deadline=time.time() + 60)]
            metrics = (await remote.client.get("/metrics")).text
            return by_text, by_ids, metrics
        finally:
            await remote.shutdown()

    by_text, by_ids, metrics = asyncio.run(main())
    for deltas in (by_text, by_ids):
        assert "".join(d.text for d in deltas) == offline.text
        assert [t for d in deltas for t in d.token_ids] == offline.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == offline.finish_reason
    assert by_ids[-1].num_cached_tokens > 0  # same salt, same prompt: the prefix cache served it
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:generation_tokens_total",
                 "vllm:prompt_tokens_total"):
        assert name in metrics, name
    ttft_count = next(ln for ln in metrics.splitlines() if ln.startswith("vllm:time_to_first_token_seconds_count"))
    assert float(ttft_count.split()[-1]) >= 2


def test_remote_bad_request_and_abort(node: str, tls: TlsSet) -> None:
    async def main() -> list[StreamDelta]:
        remote = _remote(node, tls)
        await remote.start()
        try:
            resp = await remote.client.post("/v1/generate", json={
                "request_id": "bad", "prompt": "hi", "params": {"temperature": -1.0}})
            assert resp.status_code == 400 and "temperature" in resp.json()["error"]["message"]
            with pytest.raises(PromptTooLongError, match="max_model_len"):
                async for _ in remote.generate("too-long", [5] * 9000, SamplingParams(max_tokens=2)):
                    pass
            deltas = []
            async for d in remote.generate("long", "Tell me a long story", SamplingParams(max_tokens=200)):
                deltas.append(d)
                if len(deltas) == 2:
                    await remote.abort("long")
            for _ in range(50):
                stats = await remote.refresh_stats()
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert stats["running"] == 0 and stats["kv_cache_usage"] == 0.0
            return deltas
        finally:
            await remote.shutdown()

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort" and deltas[-1].num_output_tokens < 200


def test_remote_n_choices_stream_to_their_ends_and_abort_ends_them_all(node: str, tls: TlsSet) -> None:
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=12, n=3)

    async def main() -> tuple[dict[int, list[StreamDelta]], dict[str, object]]:
        remote = _remote(node, tls)
        await remote.start()
        try:
            resp = await remote.client.post("/v1/generate", json={
                "request_id": "n17", "prompt": "hi", "params": {"n": 17}})
            assert resp.status_code == 400 and "n must be an integer in [1, 16]" in resp.json()["error"]["message"]
            by_index: dict[int, list[StreamDelta]] = {}
            async for d in remote.generate("t-n3", "Tell me about cats.", params):
                assert d.request_id == "t-n3"
                by_index.setdefault(d.index, []).append(d)
            seen = 0
            async for _ in remote.generate("t-n4-abort", "Tell me a long story", SamplingParams(max_tokens=200, n=4)):
                seen += 1
                if seen == 3:
                    await remote.abort("t-n4-abort")
            for _ in range(50):
                stats = await remote.refresh_stats()
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.1)
            return by_index, stats
        finally:
            await remote.shutdown()

    by_index, stats = asyncio.run(main())
    assert sorted(by_index) == [0, 1, 2]
    texts = ["".join(d.text for d in deltas) for deltas in by_index.values()]
    assert all(deltas[-1].finished for deltas in by_index.values()) and len(set(texts)) == 3
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_usage"] == 0.0
