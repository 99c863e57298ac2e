"""Shared test settings. Layer-specific fixtures live beside their tests:
tests/mountutil.py (real mounts), tests/httputil.py (a real HTTP server on loopback)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# ARTIFACTFS_TORTURE_SCALE=10 ./scripts/test runs property and torture loops 10x longer.
SCALE = max(1, int(os.environ.get("ARTIFACTFS_TORTURE_SCALE", "1")))
IN_CI = bool(os.environ.get("CI"))

settings.register_profile(
    "artifactfs",
    derandomize=True,  # CI runs keep a fixed seed
    deadline=None,
    max_examples=50 * SCALE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("artifactfs")
