"""Sparse-autoencoder latents behind a direction and behind a finetune's shift (sae-lens SAEs).

Three questions, one module each:

- :mod:`latentlab.sae.latents` (:func:`direction_latents`): which SAE latents write along the era /
  persona direction, against the chance level of random directions.
- :mod:`latentlab.sae.shift` (:func:`latent_shift`, :func:`analyze_latent_shift`): which latents did
  a finetune switch on or off on unrelated prompts, against a control, and how much of its shift
  along the direction they carry (an exact decomposition into top-k latents, other latents and SAE
  error).
- :mod:`latentlab.sae.training` (:func:`train_sae`): no pretrained SAE exists offline for the
  built-in models, so train a small one with sae-lens' own trainer.

:mod:`latentlab.sae.loading` reads SAEs (:func:`load_sae`: a folder, or a pretrained
``release:sae_id``; safetensors only, no remote code) and holds the checks every analysis shares.
Statistics (bootstrap intervals, random directions, NaN checks) come from :mod:`latentlab.stats`.

The commands (``latentlab sae train | latents | shift``: configs, run folders, tables) are
:mod:`latentlab.stages.sae`; this package is the library they call (SAEs and tensors in, results out).
"""

from latentlab.sae.latents import DirectionLatents, direction_latents
from latentlab.sae.loading import (
    CFG_FILE,
    PICKLE_LOADERS,
    SIDECAR,
    WEIGHTS_FILE,
    check_acts,
    check_sae,
    decoder_vectors,
    encode_acts,
    load_sae,
    read_sidecar,
    resolve_layer,
    resolve_sae_dir,
    sae_layer,
    sae_summary,
    unit_direction,
)
from latentlab.sae.shift import (
    LatentShift,
    analyze_latent_shift,
    latent_shift,
    with_adapter,
)
from latentlab.sae.training import (
    Architecture,
    SAETrainConfig,
    SAETraining,
    activation_batches,
    reconstruction_stats,
    sae_texts,
    train_sae,
    train_sae_on_activations,
)

__all__ = [
    "CFG_FILE",
    "PICKLE_LOADERS",
    "SIDECAR",
    "WEIGHTS_FILE",
    "Architecture",
    "DirectionLatents",
    "LatentShift",
    "SAETrainConfig",
    "SAETraining",
    "activation_batches",
    "analyze_latent_shift",
    "check_acts",
    "check_sae",
    "decoder_vectors",
    "direction_latents",
    "encode_acts",
    "latent_shift",
    "load_sae",
    "read_sidecar",
    "reconstruction_stats",
    "resolve_layer",
    "resolve_sae_dir",
    "sae_layer",
    "sae_summary",
    "sae_texts",
    "train_sae",
    "train_sae_on_activations",
    "unit_direction",
    "with_adapter",
]
