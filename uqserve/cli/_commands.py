"""Imports every command module so that each registers on ``app``."""

# One line per implemented command module, e.g. `from uqserve.cli import predict`.
