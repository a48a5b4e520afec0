"""Collect residual-stream activations through the TransformerBridge hooks.

Why not ``bridge.run_with_cache``: it caches every hook and always runs the final norm and the
262k-word unembedding (~70% of Gemma 3 270M's forward time). :func:`collect` hooks only the
requested ``blocks.{l}.hook_resid_post`` points and raises the bridge's own ``StopAtLayerException``
after the deepest one, so the rest of the network and the unembedding never run.

Batches are right-padded: with a causal mask, real tokens never see the padding and keep their
positions, so results do not depend on batch size or padding. Examples are sorted by length inside
each shard to waste little compute on padding, and put back in order before they are stored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentlab.arch import decoder_blocks
from latentlab.data import Example, as_examples, render_prompt
from latentlab.errors import LatentlabError
from latentlab.io import ensure_writable_dir, load_tensors, read_json, save_tensors, write_json
from latentlab.models import LoadedModel
from latentlab.progress import progress as progress_bar

Position = Literal["last", "mean", "all", "prompt_last", "response_mean"]
POSITIONS: tuple[str, ...] = ("last", "mean", "all", "prompt_last", "response_mean")


def resid_hook_name(layer: int) -> str:
    """Hook name of the residual stream after block ``layer`` (TransformerLens convention)."""
    return f"blocks.{layer}.hook_resid_post"


# --------------------------------------------------------------------------------------------
# Tokenisation shared by every stage.
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of a list of examples, with where each prompt ends."""

    ids: list[list[int]]
    prompt_lens: list[int | None]
    bos_first: bool  # True when every sequence starts with a BOS token (excluded from 'mean')


def encode(model: LoadedModel, examples: Sequence[Example]) -> Encoded:
    """Tokenise examples the same way everywhere (BOS once, prompt boundary known)."""
    return encode_with(model.tokenizer, examples)


