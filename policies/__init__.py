"""Typed policy documents (residency, tenancy, SLA classes, retention): loading and evaluation.

Imports nothing of ours. Entry points: ``load_policy_set`` and ``PolicySet.evaluate``.
"""

from policies.documents import WILDCARD, ResidencyRule, RetentionPolicy, SLAClass, TenantPolicy
from policies.errors import PolicyError, PolicyNotFoundError, PolicyProblem, PolicyValidationError
from policies.loader import default_policy_dir, load_policy_files, load_policy_set, read_policy_files
from policies.policy_set import DEFAULT_TENANT_NAME, PolicySet
from policies.request import DECISION_CODES, Decision, NodeInfo, RequestContext

__all__ = [
    "DECISION_CODES",
    "DEFAULT_TENANT_NAME",
    "WILDCARD",
    "Decision",
    "NodeInfo",
    "PolicyError",
    "PolicyNotFoundError",
    "PolicyProblem",
    "PolicySet",
    "PolicyValidationError",
    "RequestContext",
    "ResidencyRule",
    "RetentionPolicy",
    "SLAClass",
    "TenantPolicy",
    "default_policy_dir",
    "load_policy_files",
    "load_policy_set",
    "read_policy_files",
]
