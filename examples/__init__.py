"""The clipx examples, importable as ``examples.<module>`` from the repository root.

A regular package (not a namespace package) on purpose: some installed
distributions (opacus, for one) ship a top-level ``examples`` package, which
would otherwise shadow this folder. With the repository root first on
``sys.path`` (the scripts and the tests put it there) this one wins.
"""
