"""One tenant request, end to end: policy, rate limit, admission, audit, engine, audit.

Every refusal is audited as ``rejected`` and answered with an OpenAI-style error; an ``accepted``
record is committed before generation starts (if it cannot be, the request fails closed); the end of
every admitted request is audited as ``completed``, ``failed`` or ``aborted`` with token counts,
latency, node, region and hashes of prompt and output (never their text, never key material).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from appliance.admission import AdmissionController
from appliance.audit import AuditError, AuditLog
from appliance.config import NodeConfig
from appliance.errors import ApplianceError
from appliance.metrics import GatewayMetrics
from appliance.openai_schema import ChatCompletionRequest
from appliance.principal import Principal
from appliance.ratelimit import RateLimiter
from engine import AsyncEngine, SamplingParams
from policies import NodeInfo, PolicySet, RequestContext


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
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Outcome:
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


class ChatService:
    def __init__(
        self, *, engine: AsyncEngine, policies: PolicySet, audit: AuditLog, node: NodeConfig,
        model_name: str, salt_key: bytes, metrics: GatewayMetrics, default_max_tokens: int = 512,
    ) -> None:
        self.engine = engine
        self.policies = policies
        self.audit = audit
        self.node = node
        self.model_name = model_name
        self._salt_key = salt_key
        self.metrics = metrics
        self.limiter = RateLimiter()
        self.admission = AdmissionController()
        self.default_max_tokens = default_max_tokens

    def cache_salt(self, tenant: str) -> str:
        """Derived on the server from the tenant: clients can never choose or learn it."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()

    async def _audit(self, event_type: str, principal: Principal, request_id: str, data: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.audit.append, event_type, stream=principal.tenant, actor=f"key:{principal.key_id}",
            tenant=principal.tenant, request_id=request_id, data=data,
        )

    async def _reject(self, principal: Principal, request_id: str, exc: RequestRejected, model: str) -> None:
        self.metrics.requests.labels(principal.tenant, "rejected").inc()
        try:
            await self._audit(
                "rejected", principal, request_id,
                {"model": model, "status": exc.status, "code": exc.code, "reason": exc.message,
                 "node": self.node.name},
            )
        except AuditError as audit_exc:
            raise RequestRejected(503, "audit log unavailable; request refused", "server_error",
                                  "audit_unavailable") from audit_exc
        raise exc

    async def prepare(self, principal: Principal, req: ChatCompletionRequest) -> Prepared:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        policy = self.policies.tenant_policy(principal.tenant)
        if req.model != self.model_name:
            await self._reject(principal, request_id, RequestRejected(
                404, f"model {req.model!r} is not served here; available: {self.model_name!r}",
                "invalid_request_error", "model_not_found", param="model"), req.model)
        max_tokens = req.requested_max_tokens(min(self.default_max_tokens, policy.max_tokens_per_request))
        decision = self.policies.evaluate(RequestContext(
            tenant=principal.tenant, model=req.model, requested_max_tokens=max_tokens,
            nodes=[NodeInfo(name=self.node.name, labels=dict(self.node.labels))],
        ))
        if not decision.allowed:
            status = 400 if decision.code == "max_tokens_exceeded" else 403
            type_ = "invalid_request_error" if status == 400 else "permission_denied"
            await self._reject(principal, request_id,
                               RequestRejected(status, decision.reason, type_, decision.code), req.model)
        sla = decision.sla_class
        prompt = self.engine.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True)
        prompt_ids = self.engine.tokenizer.encode(prompt, add_special_tokens=False)  # template has them
        rate = self.limiter.check_and_record(
            principal.tenant, policy.rate_limit_rpm, policy.max_tokens_per_minute, len(prompt_ids) + max_tokens
        )
        if not rate.allowed:
            await self._reject(principal, request_id, RequestRejected(
                429, rate.reason, "rate_limit_exceeded", "rate_limit_exceeded", rate.retry_after_s), req.model)
        admit = self.admission.try_admit(self.node.name, len(prompt_ids), sla.ttft_target_ms)
        if not admit.admitted:
            await self._reject(principal, request_id, RequestRejected(
                429, f"node {self.node.name} cannot meet the {sla.name} TTFT target of {sla.ttft_target_ms} ms "
                f"now (estimated {admit.estimated_ttft_ms:.0f} ms)", "overloaded", "sla_unattainable",
                admit.retry_after_s), req.model)
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed, stop=req.stop_list() or None,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
            )
        except ValueError as exc:
            self.admission.release(self.node.name, len(prompt_ids))
            await self._reject(principal, request_id,
                               RequestRejected(400, str(exc), "invalid_request_error", "invalid_parameter"),
                               req.model)
        prepared = Prepared(
            request_id=request_id, principal=principal, model=req.model, prompt_ids=prompt_ids,
            params=params, sla_class=sla.name, priority=sla.priority,
            deadline=time.time() + sla.deadline_ms / 1000.0,
        )
        try:
            await self._audit("accepted", principal, request_id, {
                "model": req.model, "node": self.node.name, "region": self.node.labels.get("region", ""),
                "sla_class": sla.name, "prompt_tokens": len(prompt_ids), "max_tokens": max_tokens,
                "stream": req.stream, "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            })
        except AuditError as exc:
            self.admission.release(self.node.name, len(prompt_ids))
            raise RequestRejected(503, "audit log unavailable; request refused", "server_error",
                                  "audit_unavailable") from exc
        return prepared

    async def run(self, prep: Prepared, outcome: Outcome) -> AsyncIterator[tuple[str, str | None]]:
        """Yield ``(text delta, finish_reason)`` pairs; audits the end however it comes."""
        start = time.monotonic()
        first_at: float | None = None
        hasher = hashlib.sha256()
        tenant = prep.principal.tenant
        self.metrics.in_flight.inc()
        status = "failed"
        error = ""
        try:
            async for delta in self.engine.generate(
                prep.request_id, prep.prompt_ids, prep.params, cache_salt=self.cache_salt(tenant),
                priority=prep.priority, deadline=prep.deadline,
            ):
                if first_at is None:
                    first_at = time.monotonic()
                    self.admission.first_token(self.node.name, len(prep.prompt_ids), first_at - start)
                    self.metrics.ttft.labels(prep.sla_class).observe(first_at - start)
                outcome.text += delta.text
                outcome.completion_tokens = delta.num_output_tokens
                outcome.prompt_tokens = delta.num_prompt_tokens
                hasher.update(delta.text.encode())
                if delta.finished:
                    outcome.finish_reason = delta.finish_reason
                yield delta.text, (delta.finish_reason if delta.finished else None)
            status = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            status = "aborted"
            await asyncio.shield(self.engine.abort(prep.request_id))
            raise
        except Exception as exc:  # the engine failed this request; audit it, then report it
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if first_at is None:
                self.admission.release(self.node.name, len(prep.prompt_ids))
            self.metrics.in_flight.dec()
            elapsed = time.monotonic() - start
            self.metrics.latency.labels(prep.sla_class).observe(elapsed)
            self.metrics.requests.labels(tenant, status).inc()
            self.metrics.prompt_tokens.labels(tenant).inc(outcome.prompt_tokens)
            self.metrics.completion_tokens.labels(tenant).inc(outcome.completion_tokens)
            self.limiter.settle(tenant, len(prep.prompt_ids) + prep.params.max_tokens,
                                outcome.prompt_tokens + outcome.completion_tokens)
            data: dict[str, Any] = {
                "model": prep.model, "node": self.node.name, "region": self.node.labels.get("region", ""),
                "prompt_tokens": outcome.prompt_tokens or len(prep.prompt_ids),
                "completion_tokens": outcome.completion_tokens, "finish_reason": outcome.finish_reason,
                "ttft_ms": None if first_at is None else round((first_at - start) * 1000, 3),
                "latency_ms": round(elapsed * 1000, 3), "output_sha256": hasher.hexdigest(),
            }
            if error:
                data["error"] = error[:500]
            # Written synchronously: this block may run during cancellation, when awaiting is unsafe.
            self.audit.append(status, stream=tenant, actor=f"key:{prep.principal.key_id}", tenant=tenant,
                              request_id=prep.request_id, data=data)
