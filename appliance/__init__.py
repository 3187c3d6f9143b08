"""The running appliance: gateway, tenancy, policy enforcement, SLA admission, audit, CLI."""

__version__ = "0.1.0"
