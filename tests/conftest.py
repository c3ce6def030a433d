"""Shared test set-up: float32 by default, a fixed seed, fast hypothesis runs."""

import os

from hypothesis import settings

# Hypothesis examples each compile a small program; keep the suite fast.
settings.register_profile("clipx", max_examples=12, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "clipx"))
