"""Write and validate Triton model repositories for uqserve bundles.

One bundle becomes M member models, an ensemble named after the bundle and a
lean twin of it without ``sample_labels`` (``<bundle>_nosamples``):

```
<repo>/<bundle>/config.pbtxt                  ensemble: image, seed, offset, valid in;
<repo>/<bundle>/1/.gitkeep                      mean_<m>, sample_entropy_<m>, sample_counts_<m>,
                                                sample_labels_<m> out (m = 0..M-1)
<repo>/<bundle>_nosamples/config.pbtxt        the same without sample_labels_<m> (predict's path)
<repo>/<bundle>_member_<m>/config.pbtxt        one member graph
<repo>/<bundle>_member_<m>/1/model.onnx        the bundle's member file (copy or relative symlink)
<repo>/<bundle>_member_<m>/1/model.py          python flavour only: runs model.onnx (copy or link)
```

With ``reduce="server"`` (``uqserve repo --reduce server``) two more models
sum the members' outputs on the server (``uqserve.serving.reduce``), so that
K + 2 numbers per voxel cross the network instead of M x (K + 1):

```
<repo>/<bundle>_reduce/1/model.onnx           the reduction graph (model.py too, python flavour)
<repo>/<bundle>_reduced/config.pbtxt          ensemble: the members, then the reduction;
                                                mean_sum, entropy_sum, sample_entropy_sum,
                                                foreground, sample_counts out
```

and every ensemble carries the parameter ``uqserve_reduce: server``, which
the Triton runtime reads to use ``<bundle>_reduced`` when it does not need
sample labels.

Two flavours come from the same bundle: ``onnxruntime`` (platform
``onnxruntime_onnx``, GPU instances, for the NGC tritonserver image) and
``python`` (the generic ``model.py`` of ``python_model.py``, CPU instances,
for the pip-installed tritonserver of ``nvidia-pytriton``).

Configs are built as ``model_config_pb2.ModelConfig`` messages (Triton's own
schema, shipped in tritonclient) and written with ``text_format``, so output
is deterministic: no timestamps, no absolute paths. The bundle manifest's
identity (name, version, member sha256) is stored as the ensemble parameter
``uqserve_manifest`` so that clients can check that the served model is the
one they hold.

Modules: ``configs`` (the ``ModelConfig`` messages), ``writer``
(``write_repository``), ``validate`` (``validate_repository``); the model names
and the identity parameter come from ``uqserve.triton_names``.
"""

from __future__ import annotations

from uqserve.bundle import BundleError
from uqserve.serving.repository.configs import (
    RepositoryError,
    ensemble_config,
    member_config,
    read_config,
    reduce_config,
    reduced_ensemble_config,
)
from uqserve.serving.repository.validate import validate_repository
from uqserve.serving.repository.writer import FLAVOURS, write_repository
from uqserve.triton_names import (
    MANIFEST_PARAMETER,
    NOSAMPLES_SUFFIX,
    REDUCE_PARAMETER,
    manifest_identity,
    member_model_name,
    nosamples_model_name,
    reduce_model_name,
    reduced_model_name,
    served_identity,
)

__all__ = [
    "FLAVOURS",
    "MANIFEST_PARAMETER",
    "NOSAMPLES_SUFFIX",
    "REDUCE_PARAMETER",
    "BundleError",
    "RepositoryError",
    "ensemble_config",
    "manifest_identity",
    "member_config",
    "member_model_name",
    "nosamples_model_name",
    "read_config",
    "reduce_config",
    "reduce_model_name",
    "reduced_ensemble_config",
    "reduced_model_name",
    "served_identity",
    "validate_repository",
    "write_repository",
]
