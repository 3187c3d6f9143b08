"""RemoteEngine: AsyncEngine's interface (start/shutdown, generate, abort, stats, tokenizer) over
the node server's mutual-TLS API, so a gateway can route a request to another node unchanged.

The client presents its certificate and verifies the server's against the given CA; there is no
option to skip either check. The tokenizer is fetched from the node at start(), so prompts are
tokenized (and chat templates rendered) exactly as the node would.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from engine.errors import EngineDeadError, EngineError, RequestError
from engine.node_http import NodeConnectionError, NodeHTTP, NodeHTTPStatus
from engine.outputs import StreamDelta
from engine.sampling_params import SamplingParams
from engine.server.wire import delta_from_obj, error_from_body, params_to_wire
from engine.tokenizer.tokenizer import Tokenizer


def client_ssl_context(ca_cert: Path, client_cert: Path, client_key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    ctx.load_cert_chain(str(client_cert), str(client_key))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _rejection(status: int, raw: bytes) -> EngineError:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {}
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return error_from_body(payload["error"])
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return RequestError(f"node rejected the request (HTTP {status}): {detail or raw[:200]!r}")


class RemoteEngine:
    def __init__(
        self, base_url: str, *, ca_cert: str | Path, client_cert: str | Path, client_key: str | Path,
        timeout_s: float = 30.0, read_timeout_s: float | None = None, max_connections: int = 1024,
    ) -> None:
        if not base_url.startswith("https://"):
            raise ValueError(f"base_url: expected an https:// URL; got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._ssl = client_ssl_context(Path(ca_cert), Path(client_cert), Path(client_key))
        # read_timeout_s bounds the wait for the first token (the node answers when it has one) and
        # between two tokens; None: no limit (a long generation may pause under load)
        self._timeout = httpx.Timeout(timeout_s, read=read_timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client: httpx.AsyncClient | None = None
        # generate and abort, the per-request path, go through the lean client (engine/node_http.py)
        self._http = NodeHTTP(self.base_url, self._ssl, connect_timeout_s=timeout_s, read_timeout_s=read_timeout_s,
                              max_idle=max_connections)
        self._tokenizer: Tokenizer | None = None
        self._stats: dict[str, Any] = {}

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(base_url=self.base_url, verify=self._ssl, timeout=self._timeout,
                                         limits=self._limits)
        try:
            resp = await self._client.get("/v1/tokenizer")
            resp.raise_for_status()
            payload = resp.json()
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in payload["files"].items():
                    if "/" in name or name.startswith("."):
                        raise EngineDeadError(f"node sent an unexpected tokenizer file name {name!r}")
                    (Path(tmp) / name).write_text(text)
                self._tokenizer = Tokenizer(tmp, tuple(payload.get("eos_token_ids", ())))
            await self.refresh_stats()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            await self.shutdown()
            raise EngineDeadError(f"node {self.base_url} unreachable or refused: {exc!r}") from exc
        except BaseException:  # cancelled (a timeout): no half-started client, so start() can run again
            await asyncio.shield(self.shutdown())
            raise

    async def shutdown(self) -> None:
        await self._http.close()
        self._http = NodeHTTP(self.base_url, self._ssl, connect_timeout_s=self._timeout.connect or 30.0,
                              read_timeout_s=self._timeout.read, max_idle=self._limits.max_connections or 1024)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineDeadError("RemoteEngine is not started: await engine.start() first")
        return self._client

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineDeadError("RemoteEngine is not started: await engine.start() first")
        return self._tokenizer

    @property
    def is_running(self) -> bool:
        return self._client is not None

    def stats(self) -> dict[str, Any]:
        """The node's stats as of the last refresh_stats() (start() fetches them once)."""
        return dict(self._stats)

    async def refresh_stats(self) -> dict[str, Any]:
        resp = await self.client.get("/v1/stats")
        resp.raise_for_status()
        self._stats = resp.json()
        return dict(self._stats)

    async def health(self) -> bool:
        try:
            return (await self.client.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    # ---- requests -----------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
        deadline: float | None = None,
        tenant: str | None = None,
        tpot_target_s: float | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Stream deltas; raises the node's RequestError subclass for a bad request."""
        body: dict[str, Any] = {"request_id": request_id, "params": params_to_wire(params),
                                "cache_salt": cache_salt, "priority": priority, "deadline": deadline,
                                "tenant": tenant, "tpot_target_s": tpot_target_s}
        body["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
        if self._client is None:
            raise EngineDeadError("RemoteEngine is not started: await engine.start() first")
        lines = self._http.post_lines("/v1/generate", json.dumps(body).encode())
        unfinished = set(range(params.n))
        try:
            async for line in lines:
                obj = json.loads(line)
                if "error" in obj:
                    raise error_from_body(obj["error"])
                delta = delta_from_obj(obj)
                if delta.finished:
                    unfinished.discard(delta.index)
                if not unfinished:
                    # The node ends the body right after its final line: reading it to the end
                    # returns the connection to the pool (no new TLS handshake for the next request).
                    async for _ in lines:
                        pass
                    yield delta
                    return
                yield delta
        except NodeHTTPStatus as exc:
            raise _rejection(exc.status, exc.body) from None
        except NodeConnectionError as exc:
            raise EngineDeadError(f"node {self.base_url}: {exc}") from exc
        finally:
            await lines.aclose()

    async def abort(self, request_id: str) -> None:
        try:
            await self.client.post("/v1/abort", json={"request_id": request_id})
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"node {self.base_url}: {exc!r}") from exc
