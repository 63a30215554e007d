"""The server-side reduction step of a ``--reduce server`` Triton ensemble.

The graph itself is :func:`uqserve.reduction.reduce_graph` (shared with the
embedded runtime's ``reduce="graph"``); see that module for its inputs and
outputs.
"""

from __future__ import annotations

from uqserve.reduction import OPSET, reduce_graph

__all__ = ["OPSET", "reduce_graph"]
