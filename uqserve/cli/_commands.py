"""Imports every command module so that each registers on ``app``."""

# One line per implemented command module, e.g. `from uqserve.cli import predict`.
from uqserve.cli import evaluate  # noqa: F401  (evaluate, calibrate)
from uqserve.cli import export  # noqa: F401  (export, info)
from uqserve.cli import predict  # noqa: F401
from uqserve.cli import serve  # noqa: F401  (serve, repo)
from uqserve.cli import sidecar  # noqa: F401
from uqserve.cli import train  # noqa: F401
