"""Shared test settings: hypothesis profile sized for CI's 2 cores."""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("full", max_examples=300, deadline=None)
settings.load_profile("full" if os.environ.get("GRADTX_SLOW") else "ci")
