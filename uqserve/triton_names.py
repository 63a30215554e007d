"""The names that a Triton model repository and the Triton client agree on.

``uqserve.serving.repository`` writes models under these names and stores the
bundle's identity as the ensemble parameter ``uqserve_manifest``;
``uqserve.runtime.triton`` calls them by the same names and checks that
identity. Both import them from here, so the client never imports the writer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from uqserve.bundle import Bundle

__all__ = [
    "MANIFEST_PARAMETER",
    "NOSAMPLES_SUFFIX",
    "REDUCE_PARAMETER",
    "manifest_identity",
    "member_model_name",
    "nosamples_model_name",
    "reduce_model_name",
    "reduced_model_name",
    "served_identity",
]

#: Ensemble parameter holding the bundle's identity (JSON of ``manifest_identity``).
MANIFEST_PARAMETER = "uqserve_manifest"
#: Ensemble parameter ``"server"`` when the repository sums members on the server.
REDUCE_PARAMETER = "uqserve_reduce"
NOSAMPLES_SUFFIX = "_nosamples"


def member_model_name(bundle_name: str, member: int) -> str:
    """Triton model name of member ``member`` of bundle ``bundle_name``."""
    return f"{bundle_name}_member_{member}"


def nosamples_model_name(bundle_name: str) -> str:
    """Triton model name of the ensemble without ``sample_labels`` outputs."""
    return f"{bundle_name}{NOSAMPLES_SUFFIX}"


def reduce_model_name(bundle_name: str) -> str:
    """Triton model name of the reduction step (``reduce="server"``)."""
    return f"{bundle_name}_reduce"


def reduced_model_name(bundle_name: str) -> str:
    """Triton model name of the ensemble that returns the members' sums."""
    return f"{bundle_name}_reduced"


def manifest_identity(bundle: Bundle) -> dict[str, Any]:
    """What a served model must agree on with the client's bundle (JSON-able)."""
    m = bundle.manifest
    return {
        "name": m.name,
        "manifest_version": m.manifest_version,
        "combination": m.combination,
        "num_members": m.num_members,
        "num_samples": m.num_samples,
        "classes": list(m.classes),
        "members": [x.sha256 for x in m.members],
    }


def served_identity(config: ModelConfig) -> dict[str, Any] | None:
    """The ``uqserve_manifest`` parameter of an ensemble config, or None."""
    if MANIFEST_PARAMETER not in config.parameters:
        return None
    try:
        value = json.loads(config.parameters[MANIFEST_PARAMETER].string_value)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
