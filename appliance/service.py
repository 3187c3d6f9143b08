"""One tenant request, end to end: limits, policy, routing, admission, audit, engine node, audit.

The order is fixed and cheap checks come first, so a refused request costs little:

1. ``enter``: a request left in this minute, and one of the tenant's concurrent slots;
2. policy: the model is allowed (policy or the tenant's grants), ``max_tokens`` within bounds, and
   some node serving the model satisfies the tenant's residency (403 / 404 otherwise);
3. the prompt is rendered and tokenized in a worker thread, one job per tenant at a time, never on
   the event loop;
4. the router picks a compliant, healthy node (503 when none is up); admission control checks the
   class's TTFT target on that node counting others' queues only up to a fair share; the tenant's
   token rate is reserved;
5. an ``accepted`` record (node, labels, routing decision, this run's id) is durable before
   generation starts.

``run`` then streams from the node. A node that cannot be reached before the first token is
reported down and the request is routed once more, to another compliant node (audited as
``retried``); a node that fails mid-stream ends the request ``failed``, naming it. Every admitted
request ends with a ``completed``, ``failed`` or ``aborted`` record carrying token counts,
latency, the node and its labels, and keyed hashes of prompt and output (never their text).
Every record of a request, refusals included, carries the client's address and user agent
(``client_info``); a refusal raised here has been recorded (``RequestRejected.recorded``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from appliance.admission import AdmissionController
from appliance.audit import AuditError, AuditLog
from appliance.audit.content import ContentError, ContentSealer
from appliance.diskguard import DiskGuard
from appliance.errors import ApplianceError
from appliance.fleet import Fleet
from appliance.fleet_admission import AdmissionRefused, admit_across
from appliance.limit_leases import LimitsUnavailable, SharedRateLimiter
from appliance.metrics import GatewayMetrics
from appliance.principal import Principal
from appliance.router import Route, Router, RouteRefused
from appliance.usage import Reservation, UsageStore
from engine import SamplingParams
from engine.errors import EngineDeadError, EngineError, RequestError
from engine.outputs import StreamDelta
from engine.tokenizer.tokenizer import Tokenizer
from policies import PolicySet

AFFINITY_TOKENS = 64  # prompts sharing their first 64 tokens go to the same node while its load allows
# prompts up to this many characters are templated and tokenized on the event loop (<1 ms here);
# longer ones in the tokenizer threads, one job per tenant at a time
INLINE_TOKENIZE_CHARS = 2048
ECHO_LIMIT = 64  # characters of a client string echoed in an error or an audit record


# the HTTP request's x-request-id and client while it is being admitted (for the records of its refusals)
_HTTP_ID: contextvars.ContextVar[str] = contextvars.ContextVar("http_request_id", default="")
_CLIENT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("http_client", default=None)


def _prompt_chars(spec: InferenceSpec) -> int:
    if spec.messages is None:
        return len(spec.prompt or "")
    total = 0
    for message in spec.messages:
        for value in message.values():
            total += len(value) if isinstance(value, str) else INLINE_TOKENIZE_CHARS + 1  # parts, tools: thread
    return total


class RequestRejected(ApplianceError):
    """A request refused before generation; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, type_: str, code: str, retry_after_s: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.retry_after_s = retry_after_s
        self.param = param
        self.recorded = False  # True once a ``rejected`` record says why (set by ChatService)


