"""Errors of `disaggctl size` and their exit codes (docs/sizing.md, "Exit codes")."""

from __future__ import annotations

from disaggctl.errors import DisaggError


class SizingInputError(DisaggError):
    """A bad option, file or value: exit 2, nothing written."""

    exit_code = 2


class DoesNotFitError(DisaggError):
    """The weights plus the KV cache of one ISL+OSL sequence do not fit on any layout: exit 3."""

    exit_code = 3


class SlaUnreachableError(DisaggError):
    """No layout meets the SLA even without load: exit 4."""

    exit_code = 4


class CapacityError(DisaggError):
    """The SLA is reachable, but not at the requested --rate / --concurrency: exit 5."""

    exit_code = 5
