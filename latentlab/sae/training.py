"""Training a small SAE on the residual stream at one layer (:func:`train_sae`).

No pretrained SAE exists offline for the built-in models, so latentlab trains one. The training
step is sae-lens' own (``SAETrainer.step`` on a ``TopKTrainingSAE`` / ``StandardTrainingSAE``: its
loss, auxiliary dead-latent loss, Adam, LR schedule, gradient clipping, activation-norm scaling
folded into the weights at the end), fed from an in-memory iterator of activation batches;
latentlab only writes the outer loop so it can show the loss in a progress bar and keep the loss
curve. The SAE is saved in sae-lens' format (``cfg.json`` + ``sae_weights.safetensors``), so
``SAE.load_from_disk`` reads it, plus a latentlab sidecar ``latentlab_sae.json`` (model
fingerprint, layer, data hash, training statistics).

:func:`train_sae_on_activations` is the trainer in small steps: the trainer and its data
(:func:`_make_trainer`, :func:`_start_at_the_data`), one step (:func:`_train_step`), the evaluation
(:func:`_evaluate`). ``latentlab sae train`` is :mod:`latentlab.stages.sae`.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import ActivationSet, collect, encode
from latentlab.config import check_device_dtype
from latentlab.data import (
    Example,
    as_examples,
    dataset_hash,
    load_pairs,
    load_prompts,
    pair_examples,
    read_jsonl,
    render_prompt,
)
from latentlab.errors import LatentlabError
from latentlab.io import ensure_writable_dir, make_temp_dir, replace_dir, sha256_text, write_json
from latentlab.models import LoadedModel, resolve_device
from latentlab.progress import progress as progress_bar
from latentlab.sae.loading import SIDECAR, require_at_least
from latentlab.stats import check_finite

if TYPE_CHECKING:  # sae-lens costs seconds to import: only when an SAE is really used
    from sae_lens import SAE

Architecture = Literal["topk", "standard"]
ARCHITECTURES: tuple[str, ...] = ("topk", "standard")
STAGE = "sae train"


# --------------------------------------------------------------------------------------------
# Training a small SAE with sae-lens.
# --------------------------------------------------------------------------------------------


@dataclass
class SAETrainConfig:
    """SAE hyper-parameters. Defaults are for a CPU: ``d_sae = 4 x d_model`` (2560 latents on
    gemma-3-270m), TopK with k=32, 1000 steps of 256 tokens: ~2-3 min on 2 cores at d_model 640.

    Why 4x and not the usual 8-32x: the offline data here is small (the 241 unrelated prompts are
    ~5k tokens), and a wider SAE on so few tokens mostly adds dead latents. With more text, raise
    ``expansion`` (and ``steps``). TopK is the default because its sparsity is set directly (no
    L1 coefficient to tune); ``architecture="standard"`` is the ReLU + L1 SAE.
    """

    architecture: Architecture = "topk"
    expansion: int = 4
    d_sae: int | None = None  # overrides expansion
    k: int = 32  # topk: active latents per token
    l1_coefficient: float = 5.0  # standard: sparsity penalty (inputs scaled to norm sqrt(d_model))
    steps: int = 1000
    batch_size: int = 256  # tokens per step
    lr: float = 1e-3  # constant, then linear decay to 0 over the last 20% of steps (sae-lens' scheduler)
    seed: int = 0
    eval_fraction: float = 0.1  # examples held out for the reported statistics
    exclude_bos: bool = True  # the BOS position is an attention sink with a huge norm, not content
    device: str = "cpu"  # where the SAE trains (cpu, cuda, auto); it is saved and returned on the CPU

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise LatentlabError(
                f"SAE architecture {self.architecture!r} (--architecture) is not topk or standard",
                "pass --architecture topk or --architecture standard",
            )
        require_at_least("k", self.k, 1, "--k")
        require_at_least("expansion", self.expansion, 1, "--expansion")
        if self.d_sae is not None:
            require_at_least("d_sae", self.d_sae, 1, "--d-sae")
            if self.architecture == "topk" and self.k > self.d_sae:
                raise LatentlabError(f"k={self.k} must be between 1 and d_sae={self.d_sae}", "pass a smaller --k")
        require_at_least("steps", self.steps, 1, "--steps")
        require_at_least("batch_size", self.batch_size, 1, "--batch-size")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise LatentlabError(f"lr must be > 0, got {self.lr}", "pass a positive --lr (e.g. 1e-3)")
        require_at_least("l1_coefficient", self.l1_coefficient, 0, "--l1")
        if not (math.isfinite(self.eval_fraction) and 0 <= self.eval_fraction < 1):
            raise LatentlabError(
                f"eval_fraction must be in [0, 1), got {self.eval_fraction}", "pass --eval-fraction 0.1 (or 0)"
            )
        check_device_dtype(self.device, "float32")


@dataclass
class SAETraining:
    """A trained SAE (as reloaded from sae-lens' format), its loss curve and statistics."""

    sae: Any  # sae_lens.SAE, the inference SAE (norm scaling folded in)
    losses: list[dict[str, float]]  # per step: loss, mse_loss, (l1_loss | auxiliary_reconstruction_loss), l0
    stats: dict[str, Any]
    meta: dict[str, Any]  # the sidecar
    path: Path | None = None


def activation_batches(
    acts: Float[Tensor, "n d"], batch_size: int, seed: int = 0
) -> Iterator[Float[Tensor, "batch d"]]:
    """Endless shuffled batches of token activations (a fresh permutation per epoch, seeded).

    This is sae-lens' ``DataProvider`` protocol (an iterator of ``[batch, d_in]`` tensors). Only
    full batches are yielded: sae-lens counts every step as ``batch_size`` samples.
    """
    n = acts.shape[0]
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


def reconstruction_stats(sae: SAE[Any], acts: Float[Tensor, "n d"], chunk: int = 2048) -> dict[str, float | None]:
    """MSE (sum over dimensions, mean over tokens), explained variance, L0 and dead-latent fraction.

    Explained variance is ``1 - SSE / SST`` with SST around the mean of ``acts``; a latent is dead
    here when it never fires on ``acts``.
    """
    return _stats_and_fired(sae, acts, chunk)[0]


@torch.no_grad()
def _stats_and_fired(sae: SAE[Any], acts: Tensor, chunk: int = 2048) -> tuple[dict[str, float | None], Tensor]:
    """:func:`reconstruction_stats` and which latents fired, from one encoding pass (the training
    summary combines the train and held-out masks instead of encoding everything again)."""
    sae.eval()
    sse, l0_sum, n = 0.0, 0.0, acts.shape[0]
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    mean = acts.float().mean(0)
    sst = float(((acts.float() - mean) ** 2).sum())
    for i in range(0, n, chunk):
        x = acts[i : i + chunk].to(sae.W_dec.device, sae.W_dec.dtype)
        f = sae.encode(x)
        f = f.to_dense() if f.is_sparse else f
        rec = sae.decode(f)
        sse += float(((rec.float() - x.float()) ** 2).sum())
        active = (f > 0).cpu()
        l0_sum += float(active.float().sum())
        fired |= active.any(0)
    stats = {
        "mse": sse / max(n, 1),
        "explained_variance": 1.0 - sse / sst if sst > 0 else None,  # constant inputs: undefined (not NaN)
        "l0": l0_sum / max(n, 1),
        "dead_fraction": float((~fired).float().mean()),
        "n_tokens": int(n),
    }
    return stats, fired


def _make_training_sae(
    cfg: SAETrainConfig, d_in: int, d_sae: int, hook_name: str, model_name: str | None, device: str
) -> Any:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True)
    common = {
        "d_in": d_in,
        "d_sae": d_sae,
        "normalize_activations": "expected_average_only_in",
        "metadata": meta,
        "device": device,
    }
    if cfg.architecture == "topk":
        if cfg.k > d_sae:  # d_sae from --expansion x d_model is known only now
            raise LatentlabError(f"k={cfg.k} must be between 1 and d_sae={d_sae}", "pass a smaller --k")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common))


