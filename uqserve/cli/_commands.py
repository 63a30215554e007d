"""Imports every command module so that each registers on ``app`` (``_app.py``)."""

# One line per implemented command module, e.g. `from uqserve.cli import predict`.
from uqserve.cli import (
    evaluate,  # noqa: F401  (evaluate, calibrate)
    export,  # noqa: F401  (export, info)
    predict,  # noqa: F401
    serve,  # noqa: F401  (serve, repo)
    sidecar,  # noqa: F401
    train,  # noqa: F401
)