def short(text: str, limit: int = ECHO_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class InferenceSpec:
    """What the tenant asked for, from /v1/chat/completions (``messages``) or /v1/completions
    (``prompt``), already validated by the request schema."""

    model: str
    max_tokens: int | None
    sampling: dict[str, Any]  # SamplingParams fields other than max_tokens
    stream: bool
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prefix: str = "chatcmpl"
    http_request_id: str = ""  # the gateway's x-request-id of the HTTP request, kept in its records
    client: dict[str, str] = field(default_factory=dict)  # client_ip and user_agent (client_info.client_fields)


@dataclass
class Prepared:
    request_id: str
    principal: Principal
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    sla_class: str
    priority: int
    deadline: float
    route: Route
    ticket: int
    budget: Reservation | None
    ahead_tokens: int
    prompt_hash: str
    stream: bool
    client: dict[str, str] = field(default_factory=dict)
    tpot_target_s: float | None = None  # the class's time-per-output-token target, for the engine's scheduler
    created: int = field(default_factory=lambda: int(time.time()))
    retried_from: list[str] = field(default_factory=list)
    content_prompt: Any = None  # the messages or prompt, sealed into the record when the policy stores content
    _released: bool = False


@dataclass
class ChoiceOutcome:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Outcome:
    """What a request produced: its ``n`` choices (one unless it asked for more)."""

    choices: list[ChoiceOutcome] = field(default_factory=lambda: [ChoiceOutcome()])
    prompt_tokens: int = 0
    node: str = ""

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        """All choices together: what usage reports and the limits charge."""
        return sum(c.completion_tokens for c in self.choices)

    def choice(self, index: int) -> ChoiceOutcome:
        while len(self.choices) <= index:
            self.choices.append(ChoiceOutcome())
        return self.choices[index]


class ChatService:
    def __init__(
        self, *, fleet: Fleet, router: Router, policies: PolicySet, audit: AuditLog, salt_key: bytes,
        metrics: GatewayMetrics, limiter: SharedRateLimiter, usage: UsageStore | None = None,
        disk: DiskGuard | None = None,
        default_max_tokens: int = 512, tokenizer_threads: int = 4, run_id: str | None = None,
        sealer: ContentSealer | None = None,
    ) -> None:
        self.sealer = sealer  # stores prompt and output, sealed, for tenants whose policy says store_content
        self.run_id = run_id or uuid.uuid4().hex  # carried by every ``accepted`` record
        self.usage = usage
        self.disk = disk
        self.fleet = fleet
        self.router = router
        self.policies = policies
        self.audit = audit
        self._salt_key = salt_key
        self.metrics = metrics
        self.limiter = limiter  # tenant limits shared by every gateway on the database (appliance/limit_leases.py)
        self.admission = AdmissionController()
        self.default_max_tokens = default_max_tokens
        self._pool = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenize")
        # one tokenization job per tenant at a time: a tenant's huge prompts queue behind each
        # other, never in front of another tenant's
        self._tokenize_turn: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.limiter.close()  # gives every lease and concurrency slot back to the other gateways

    def cache_salt(self, tenant: str) -> str:
        """Derived on the server from the tenant: clients can never choose or learn it."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()

    def keyed_hash(self, tenant: str, data: bytes) -> str:
        """HMAC of content under a per-tenant key: equal contents are linkable inside a tenant's
        records, and a guessed prompt cannot be confirmed without the appliance's key."""
        return "hmac-sha256:" + hmac.new(self.cache_salt(tenant).encode(), data, hashlib.sha256).hexdigest()

    async def _audit(self, event_type: str, principal: Principal, request_id: str, data: dict[str, Any],
                     client: dict[str, str] | None = None) -> None:
        who = (_CLIENT.get() or {}) if client is None else client
        await self.audit.append_async(
            event_type, stream=principal.tenant, actor=f"key:{principal.key_id}",
            tenant=principal.tenant, request_id=request_id, data={**data, **who},
        )

    async def _reject(self, principal: Principal, request_id: str, exc: RequestRejected, model: str,
                      extra: dict[str, Any] | None = None) -> None:
        self.metrics.requests.labels(principal.tenant, "rejected").inc()
        self.metrics.sla.rejected(principal.tenant, self.policies.tenant_policy(principal.tenant).sla_class, exc.code)
        try:
            await self._audit("rejected", principal, request_id, {
                "model": short(model), "status": exc.status, "code": exc.code, "reason": short(exc.message, 500),
                "x_request_id": _HTTP_ID.get(), **(extra or {})})
        except AuditError as audit_exc:
            raise RequestRejected(503, "audit log unavailable; request refused", "server_error",
                                  "audit_unavailable") from audit_exc
        exc.recorded = True
        raise exc

    # ---- admission ----------------------------------------------------------------------
    async def prepare(self, principal: Principal, spec: InferenceSpec) -> Prepared:
        request_id = f"{spec.prefix}-{uuid.uuid4().hex}"
        _HTTP_ID.set(spec.http_request_id)
        _CLIENT.set(dict(spec.client))
        tenant = principal.tenant
        policy = self.policies.tenant_policy(tenant)
        low = self.disk.problem() if self.disk is not None else None
        if low is not None:  # not recorded per request: that is what there is no room for
            self.metrics.requests.labels(tenant, "rejected").inc()
            raise RequestRejected(503, low, "server_error", "audit_storage_low", retry_after_s=60)
        try:
            entered = await self.limiter.enter(tenant, policy.rate_limit_rpm, policy.max_concurrent_requests)
        except LimitsUnavailable as exc:
            await self._reject(principal, request_id, RequestRejected(
                503, str(exc), "server_error", "limits_unavailable", retry_after_s=5), spec.model)
            raise AssertionError("unreachable") from None
        if not entered.allowed:
            await self._reject(principal, request_id, RequestRejected(
                429, entered.reason, "rate_limit_exceeded", entered.code, entered.retry_after_s), spec.model)
        try:
            return await self._admit(principal, spec, request_id)
        except BaseException:
            self.limiter.leave(tenant)
            raise

    def model_allowed(self, principal: Principal, model: str) -> bool:
        """The tenant's policy or its grants allow ``model`` (globs, as OpenAI-style model names)."""
        return self.policies.tenant_policy(principal.tenant).allows_model(model) or principal.granted(model)

    async def _admit(self, principal: Principal, spec: InferenceSpec, request_id: str) -> Prepared:
        tenant = principal.tenant
        policy = self.policies.tenant_policy(tenant)
        sla = self.policies.sla_classes[policy.sla_class]
        model = spec.model
        if not self.model_allowed(principal, model):
            await self._reject(principal, request_id, RequestRejected(
                403, f"model {short(model)!r} is not allowed for tenant {tenant!r}", "permission_denied",
                "model_not_allowed", param="model"), model)
        max_tokens = spec.max_tokens or min(self.default_max_tokens, policy.max_tokens_per_request)
        if max_tokens > policy.max_tokens_per_request:
            await self._reject(principal, request_id, RequestRejected(
                400, f"max_tokens: expected at most {policy.max_tokens_per_request} for tenant {tenant!r}, "
                f"found {max_tokens}", "invalid_request_error", "max_tokens_exceeded", param="max_tokens"), model)
        try:
            self.router.compliant(model, policy.residency)
        except RouteRefused as refused:
            await self._refuse_route(principal, request_id, refused, model)
        tokenizer = self.fleet.tokenizer(model)
        if tokenizer is None:
            await self._reject(principal, request_id, RequestRejected(
                503, f"no node serving {short(model)!r} is up yet; retry later", "server_error",
                "no_compliant_node_available", retry_after_s=self.router.retry_after_s), model)
            raise AssertionError("unreachable")  # for type checkers: _reject always raises
        try:
            prompt_ids = await self._tokenize(tenant, tokenizer, spec)
        except RequestRejected as exc:
            await self._reject(principal, request_id, exc, model)
            raise AssertionError("unreachable") from None
        if not prompt_ids:
            await self._reject(principal, request_id, RequestRejected(
                400, "the prompt is empty: expected at least one token", "invalid_request_error", "empty_prompt",
                param="messages" if spec.messages is not None else "prompt"), model)
        affinity = None
        if len(prompt_ids) > AFFINITY_TOKENS:
            head = b"".join(i.to_bytes(4, "little") for i in prompt_ids[:AFFINITY_TOKENS])
            affinity = self.keyed_hash(tenant, head)
        try:
            admitted = await admit_across(self.router, self.admission, model=model, residency=policy.residency,
                                          affinity=affinity, tenant=tenant, prompt_tokens=len(prompt_ids), sla=sla,
                                          max_queued_tokens=policy.max_queued_tokens)
        except RouteRefused as refused:
            await self._refuse_route(principal, request_id, refused, model)
            raise AssertionError("unreachable") from None
        except AdmissionRefused as refused:
            await self._reject(principal, request_id, RequestRejected(
                refused.status, refused.message, "overloaded" if refused.status == 429 else "server_error",
                refused.code, refused.retry_after_s), model, {"node": refused.node, "admission": refused.record})
            raise AssertionError("unreachable") from None
        route, admit = admitted.route, admitted.decision
        limit = int(route.handle.stats.get("max_model_len") or 0)
        if limit and len(prompt_ids) >= limit:  # the node would refuse it: say so before anything is queued
            self.admission.release(route.node, tenant, sla.priority, len(prompt_ids))
            await self._reject(principal, request_id, RequestRejected(
                400, f"the prompt is too long: {len(prompt_ids)} tokens; the model {short(model)!r} takes at most "
                f"{limit - 1} prompt tokens", "invalid_request_error", "prompt_too_long",
                param="messages" if spec.messages is not None else "prompt"), model)
        release = (route.node, tenant, sla.priority, len(prompt_ids))
        most = max_tokens * int(spec.sampling.get("n") or 1)  # every choice may run to max_tokens
        release_rate = 0
        budget: Reservation | None = None
        try:
            try:
                rate = await self.limiter.reserve(tenant, policy.max_tokens_per_minute, len(prompt_ids) + most,
                                                  policy.rate_limit_rpm)
            except LimitsUnavailable as exc:
                await self._reject(principal, request_id, RequestRejected(
                    503, str(exc), "server_error", "limits_unavailable", retry_after_s=5), model)
                raise AssertionError("unreachable") from None
            if not rate.allowed:
                await self._reject(principal, request_id, RequestRejected(
                    429, rate.reason, "rate_limit_exceeded", "rate_limit_exceeded", rate.retry_after_s), model)
            release_rate = rate.ticket
            if self.usage is not None and (policy.max_tokens_per_day or policy.max_tokens_per_month):
                # a budget to hold: reserved now; without one, the usage is counted with the record
                decision = await asyncio.to_thread(self.usage.reserve, tenant, len(prompt_ids) + most, policy)
                if not decision.allowed:
                    await self._reject(principal, request_id, RequestRejected(
                        429, decision.reason, "rate_limit_exceeded", decision.code, decision.retry_after_s), model)
                budget = decision.reservation
            try:
                params = SamplingParams(max_tokens=max_tokens, **spec.sampling)
            except ValueError as exc:
                await self._reject(principal, request_id, RequestRejected(
                    400, str(exc), "invalid_request_error", "invalid_parameter"), model)
                raise AssertionError("unreachable") from None
            prep = Prepared(
                request_id=request_id, principal=principal, model=model, prompt_ids=prompt_ids, params=params,
                sla_class=sla.name, priority=sla.priority, deadline=time.time() + sla.deadline_ms / 1000.0,
                tpot_target_s=sla.tpot_ms / 1000.0 if sla.tpot_ms else None,
                route=route, ticket=rate.ticket, budget=budget, ahead_tokens=admit.ahead_tokens,
                stream=spec.stream, client=dict(spec.client),
                content_prompt=spec.messages if spec.messages is not None else spec.prompt,
                prompt_hash=self.keyed_hash(tenant, b"".join(i.to_bytes(4, "little") for i in prompt_ids)),
            )
            await self._audit("accepted", principal, request_id, {
                "model": model, "node": route.node, "node_labels": dict(route.handle.node.labels),
                "region": route.handle.node.labels.get("region", ""), "routing": route.decision(),
                "admission": admitted.record, "sla_class": sla.name, "prompt_tokens": len(prompt_ids),
                "max_tokens": max_tokens, **({"n": params.n} if params.n > 1 else {}),
                **({"guided": next(iter(params.guided))} if params.guided else {}),
                "stream": spec.stream, "prompt_hash": prep.prompt_hash, "x_request_id": spec.http_request_id,
                "run_id": self.run_id,
            }, prep.client)
        except BaseException as exc:
            self.admission.release(*release)
            if release_rate:
                self.limiter.cancel(release_rate)
            if budget is not None and self.usage is not None:
                await asyncio.shield(asyncio.to_thread(self.usage.release, tenant, budget))
            if isinstance(exc, AuditError):
                raise RequestRejected(503, "audit log unavailable; request refused", "server_error",
                                      "audit_unavailable") from exc
            raise
        return prep

    async def _refuse_route(self, principal: Principal, request_id: str, refused: RouteRefused, model: str) -> None:
        type_ = {403: "permission_denied", 404: "invalid_request_error"}.get(refused.status, "server_error")
        await self._reject(principal, request_id, RequestRejected(
            refused.status, refused.message, type_, refused.code, refused.retry_after_s,
            param="model" if refused.status == 404 else None), model, {"routing": refused.decision})

    async def _tokenize(self, tenant: str, tokenizer: Tokenizer, spec: InferenceSpec) -> list[int]:
        def work() -> list[int]:
            if spec.messages is not None:
                return tokenizer.encode_chat(spec.messages, add_generation_prompt=True)
            return tokenizer.encode(spec.prompt or "", add_special_tokens=True)

        try:
            if _prompt_chars(spec) <= INLINE_TOKENIZE_CHARS:
                return work()  # well under a millisecond: a thread hop would cost more than the work
            async with self._tokenize_turn[tenant]:
                return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except EngineError as exc:
            raise RequestRejected(400, f"cannot build the prompt: {short(str(exc), 300)}",
                                  "invalid_request_error", "invalid_prompt") from exc

    # ---- generation ---------------------------------------------------------------------
    async def _open(self, prep: Prepared) -> tuple[Any, StreamDelta]:
        """Start generation on the routed node and wait for its first delta; a node that cannot
        be reached is reported down and the request goes once to another compliant node."""
        tenant = prep.principal.tenant
        while True:
            node = prep.route.node
            self.fleet.acquire(node)
            stream = prep.route.handle.client.generate(
                prep.request_id, prep.prompt_ids, prep.params, cache_salt=self.cache_salt(tenant),
                priority=prep.priority, deadline=prep.deadline, tenant=tenant, tpot_target_s=prep.tpot_target_s)
            try:
                return stream, await anext(stream)
            except RequestError:
                self.fleet.release(node)
                raise
            except (EngineDeadError, httpx.HTTPError, OSError) as exc:
                self.fleet.release(node)
                self.metrics.node_requests.labels(node, "retried" if not prep.retried_from else "failed").inc()
                await self.fleet.report_failure(node, f"{type(exc).__name__}: {short(str(exc), 200)}")
                policy = self.policies.tenant_policy(tenant)
                self.admission.release(node, tenant, prep.priority, len(prep.prompt_ids))
                if prep.retried_from:
                    raise
                prep.retried_from.append(node)
                try:
                    prep.route = self.router.route(prep.model, policy.residency, None, frozenset(prep.retried_from))
                except RouteRefused as refused:
                    raise EngineDeadError(f"node {node} failed and {refused.message}") from exc
                self.admission.try_admit(prep.route.node, tenant, prep.priority, len(prep.prompt_ids), 10**9)
                await self._audit("retried", prep.principal, prep.request_id, {
                    "failed_node": node, "error": f"{type(exc).__name__}"[:100], "node": prep.route.node,
                    "routing": prep.route.decision()}, prep.client)

    async def run(self, prep: Prepared, outcome: Outcome) -> AsyncIterator[StreamDelta]:
        """Yield the node's deltas (each names its choice: ``index``); audits the end however it
        comes. The first delta is only yielded once the node produced its first token, so a caller
        that awaits it before answering can still answer an HTTP error. The request is complete
        when all ``n`` choices finished; its record is durable before that last delta is yielded."""
        start = time.monotonic()
        first_at: float | None = None
        tenant = prep.principal.tenant
        self.metrics.in_flight.inc()
        status = "failed"
        error = ""
        stream: Any = None
        recorded = False
        n = prep.params.n
        outcome.choice(n - 1)
        unfinished = set(range(n))
        try:
            stream, delta = await self._open(prep)
            while True:
                if first_at is None:
                    first_at = time.monotonic()
                    self.admission.first_token(prep.route.node, tenant, prep.priority, len(prep.prompt_ids),
                                               first_at - start, prep.ahead_tokens)
                    self.metrics.ttft.labels(prep.sla_class).observe(first_at - start)
                if delta.index not in unfinished:
                    raise EngineError(f"node {prep.route.node} sent a delta for choice {delta.index}, which is not "
                                      f"an unfinished one of the request's {n}")
                choice = outcome.choices[delta.index]
                choice.text += delta.text
                choice.completion_tokens = delta.num_output_tokens
                outcome.prompt_tokens = delta.num_prompt_tokens
                if delta.finished:
                    choice.finish_reason = delta.finish_reason
                    unfinished.discard(delta.index)
                if not unfinished:
                    # completed, and its record durable, before the last delta is handed over: a
                    # client that has the final chunk has a request on record even if this gateway
                    # dies the next instant; and the consumer may close this generator right after
                    # it, which is not an abort
                    status = "completed"
                    recorded = True
                    await self._finish(prep, outcome, status, error, start, first_at, stream)
                    yield delta
                    break
                yield delta
                delta = await anext(stream)
            status = "completed"
        except StopAsyncIteration:
            error = "node ended the stream without a final token"
        except (asyncio.CancelledError, GeneratorExit):
            if status == "completed":  # closed after the final pair: nothing to abort
                raise
            status = "aborted"
            if stream is not None:
                self._background(self._abort(prep))  # its own task: a repeated cancellation cannot stop it
            raise
        except Exception as exc:  # the node failed this request; audit it, then report it
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if not recorded:
                await self._finish(prep, outcome, status, error, start, first_at, stream)

    async def _abort(self, prep: Prepared) -> None:
        try:
            await prep.route.handle.client.abort(prep.request_id)
        except Exception:  # the node is gone; its requests went with it
            pass

    async def _finish(self, prep: Prepared, outcome: Outcome, status: str, error: str, start: float,
                      first_at: float | None, stream: Any) -> None:
        tenant = prep.principal.tenant
        node = prep.route.node
        outcome.node = node
        if stream is not None:
            self.fleet.release(node)
            self.metrics.node_requests.labels(node, status).inc()
            if hasattr(stream, "aclose"):
                self._background(stream.aclose())
        if first_at is None and stream is not None:
            self.admission.release(node, tenant, prep.priority, len(prep.prompt_ids))
        self.limiter.leave(tenant)
        self.metrics.in_flight.dec()
        elapsed = time.monotonic() - start
        self.metrics.latency.labels(prep.sla_class).observe(elapsed)
        sla = self.policies.sla_classes.get(prep.sla_class)
        if sla is not None:  # a class removed by a policy change meanwhile has no targets to judge by
            ttft_s = None if first_at is None else first_at - start
            longest = max(c.completion_tokens for c in outcome.choices)  # choices decode side by side
            tpot_s = None if ttft_s is None or longest < 2 else (elapsed - ttft_s) / (longest - 1)
            self.metrics.sla.observe(tenant, prep.sla_class, ttft_s, tpot_s, elapsed, status, sla.ttft_ms / 1000.0,
                                     prep.tpot_target_s, percentile=sla.percentile)
        self.metrics.requests.labels(tenant, status).inc()
        self.metrics.prompt_tokens.labels(tenant).inc(outcome.prompt_tokens)
        self.metrics.completion_tokens.labels(tenant).inc(outcome.completion_tokens)
        data: dict[str, Any] = {
            "model": prep.model, "node": node, "node_labels": dict(prep.route.handle.node.labels),
            "region": prep.route.handle.node.labels.get("region", ""),
            "prompt_tokens": outcome.prompt_tokens or len(prep.prompt_ids),
            "completion_tokens": outcome.completion_tokens, "finish_reason": outcome.finish_reason,
            "ttft_ms": None if first_at is None else round((first_at - start) * 1000, 3),
            "latency_ms": round(elapsed * 1000, 3), "output_hash": self.keyed_hash(tenant, outcome.text.encode()),
            **prep.client,
        }
        if len(outcome.choices) > 1:  # every choice's end and output on record, not only the first's
            data["choices"] = [{"finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens,
                                "output_hash": self.keyed_hash(tenant, c.text.encode())} for c in outcome.choices]
        if prep.retried_from:
            data["retried_from"] = list(prep.retried_from)
        if error:
            data["error"] = error[:500]
        used = (outcome.prompt_tokens or len(prep.prompt_ids)) + outcome.completion_tokens
        self.limiter.settle(prep.ticket, used)

        # in memory, written by the usage store's next batch (no transaction per request)
        if prep.budget is not None and self.usage is not None:
            self.usage.settle(tenant, prep.budget, used)
        elif self.usage is not None:  # no budget to hold: counted once, here (for /v1/usage)
            self.usage.count(tenant, used)

        async def append() -> None:
            if self.sealer is not None and self.policies.retention.stores_content(tenant):
                output: str | list[str] = (outcome.text if len(outcome.choices) == 1
                                           else [c.text for c in outcome.choices])
                data["content"] = await asyncio.to_thread(self._sealed_content, prep, tenant, output)
            await self.audit.append_async(status, stream=tenant, actor=f"key:{prep.principal.key_id}", tenant=tenant,
                                          request_id=prep.request_id, data=data)

        # The record through the log's group commit. A cancelled request
        # (client gone) may be cancelled again at every await here (anyio's cancel scopes re-deliver), so
        # its record is written by a task of its own that no cancellation reaches; every other record is
        # durable before the client's final chunk.
        write = self._background(append())
        if status != "aborted":
            await asyncio.shield(write)

    def _sealed_content(self, prep: Prepared, tenant: str, output: str | list[str]) -> dict[str, Any]:
        """In a worker thread: a database read (and a write for the tenant's first data key)."""
        assert self.sealer is not None
        text = json.dumps({"prompt": prep.content_prompt, "output": output}, ensure_ascii=False)
        try:
            return self.sealer.seal_or_omit(tenant, prep.request_id, text)
        except ContentError as exc:  # the record matters more than its copy of the content
            return {"omitted": f"sealing failed: {type(exc).__name__}"}

    def _background(self, work: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for the records and aborts still being written (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