def train_sae_on_activations(
    acts: Float[Tensor, "n_tokens d_model"],
    layer: int,
    config: SAETrainConfig | None = None,
    eval_acts: Float[Tensor, "n_eval d_model"] | None = None,
    out: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    b_dec: Literal["mean", "zero"] = "mean",
) -> SAETraining:
    """Train an SAE on token activations of one layer with sae-lens' ``SAETrainer``.

    The batches come from :func:`activation_batches`; sae-lens estimates the activation-norm
    scale on them, trains in that scale and folds it into the weights, so the saved SAE reads raw
    activations. ``b_dec`` starts at the data mean (as sae-lens' ``b_dec_init_method="mean"`` did
    before 6.0): residual streams have a large mean, and learning it from zero wastes most of a
    short CPU run. ``b_dec="zero"`` fixes ``b_dec`` at zero instead (not trained): for activation
    *differences* (:mod:`latentlab.sae.dictionary`), where no difference must decode to zero and the
    mean difference is what the latents are there to carry. With ``out``, the SAE is written to a
    temporary folder and renamed into place.
    """
    cfg = config or SAETrainConfig()
    acts = _training_acts(acts)
    n_tokens, d_in = acts.shape
    d_sae = int(cfg.d_sae or cfg.expansion * d_in)  # both >= 1 (SAETrainConfig checks)
    batch = min(cfg.batch_size, n_tokens)  # a tiny dataset: every step sees all of it, reshuffled
    hook_name = f"blocks.{layer}.hook_resid_post"
    torch.manual_seed(cfg.seed)  # sae-lens initialises with the global RNG
    device = str(resolve_device(cfg.device))
    training_sae = _make_training_sae(cfg, d_in, d_sae, hook_name, model_name, device)
    trainer = _make_trainer(cfg, training_sae, acts, batch, device)
    # What SAETrainer.fit() does, with a progress bar that shows the loss and a kept loss curve.
    t0 = time.time()
    scale = _start_at_the_data(trainer, training_sae, acts, b_dec)
    losses = _train_steps(trainer, cfg.steps, f"SAE layer {layer} ({cfg.architecture}, {d_sae} latents)", progress)
    _finish_training(trainer, training_sae, cfg, scale)
    seconds = time.time() - t0

    # Save in sae-lens' inference format, reload it (what you get is what is on disk), then measure.
    tmp_root = make_temp_dir(None if out is None else _parent(out), ".sae-")
    try:
        training_sae.save_inference_model(str(tmp_root))
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(tmp_root), device="cpu")
        stats = _evaluate(sae, acts, eval_acts, losses)
        sidecar = {
            "format": "latentlab-sae/1",
            "layer": layer,
            "hook_name": hook_name,
            "position": "all tokens" + (" except BOS" if cfg.exclude_bos else ""),
            **(meta or {}),
            "n_tokens_train": n_tokens,
            "n_tokens_eval": 0 if eval_acts is None else int(eval_acts.shape[0]),
            "activations_hash": _tensor_hash(acts),
            "training": {
                **asdict(cfg),
                "d_sae": d_sae,
                "d_in": d_in,
                "batch_size_used": batch,
                "norm_scaling_factor": scale,
                "seconds": round(seconds, 2),
                "trainer": "sae_lens.SAETrainer",
                "b_dec": "fixed at zero" if b_dec == "zero" else "started at the data mean, trained",
                "sae_lens_l0": sae.cfg.metadata.get("l0"),
            },
            "stats": stats,
        }
        write_json(tmp_root / SIDECAR, sidecar)
        sae.cfg.metadata["latentlab"] = sidecar
        path = None
        if out is not None:
            path = Path(out)
            replace_dir(tmp_root, path)
    finally:
        if tmp_root.exists():
            shutil.rmtree(tmp_root, ignore_errors=True)
    return SAETraining(sae=sae, losses=losses, stats=stats, meta=sidecar, path=path)


