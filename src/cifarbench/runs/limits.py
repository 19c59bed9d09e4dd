"""Caps on what one runs archive from elsewhere may cost (light: the CLI reads the defaults for its help)."""

from __future__ import annotations

from dataclasses import dataclass

from cifarbench.errors import CifarbenchError


@dataclass(frozen=True)
class BundleLimits:
    """What one archive from elsewhere may cost, each cap checked in the one streaming pass that reads it, at the
    member's header, before its bytes are inflated (docs/classroom.md#limits). A submission that exceeds one is
    refused whole; a teacher with larger runs raises the cap (`--max-bundle-mib`, `--max-bundle-members`,
    `--max-bundle-runs`)."""

    max_bytes: int = 1 << 30
    """All members together, uncompressed (a speedrun checkpoint is a few MiB, a resnet18 one under 100)."""
    max_members: int = 256
    """Archive members, directories and headers included (export writes 1 + at most 5 per run)."""
    max_runs: int = 32
    """Runs in one archive (export writes one per run named; a submission holds one)."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_members", "max_runs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CifarbenchError(f"bundle limit {name} must be a positive integer")
