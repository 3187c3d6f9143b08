"""The appliance's exceptions: one root, specific subclasses; messages say expected vs found."""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """The install root or its appliance.yaml is missing or invalid."""


class TlsError(ConfigError):
    """The installer-issued TLS material under ROOT/tls is missing, damaged, expired or does not
    cover the host being served; the fix is to run the installer again."""


class PortInUseError(ApplianceError):
    """The gateway cannot bind its port because something else holds it."""


class TenancyError(ApplianceError):
    """A tenant or key operation was refused (unknown tenant, duplicate name, revoked key)."""
