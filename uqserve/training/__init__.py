"""Train the members of an AU x EU combination (PyTorch, imported lazily).

``train(combination, out_dir)`` writes a checkpoint folder::

    out_dir/
      config.json             what was trained and how (schema below)
      member_0.safetensors    EMA weights of member 0
      member_1.safetensors    ... one file per independently trained network

* ensemble: ``num_members`` networks, member ``m`` seeded ``seed + m``;
* mcdropout: one network trained with channel dropout (p = 0.2 unless the
  model config sets one); the exporter turns it into ``num_masks`` members
  with frozen masks;
* swag / swagdiag: one network trained exactly like ``none`` (the same
  schedule, as the paper, whose SWAG runs only observe an ordinary run); over
  its last ``swag_snapshots * swag_every`` steps the raw weights are collected
  every ``swag_every`` steps into SWAG statistics (``swag.safetensors``, see
  ``uqserve.models.swag``); ``member_0`` holds their mean. The exporter draws
  ``swag_draws`` weight sets as members;
* none: one network (``collect_swag=True`` also writes the SWAG statistics of
  its run, from which :func:`assemble_checkpoints` makes the swag/swagdiag
  folders without training again).

:func:`assemble_checkpoints` builds a ``none``, ``ensemble``, ``swag`` or
``swagdiag`` folder from trained ``none`` folders, so a study trains each
shared network once: ensemble member ``m`` of seed ``s`` is the ``none``
network of seed ``s + m``, bit for bit, and SWAG and SWAG-D share one run.

Every step draws a batch of random crops; each image's target is the label
map of one randomly chosen annotator, so the network sees the annotators'
disagreement and the AU head can learn it. Optimiser: AdamW with a linear
warm-up then cosine decay, gradient-norm clipping, and an exponential moving
average (EMA) of the weights, which is what is saved. Augmentation: flips,
90-degree rotations and, in normalised units, intensity scale/shift and
Gaussian noise. Images are normalised with the training set's mean and std
(scheme ``fixed``), recorded in ``config.json`` for the bundle manifest.

``config.json`` keys: ``format`` ("uqserve-checkpoints"), ``version``,
``combination``, ``au``, ``eu``, ``num_members`` (weight files),
``bundle_members`` (members the exported bundle will have), ``seed``,
``model_config`` (``ModelConfig.to_dict()``), ``train_config``
(``TrainConfig`` fields), ``normalization`` (``scheme``, ``mean``, ``std``,
``clip``), ``classes``, ``tile_size``, ``spacing``, ``data`` (where the
training data came from), ``members`` (per member: file, seed, seconds,
final loss, a loss curve), ``validation`` (synthetic data only: Dice of each
member against the annotators' majority on held-out slices),
``uqserve_version``, ``created``.

Volumes (``ModelConfig(dims=3)``, softmax with EU none, ensemble or mcdropout):
each step draws random ``TrainConfig.patch`` ``(D, H, W)`` crops from
``num_volumes`` synthetic volumes (``uqserve.data.make_volume``, RAS+, seen as
``[Z, Y, X]``, the model axes of a 3D bundle); ``config.json`` then also holds
``patch``, ``orientation`` ("RAS") and the ``spacing`` ``[D, H, W]`` in mm. There
is no validation Dice for volumes, and folder data trains 2D networks only.

Same seed, same data, same thread count -> bit-identical weights.

Modules: ``config`` (``TrainConfig``, the device), ``batches`` (data and
augmented batches), ``loop`` (one member's optimisation), ``validation``
(held-out Dice), ``run`` (``train``), ``shared`` (``assemble_checkpoints``).
The folder itself is written and read by ``uqserve.checkpoints`` alone.
"""

from __future__ import annotations

# The one checkpoint module: training writes through it, exporting reads through it.
from uqserve.checkpoints import CONFIG_NAME as CONFIG_NAME
from uqserve.checkpoints import Checkpoints as Checkpoints
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.checkpoints import read_checkpoint_config as read_checkpoint_config
from uqserve.training.config import (
    DEFAULT_DROPOUT,
    DEFAULT_WIDTH,
    FORMAT,
    FORMAT_VERSION,
    SWAG_FILE,
    SWAG_METHODS,
    TrainConfig,
    TrainError,
    default_threads,
    resolve_device,
)
from uqserve.training.run import train
from uqserve.training.shared import assemble_checkpoints
from uqserve.training.validation import dice_vs_majority, majority_vote

__all__ = [
    "DEFAULT_DROPOUT",
    "DEFAULT_WIDTH",
    "FORMAT",
    "FORMAT_VERSION",
    "SWAG_FILE",
    "SWAG_METHODS",
    "TrainConfig",
    "TrainError",
    "assemble_checkpoints",
    "default_threads",
    "dice_vs_majority",
    "majority_vote",
    "resolve_device",
    "train",
]