def encode_with(tok: Any, examples: Sequence[Example]) -> Encoded:
    """:func:`encode` for a bare tokenizer (training runs on the HF model, without a bridge)."""
    bos = getattr(tok, "bos_token", None)

    def ids_of(text: str) -> list[int]:
        special = not (bos and text.startswith(bos))  # chat templates already write the BOS
        return list(tok(text, add_special_tokens=special)["input_ids"])

    ids, plens = [], []
    for ex in examples:
        full = ids_of(ex.text)
        if not full:
            raise LatentlabError("an example tokenises to nothing (empty text?)", "remove empty examples")
        if ex.prompt is None:
            plens.append(None)
        else:
            p = ids_of(ex.prompt)
            n = 0  # longest common prefix: robust to a merge across the boundary
            while n < min(len(p), len(full)) and p[n] == full[n]:
                n += 1
            plens.append(max(1, n))
        ids.append(full)
    bos_id = getattr(tok, "bos_token_id", None)
    bos_first = bos_id is not None and all(s[0] == bos_id for s in ids)
    return Encoded(ids, plens, bos_first)


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Right-pad token lists into (ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(model: LoadedModel) -> int:
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


# --------------------------------------------------------------------------------------------
# The forward pass that stops early.
# --------------------------------------------------------------------------------------------


def hook_points(model: LoadedModel) -> dict[str, Any]:
    """The bridge's hook points by name, computed once per model.

    Why not ``bridge.run_with_hooks``: it rebuilds the whole alias-resolved ``hook_dict`` once per
    hook it adds (measured: a fifth of collect's time on gemma-3-270m with 18 hooks), for hooks that
    are plain forward hooks on ``HookPoint`` modules.
    """
    points = getattr(model.bridge, "_latentlab_hook_points", None)
    if points is None:
        points = dict(model.bridge.hook_dict)
        model.bridge._latentlab_hook_points = points
    return points


@contextlib.contextmanager
def attached(model: LoadedModel, hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
    """Attach ``(hook name, fn(tensor, hook))`` pairs as forward hooks for the ``with`` block, exactly
    as TransformerLens' ``HookPoint.add_hook`` does (the hook's return value replaces the output)."""
    points = hook_points(model)
    handles = []
    try:
        for name, fn in hooks:
            if name not in points:
                raise LatentlabError(f"the model has no hook point {name!r}", "report this model")
            hp = points[name]

            def full(_m: Any, _inp: Any, out: Any, fn: Callable[..., Any] = fn, hp: Any = hp) -> Any:
                return fn(out, hook=hp)

            handles.append(hp.register_forward_hook(full))
        yield
    finally:
        for h in handles:
            h.remove()


def run_resid(
    model: LoadedModel,
    ids: Int[Tensor, "batch seq"],
    mask: Int[Tensor, "batch seq"],
    layers: Sequence[int],
    extra_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> dict[int, Float[Tensor, "batch seq d_model"]]:
    """Residual stream after each of ``layers``; the forward stops after the deepest one."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    store: dict[int, Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int) -> Callable[..., Any]:
        def hook(t: Tensor, hook: Any) -> Tensor:
            store[layer] = t.detach()
            if layer == deepest:
                raise StopAtLayerException(t)
            return t

        return hook

    hooks = [*extra_hooks, *((resid_hook_name(layer), make_hook(layer)) for layer in layers)]
    with torch.inference_mode(), model.forward_context(), attached(model, hooks):
        try:
            model.bridge(ids, attention_mask=mask, return_type=None, use_cache=False)
        except StopAtLayerException:
            pass
    missing = [layer for layer in layers if layer not in store]
    if missing:  # pragma: no cover - would mean the bridge renamed its hooks
        raise RuntimeError(f"hooks for layers {missing} never fired")
    return store


def _pool(
    hs: Sequence[Float[Tensor, "batch seq d"]],
    lengths: Tensor,
    prompt_lens: Sequence[int | None],
    position: str,
    start: int,
) -> Float[Tensor, "batch n_layers d"] | list[Float[Tensor, "seq n_layers d"]]:
    """Reduce each layer's [batch, seq, d] to one row per example, all layers at once.

    Vectorised over the batch (a gather for single positions, a masked mean for spans): per-example
    Python loops here cost several percent of a forward pass on a small model.
    """
    h = torch.stack(list(hs), dim=2)  # [batch, seq, n_layers, d]
    b, s = h.shape[0], h.shape[1]
    n = lengths.to(h.device)
    if position == "all":
        return [h[i, : int(lengths[i])] for i in range(b)]
    pl = torch.tensor([p if p is not None else int(lengths[i]) for i, p in enumerate(prompt_lens)], device=h.device)
    if position in ("last", "prompt_last"):
        idx = (n if position == "last" else pl) - 1
        return h[torch.arange(b, device=h.device), idx]
    lo = torch.minimum(torch.full_like(n, start), n - 1) if position == "mean" else torch.minimum(pl, n - 1)
    pos = torch.arange(s, device=h.device)[None, :]
    w = ((pos >= lo[:, None]) & (pos < n[:, None])).to(h.dtype)  # [batch, seq]
    return torch.einsum("bs,bsld->bld", w, h) / w.sum(1)[:, None, None]


# --------------------------------------------------------------------------------------------
# ActivationSet: the typed result.
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationSet:
    """Activations of N examples at chosen layers and one position rule.

    ``acts`` is ``[n_examples, n_layers, d_model]`` for pooled positions, and
    ``[n_tokens, n_layers, d_model]`` for ``position='all'`` with ``offsets`` marking where each
    example's tokens start (``offsets[i]:offsets[i+1]``).
    """

    acts: Float[Tensor, "rows n_layers d_model"]
    layers: list[int]
    position: str
    offsets: Int[Tensor, " n_plus_1"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else self.acts.shape[0]

    @property
    def d_model(self) -> int:
        return self.acts.shape[-1]

    def layer(self, layer: int) -> Float[Tensor, "rows d_model"]:
        """Activations at one model layer (by model layer index, not column)."""
        if layer not in self.layers:
            raise LatentlabError(f"layer {layer} was not collected (have {self.layers})", "collect it with --layers")
        return self.acts[:, self.layers.index(layer)]

    def example(self, i: int) -> Float[Tensor, "... n_layers d_model"]:
        if self.offsets is None:
            return self.acts[i]
        return self.acts[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def save(self, folder: str | Path) -> Path:
        """Write as one shard + ``activations.json`` (same layout :func:`collect` streams)."""
        folder = ensure_writable_dir(folder)
        stale = folder / "activations.json"
        if stale.exists():
            stale.unlink()  # else a crash mid-save leaves an old index over a new shard 0
        tensors = {"acts": self.acts}
        if self.offsets is not None:
            tensors["offsets"] = self.offsets
        save_tensors(folder / "shard-00000", tensors, {"rows": len(self)})
        write_json(folder / "activations.json", {**self.meta, "layers": self.layers, "position": self.position,
                                                 "n_examples": len(self), "shards": ["shard-00000"]})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ActivationSet:
        """Load a saved or streamed set (all shards concatenated)."""
        folder = Path(folder)
        index = folder / "activations.json"
        if not index.exists():
            raise LatentlabError(
                f"{folder} holds no whole activation set (no activations.json: missing or interrupted)",
                "re-run `latentlab collect`",
            )
        meta = read_json(index)
        chunks, offs, base = [], [torch.zeros(1, dtype=torch.long)], 0
        for name in meta["shards"]:
            t, _ = load_tensors(folder / name)
            chunks.append(t["acts"])
            if "offsets" in t:
                offs.append(t["offsets"][1:] + base)
                base += int(t["offsets"][-1])
        offsets = torch.cat(offs) if len(offs) > 1 else None
        layers, position = meta.pop("layers"), meta.pop("position")
        return cls(torch.cat(chunks), layers, position, offsets, meta)


# --------------------------------------------------------------------------------------------
# collect()
# --------------------------------------------------------------------------------------------


@overload
def collect(
    model: LoadedModel,
    data: Any,
    layers: Sequence[int] | str | None = "all",
    position: Position = "last",
    batch_size: int = 16,
    out: str | Path | None = None,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    load: Literal[True] = True,
) -> ActivationSet: ...


@overload
def collect(
    model: LoadedModel,
    data: Any,
    layers: Sequence[int] | str | None = "all",
    position: Position = "last",
    batch_size: int = 16,
    out: str | Path | None = None,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    *,
    load: Literal[False],
) -> None: ...


def collect(
    model: LoadedModel,
    data: Any,
    layers: Sequence[int] | str | None = "all",
    position: Position = "last",
    batch_size: int = 16,
    out: str | Path | None = None,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    load: bool = True,
) -> ActivationSet | None:
    """Residual-stream activations of ``data`` at ``layers`` and ``position``.

    ``data``: strings, :class:`Example` s, chats, or a JSONL path / built-in dataset name.
    ``position``: ``last`` token, ``mean`` over tokens (BOS excluded), ``all`` tokens,
    ``prompt_last`` (last prompt token) or ``response_mean`` (mean over the response) for chat data.
    With ``out``, shards of ``shard_size`` examples stream to disk as they are done, so memory
    does not grow with the dataset; the set is complete only once ``activations.json`` exists.
    ``load=False`` (with ``out``) returns None instead of reading the shards back into memory.
    """
    if position not in POSITIONS:
        raise LatentlabError(f"unknown position {position!r}", f"use one of {', '.join(POSITIONS)}")
    if batch_size < 1:
        raise LatentlabError(f"batch size must be >= 1, got {batch_size}", "pass --batch-size 1 or more")
    layer_list = model.check_layers(layers)
    examples = as_examples(data, model.tokenizer)
    enc = encode(model, examples)
    if position in ("response_mean",) and any(p is None for p in enc.prompt_lens):
        raise LatentlabError(
            f"position {position!r} needs chat or prompt/completion data (these examples have no response)",
            "use --position last or mean for plain text",
        )
    start = 1 if enc.bos_first else 0
    pad = pad_id_of(model)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        ensure_writable_dir(out_dir)  # a clear error, not an OSError traceback, for a bad --out
        stale = out_dir / "activations.json"
        if stale.exists():
            stale.unlink()  # the index goes last; without it, a half-rewritten folder is never read
    n = len(examples)
    total_tokens = sum(len(s) for s in enc.ids)
    bar = progress_bar(total=total_tokens, desc=f"collect {model.info.name}", unit="tok", disable=not progress)
    t0 = time.time()
    shard_names: list[str] = []
    kept: list[Tensor] = []
    kept_offsets: list[Tensor] = []
    for s_idx, s0 in enumerate(range(0, n, shard_size)):
        idx = list(range(s0, min(n, s0 + shard_size)))
        order = sorted(idx, key=lambda i: len(enc.ids[i]))
        rows: dict[int, Tensor] = {}
        for b0 in range(0, len(order), batch_size):
            batch = order[b0 : b0 + batch_size]
            ids, mask = pad_batch([enc.ids[i] for i in batch], pad, model.device)
            hs = run_resid(model, ids, mask, layer_list)
            lengths = mask.sum(1).cpu()
            plens = [enc.prompt_lens[i] for i in batch]
            pooled = _pool([hs[layer] for layer in layer_list], lengths, plens, position, start)
            if isinstance(pooled, list):
                for j, i in enumerate(batch):
                    rows[i] = pooled[j].to("cpu", dtype)
            else:
                pooled = pooled.to("cpu", dtype)
                for j, i in enumerate(batch):
                    rows[i] = pooled[j]
            bar.update(int(lengths.sum()))
        ordered = [rows[i] for i in idx]
        if position == "all":
            acts = torch.cat(ordered)
            offsets = torch.tensor([0, *torch.cumsum(torch.tensor([r.shape[0] for r in ordered]), 0).tolist()])
        else:
            acts, offsets = torch.stack(ordered), None
        if out_dir is not None:
            name = f"shard-{s_idx:05d}"
            tensors = {"acts": acts} | ({"offsets": offsets} if offsets is not None else {})
            save_tensors(out_dir / name, tensors, {"rows": len(idx), "first": s0})
            shard_names.append(name)
        else:
            kept.append(acts)
            if offsets is not None:
                kept_offsets.append(offsets)
    bar.close()
    seconds = time.time() - t0
    info = {
        "model": model.info.name,
        "base_fingerprint": model.info.base_fingerprint,
        "adapter": model.info.adapter,
        "adapter_fingerprint": model.info.adapter_fingerprint,
        "d_model": model.d_model,
        "n_examples": n,
        "n_tokens": total_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total_tokens / max(seconds, 1e-9), 1),
        "dtype": str(dtype).replace("torch.", ""),
        **(meta or {}),
    }
    if out_dir is not None:
        write_json(out_dir / "activations.json", {**info, "layers": layer_list, "position": position,
                                                  "shards": shard_names})
        return ActivationSet.load(out_dir) if load else None
    if position == "all":
        offs, base = [torch.zeros(1, dtype=torch.long)], 0
        for o in kept_offsets:
            offs.append(o[1:] + base)
            base += int(o[-1])
        return ActivationSet(torch.cat(kept), layer_list, position, torch.cat(offs), info)
    return ActivationSet(torch.cat(kept), layer_list, position, None, info)


def last_token_acts(
    model: LoadedModel,
    prompts: Sequence[str],
    layers: Sequence[int] | str | None = "all",
    progress: bool = False,
    batch_size: int = 16,
) -> Float[Tensor, "n n_layers d_model"]:
    """Residual stream at the last prompt token, each prompt rendered for this model (chat template
    for instruct models, ``Q: ...\\nA:`` for base ones): how shift, SAE shift and monitoring read
    unrelated prompts. The forward stops after the deepest requested layer."""
    rendered = [render_prompt(p, model.tokenizer) for p in prompts]
    return collect(model, rendered, layers, "last", batch_size=batch_size, progress=progress).acts


def hf_last_token_acts(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    device: torch.device,
    batch_size: int = 16,
) -> Float[Tensor, "n n_layers d_model"]:
    """Last-token residual stream after every block of a plain (or peft) HF model, no bridge.

    Why a second entry point: a model being trained is a peft model, not a bridge, and the
    finetune monitor must read it between steps. Same tokenisation, padding and positions as
    :func:`collect`; the decoder blocks' outputs equal the bridge's ``hook_resid_post`` (tested).
    """
    blocks = decoder_blocks(hf_model)
    enc = encode_with(tokenizer, [Example(t) for t in texts])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for b0 in range(0, len(texts), batch_size):
        seqs = enc.ids[b0 : b0 + batch_size]
        ids, mask = pad_batch(seqs, pad, device)
        store: dict[int, Tensor] = {}

        def make(i: int, store: dict[int, Tensor] = store) -> Callable[..., None]:
            def hook(_m: Any, _a: Any, output: Any) -> None:
                store[i] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        handles = [block.register_forward_hook(make(i)) for i, block in enumerate(blocks)]
        try:
            with torch.inference_mode():
                hf_model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        pooled = _pool([store[i] for i in range(len(blocks))], mask.sum(1).cpu(), [None] * len(seqs), "last", 0)
        out.append(pooled.float().cpu())  # type: ignore[union-attr]
    return torch.cat(out)

