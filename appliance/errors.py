"""The appliance's exceptions: one root, specific subclasses; messages say expected vs found."""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """The install root or its appliance.yaml is missing or invalid."""


class PortInUseError(ApplianceError):
    """The gateway cannot bind its port because something else holds it."""


class TenancyError(ApplianceError):
    """A tenant or key operation was refused (unknown tenant, duplicate name, revoked key)."""
