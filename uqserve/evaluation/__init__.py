"""Evaluation internals: data sets, the metric core, the runner, tables and figures.

The public entry points are ``uqserve.evaluate.evaluate`` and
``uqserve.evaluate.calibrate``; ``uqserve.evaluate`` also exports the names
callers need from here, so this package re-exports nothing itself.
"""
