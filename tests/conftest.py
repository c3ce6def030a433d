"""Shared test set-up: float32 by default, a fixed seed, fast hypothesis runs."""

import os

from hypothesis import settings

# Hypothesis examples each compile a small program; keep the suite fast.
settings.register_profile("clipx", max_examples=8, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "clipx"))

# A verbatim copy of keras-rs code that imports keras at module level; the tests that use it
# import it themselves when keras is installed. Not collected as a module (doctests).
collect_ignore = ["references/clippy_adagrad.py"]
