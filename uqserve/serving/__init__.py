"""Triton serving: model repositories for bundles and a local tritonserver launcher.

``write_repository`` turns bundles into a Triton model repository (flavour
``python`` for the pip-installed server, ``onnxruntime`` for the NGC image);
``validate_repository`` checks one against Triton's config schema and the ONNX
graphs; ``TritonServer`` runs the real tritonserver from ``nvidia-pytriton``.
"""

from uqserve.serving.launcher import ServerError, TritonServer, find_server_tree
from uqserve.serving.repository import (
    FLAVOURS,
    MANIFEST_PARAMETER,
    RepositoryError,
    manifest_identity,
    member_model_name,
    nosamples_model_name,
    read_config,
    served_identity,
    validate_repository,
    write_repository,
)

__all__ = [
    "FLAVOURS",
    "MANIFEST_PARAMETER",
    "RepositoryError",
    "ServerError",
    "TritonServer",
    "find_server_tree",
    "manifest_identity",
    "member_model_name",
    "nosamples_model_name",
    "read_config",
    "served_identity",
    "validate_repository",
    "write_repository",
]