def _training_acts(acts: Tensor) -> Tensor:
    """The token activations as float32 on the CPU, refused when empty or not finite."""
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise LatentlabError(
            f"no token activations to train on (shape {tuple(acts.shape)})", "pass data with at least one token"
        )
    if not torch.isfinite(acts).all():
        raise LatentlabError("activations contain NaN or inf", "check the model dtype (try --dtype float32)")
    return acts.float().cpu()


def _make_trainer(cfg: SAETrainConfig, training_sae: Any, acts: Tensor, batch: int, device: str) -> Any:
    """sae-lens' trainer over :func:`activation_batches` of ``acts``: constant LR, linear decay over the last 20%."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    decay = max(1, cfg.steps // 5)
    return SAETrainer(
        SAETrainerConfig(
            total_training_samples=cfg.steps * batch,
            train_batch_size_samples=batch,
            lr=cfg.lr,
            lr_end=cfg.lr / 10,  # unused by the constant schedule, but sae-lens requires it set
            lr_decay_steps=decay if cfg.steps > decay else 0,
            device=device,
            dead_feature_window=max(1, min(1000, cfg.steps // 4)),
            feature_sampling_window=max(1, cfg.steps),
            n_batches_for_norm_estimate=max(1, min(100, acts.shape[0] // batch)),
        ),
        training_sae,
        activation_batches(acts, batch, cfg.seed),
    )


def _start_at_the_data(trainer: Any, training_sae: Any, acts: Tensor, b_dec: str = "mean") -> float:
    """Estimate the activation-norm scale (sae-lens trains in it) and start ``b_dec`` at the scaled data
    mean, or fix it at zero (``b_dec="zero"``: no gradient, so sae-lens' Adam never moves it)."""
    trainer.activation_scaler.estimate_scaling_factor(
        acts.shape[1], trainer.data_provider, trainer.cfg.n_batches_for_norm_estimate
    )
    scale = float(trainer.activation_scaler.scaling_factor or 1.0)
    with torch.no_grad():
        if b_dec == "zero":
            training_sae.b_dec.zero_()
            training_sae.b_dec.requires_grad_(False)
        else:
            training_sae.b_dec.copy_((acts.mean(0) * scale).to(training_sae.b_dec.device))
    return scale


def _train_steps(trainer: Any, steps: int, desc: str, progress: bool) -> list[dict[str, float]]:
    """``steps`` training steps with a progress bar showing the loss; the loss curve, one row per step."""
    losses: list[dict[str, float]] = []
    bar = progress_bar(total=steps, desc=desc, disable=not progress)
    for _ in range(steps):
        row = _train_step(trainer)
        if not math.isfinite(row["loss"]):
            bar.close()
            raise LatentlabError(f"SAE training diverged (loss {row['loss']} at step {len(losses) + 1})", "lower --lr")
        losses.append(row)
        if len(losses) % 10 == 1 or len(losses) == steps:
            bar.set_postfix(loss=f"{row['loss']:.3g}", mse=f"{row['mse_loss']:.3g}", l0=f"{row['l0']:.0f}")
        bar.update(1)
    bar.close()
    return losses


def _train_step(trainer: Any) -> dict[str, float]:
    """One sae-lens step on the next batch: its loss, loss terms and L0."""
    trainer.maybe_reset_sparsity()
    step = trainer.step(next(trainer.data_provider))
    trainer.n_training_steps += 1
    with torch.no_grad():
        fa = step.feature_acts.to_dense() if step.feature_acts.is_sparse else step.feature_acts
        row = {"loss": float(step.loss.detach())}
        row |= {name: float(v.detach()) for name, v in step.losses.items()}
        row["l0"] = float((fa > 0).float().sum(-1).mean())
    return row


def _finish_training(trainer: Any, training_sae: Any, cfg: SAETrainConfig, scale: float) -> None:
    """Fold the norm scale (and, for ReLU SAEs, the decoder norms) into the weights; move the SAE to the CPU."""
    training_sae.fold_activation_norm_scaling_factor(scale)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    if cfg.architecture == "standard":
        training_sae.fold_W_dec_norm()  # exact for ReLU SAEs: unit decoder rows, so changes compare across latents
    training_sae.to("cpu")
    training_sae.cfg.device = "cpu"


def _evaluate(sae: SAE[Any], acts: Tensor, eval_acts: Tensor | None, losses: list[dict[str, float]]) -> dict[str, Any]:
    """Reconstruction statistics on the training and held-out tokens, dead latents, and the loss at both ends."""
    train_stats, fired = _stats_and_fired(sae, acts)
    stats: dict[str, Any] = {"train": train_stats}
    if eval_acts is not None and eval_acts.shape[0] > 0:
        stats["eval"], fired_eval = _stats_and_fired(sae, eval_acts.float().cpu())
        fired |= fired_eval
    for split in ("train", "eval"):
        if split in stats:
            vals = [v for v in stats[split].values() if v is not None]
            check_finite(vals, f"{split} reconstruction statistics", STAGE)
    stats["dead_fraction"] = float((~fired).float().mean())  # never fires on any token, train or held out
    stats["reported_on"] = "eval" if "eval" in stats else "train"
    first = losses[: max(1, len(losses) // 10)]
    last = losses[-max(1, len(losses) // 10) :]
    stats["final_loss"] = sum(r["loss"] for r in last) / len(last)
    stats["initial_loss"] = sum(r["loss"] for r in first) / len(first)
    return stats


def _parent(out: str | Path) -> Path:
    return ensure_writable_dir(Path(out).parent)


def _tensor_hash(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def sae_texts(model: LoadedModel, sources: str | Path | Sequence[str | Path]) -> tuple[list[Example], dict[str, Any]]:
    """Texts to train an SAE on, rendered the way the analyses read them, and their provenance.

    Prompt files (``{"prompt"}`` lines, e.g. ``unrelated``) are rendered with
    :func:`latentlab.data.render_prompt`, as ``latentlab shift`` renders them, so the SAE sees the
    distribution it is later used on; contrast pairs (``era``, ``persona``) give both poles;
    text and chat files are used as :func:`latentlab.collect` reads them.
    """
    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not srcs:
        raise LatentlabError("no data to train the SAE on", "pass --data with a dataset name or JSONL file")
    examples: list[Example] = []
    names, hashes, kinds = [], [], []
    for src in srcs:
        row = read_jsonl(src)[0]
        if "positive" in row and "negative" in row:
            pos, neg = pair_examples(load_pairs(src), model.tokenizer)
            examples += pos + neg
            kinds.append("pairs")
        elif "prompt" in row and "completion" not in row and "text" not in row:
            examples += [Example(render_prompt(p, model.tokenizer)) for p in load_prompts(src)]
            kinds.append("prompts")
        else:
            examples += as_examples(src if isinstance(src, Path) else str(src), model.tokenizer)
            kinds.append("texts")
        names.append(str(src))
        hashes.append(dataset_hash(src))
    return examples, {"datasets": names, "dataset_hashes": hashes, "dataset_kinds": kinds}


#: the model facts an SAE's sidecar records (what it was trained on)
MODEL_FACTS = ("name", "path", "architecture", "n_layers", "d_model", "base_fingerprint", "adapter",
               "adapter_fingerprint")


def train_sae(
    model: LoadedModel,
    texts: Any,
    layer: int,
    d_sae: int | None = None,
    config: SAETrainConfig | None = None,
    out: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SAETraining:
    """Train an SAE on ``model``'s residual stream after block ``layer``, every token of ``texts``.

    ``texts``: anything :func:`latentlab.collect` takes (strings, Examples, a JSONL path or built-in
    name); :func:`sae_texts` renders prompt files and contrast pairs first. Activations are held in
    memory (n_tokens x d_model float32: 100k tokens of gemma-3-270m are 256 MB). A held-out
    ``config.eval_fraction`` of the *examples* (not tokens, so no text is in both) gives the
    reported statistics. Defaults: see :class:`SAETrainConfig`. With ``out``, the folder holds
    sae-lens' ``cfg.json`` + ``sae_weights.safetensors`` and the sidecar ``latentlab_sae.json``.
    """
    cfg = config or SAETrainConfig()
    if d_sae is not None:
        cfg = SAETrainConfig(**{**asdict(cfg), "d_sae": d_sae})
    layer = model.check_layers([layer])[0]
    examples = as_examples(texts, model.tokenizer)
    if not examples:
        raise LatentlabError("no texts to train the SAE on", "pass data with at least one example")
    bos_first = encode(model, examples).bos_first
    acts = collect(model, examples, [layer], "all", batch_size=batch_size, progress=progress)
    assert acts is not None and acts.offsets is not None
    skip = 1 if (cfg.exclude_bos and bos_first) else 0
    train, held, n_eval = _split_examples(acts, cfg, skip, model.d_model)
    info: dict[str, Any] = {
        "model": {k: getattr(model.info, k) for k in MODEL_FACTS},
        "n_examples": len(acts),
        "n_examples_eval": n_eval,
        "data_hash": sha256_text("\x1e".join(ex.text for ex in examples))[:16],
        "excluded_bos": bool(skip),
    }
    if isinstance(texts, (str, Path)):
        info |= {"datasets": [str(texts)], "dataset_hashes": [dataset_hash(texts)]}
    return train_sae_on_activations(
        train,
        layer,
        cfg,
        eval_acts=held,
        out=out,
        meta=info | (meta or {}),
        model_name=model.info.name,
        progress=progress,
    )


def _split_examples(
    acts: ActivationSet, cfg: SAETrainConfig, skip: int, d_model: int
) -> tuple[Tensor, Tensor | None, int]:
    """(training tokens, held-out tokens or None, number of held-out examples): a seeded split of the
    *examples* (no text in both), each example's tokens after the first ``skip`` (the BOS)."""
    n = len(acts)
    g = torch.Generator().manual_seed(cfg.seed)
    n_eval = int(n * cfg.eval_fraction) if n >= 10 else 0
    eval_ids = set(torch.randperm(n, generator=g)[:n_eval].tolist())
    train_rows, eval_rows = [], []
    for i in range(n):
        rows = acts.example(i)[skip:, 0]
        (eval_rows if i in eval_ids else train_rows).append(rows)
    train = torch.cat(train_rows) if train_rows else torch.zeros(0, d_model)
    held = torch.cat(eval_rows) if eval_rows else None
    return train, held, n_eval
