"""LoRA finetuning (peft) with crash-safe checkpoints, exact resume, and latent monitoring.

Why a small loop of our own instead of ``transformers.Trainer``: Trainer checkpoints pickle the
optimizer and RNG state, and latentlab never pickles. Here a checkpoint is the adapter
(safetensors), the AdamW state (safetensors) and a JSON state file, written to a temporary folder
and renamed. The data order of every epoch is a pure function of (seed, epoch), so ``resume``
replays exactly the batches an uninterrupted run would have seen: same adapter, bit for bit on CPU.

Only the response tokens are trained on (the prompt is masked), as in the bird-name experiments.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentlab import arch
from latentlab.activations import encode_with, hf_last_token_acts, pad_batch
from latentlab.data import Chat, load_chats, load_prompts, render_chat, render_prompt
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.interventions import training_hooks
from latentlab.io import (
    fingerprint_weights,
    load_tensors,
    read_json,
    replace_dir,
    save_tensors,
    sha256_text,
    write_json,
)
from latentlab.models import load_hf, resolve_device, resolve_dtype, resolve_source
from latentlab.stages.finetune import DEFAULT_MONITOR_PROMPTS, FinetuneConfig, LoraOptions

__all__ = ["IGNORE", "FinetuneConfig", "FinetuneResult", "LoraOptions", "finetune", "latest_checkpoint"]

IGNORE = -100


@dataclass
class FinetuneResult:
    adapter: Path
    losses: list[float]
    monitor: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    steps_per_epoch: int = 0  # for plots.loss_figure


def _tokenise(chats: Sequence[Chat], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per chat; prompt tokens are masked with -100."""
    examples = [render_chat(c, tokenizer) for c in chats]
    enc = encode_with(tokenizer, examples)
    eos = tokenizer.eos_token_id
    out = []
    for ids, plen in zip(enc.ids, enc.prompt_lens):
        ids = list(ids)
        if not getattr(tokenizer, "chat_template", None) and eos is not None and ids[-1] != eos:
            ids.append(eos)  # base models: learn to stop after the answer
        ids = ids[:max_length]
        plen = min(plen or 0, len(ids) - 1)
        labels = [IGNORE] * plen + ids[plen:]
        out.append((ids, labels))
    return out


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{pid}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def latest_checkpoint(out: Path) -> Path | None:
    """The newest *complete* checkpoint (its state file is written last, inside an atomic rename)."""
    ckdir = out / "checkpoints"
    if not ckdir.exists():
        return None
    done = [p for p in ckdir.iterdir() if p.name.startswith("step-") and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def finetune(
    model: str,
    data: str | Path | Sequence[Chat],
    out: str | Path,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    monitor: dict[str, Direction] | None = None,
    monitor_prompts: Sequence[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    dtype: str | torch.dtype | None = None,
    on_start: Callable[[], None] | None = None,
    directions: dict[str, Direction] | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on chats; writes ``out/adapter`` (+ checkpoints, losses, monitor data).

    ``monitor``: directions whose projection of ``monitor_prompts`` (last prompt token, every layer;
    default: the first 64 built-in unrelated prompts) is recorded before training and at every
    checkpoint. ``stop_after``: stop after that many steps
    (as an interruption would); ``resume=True`` continues from the newest complete checkpoint.
    ``directions``: the fitted directions ``config.ablate`` / ``config.steer`` name (by their spec
    string's direction part); a spec naming a saved ``.safetensors`` file is loaded here.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from latentlab.progress import progress as progress_bar

    cfg = config or FinetuneConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chats = list(load_chats(data) if isinstance(data, (str, Path)) else data)
    if not chats:
        raise LatentlabError("the finetuning dataset is empty", "pass at least one chat")
    dev = resolve_device(device)
    name, source, base_fp = resolve_source(model, progress)
    dt = resolve_dtype(dtype, dev)
    hf, tok = load_hf(source, dt, trust_remote_code=False, device=dev)
    if base_fp is None:
        base_fp = fingerprint_weights(source) if isinstance(source, Path) else str(source)
    torch.manual_seed(cfg.seed)
    targets = cfg.target_modules or arch.default_lora_targets(hf)
    if isinstance(targets, str) and targets != "all-linear" and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    arch.check_lora_targets(hf, targets)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=arch.lora_fan_in_fan_out(hf),  # GPT-2's Conv1D stores weights (in, out)
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(hf, lora, autocast_adapter_dtype=True).to(dev)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = _tokenise(chats, tok, cfg.max_length)
    data_hash = sha256_text(json.dumps(rows))[:16]  # what is trained on, as the model sees it
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        if cfg.max_steps < 1:
            raise LatentlabError(f"max_steps must be >= 1, got {cfg.max_steps}", "pass a positive --max-steps")
        total = min(total, cfg.max_steps)
    if monitor and not monitor_prompts:
        monitor_prompts = load_prompts("unrelated")[:DEFAULT_MONITOR_PROMPTS]
    step, losses = 0, []
    mon: dict[str, Any] = {"steps": [], "projections": {k: [] for k in (monitor or {})}}
    ck = latest_checkpoint(out) if resume else None
    if resume and ck is None and (out / "checkpoints").exists():
        raise LatentlabError(f"no complete checkpoint under {out}/checkpoints", "start again without --resume")
    if ck is not None:
        state = read_json(ck / "trainer_state.json")
        if state["config"] != cfg.training_record():
            raise LatentlabError(
                f"{ck} was trained with another config", "resume with the same options, or use a new --out"
            )
        if state.get("data_hash", data_hash) != data_hash:
            raise LatentlabError(f"{ck} was trained on other data", "resume with the same --data, or use a new --out")
        if state.get("base_fingerprint", base_fp) != base_fp:
            raise LatentlabError(
                f"{ck} was trained on another base model", "resume with the same --model, or use a new --out"
            )
        from safetensors.torch import load_file

        set_peft_model_state_dict(pm, load_file(str(ck / "adapter" / "adapter_model.safetensors")))
        t, meta = load_tensors(ck / "optimizer")
        _load_optimizer(opt, t, meta)
        step, losses, mon = state["step"], state["losses"], state["monitor"]
    if on_start is not None:
        on_start()  # every check has passed: the caller may now write into ``out`` (run manifest)
    if ck is None and (out / "checkpoints").exists() and not resume:
        shutil.rmtree(out / "checkpoints")  # a fresh run must not mix with an older one's checkpoints

    def record_monitor() -> None:
        if not monitor or not monitor_prompts:
            return
        pm.eval()
        h = hf_last_token_acts(pm, tok, [render_prompt(p, tok) for p in monitor_prompts], dev)
        mon["steps"].append(step)
        for key, d in monitor.items():
            units = d.units()  # [layers in d, d_model]
            mon["projections"][key].append((h[:, d.layers] * units).sum(-1).mean(0).tolist())
        pm.train()

    def save_checkpoint() -> None:
        ckroot = out / "checkpoints"
        ckroot.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".step-tmp-", dir=ckroot))
        pm.save_pretrained(str(tmp / "adapter"))
        write_json(
            tmp / "adapter" / "latentlab_adapter.json",
            {"base": name, "base_fingerprint": base_fp, "config": cfg.training_record(), "step": step},
        )
        t, meta = _optimizer_tensors(opt)
        save_tensors(tmp / "optimizer", t, meta)
        write_json(
            tmp / "trainer_state.json",
            {
                "step": step,
                "total_steps": total,
                "losses": losses,
                "config": cfg.training_record(),
                "data_hash": data_hash,
                "base_fingerprint": base_fp,
                "monitor": mon,
            },
        )
        replace_dir(tmp, ckroot / f"step-{step:06d}")

    if step == 0:
        record_monitor()
    train_hooks = _training_hooks(pm, cfg, directions or {})
    t0 = time.time()
    pm.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = progress_bar(total=total, initial=step, desc=f"finetune {name}", unit="step", disable=not progress)
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = _epoch_order(len(rows), cfg.seed, epoch)
        batch = [rows[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        ids, mask = pad_batch([b[0] for b in batch], pad, dev)
        labels = torch.full_like(ids, IGNORE)
        for j, (_, lab) in enumerate(batch):
            labels[j, : len(lab)] = torch.tensor(lab, device=dev)
        # dropout masks as a pure function of (seed, step), so a resumed run draws the same ones
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        with train_hooks():  # only the training forward: monitor and saved adapter never see them
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        if not torch.isfinite(loss):
            raise LatentlabError(
                f"loss became {loss.item()} at step {step}", "lower --lr; finished checkpoints are kept"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.item()))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
        if step % cfg.checkpoint_every == 0 or step == total:
            record_monitor()
            save_checkpoint()
        if stop_after is not None and step >= stop_after and step < total:
            bar.close()
            raise KeyboardInterrupt(f"stopped after {step} steps (stop_after)")
    bar.close()
    final = latest_checkpoint(out)
    assert final is not None
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
    shutil.copytree(final / "adapter", tmp, dirs_exist_ok=True)
    replace_dir(tmp, out / "adapter")
    write_json(out / "losses.json", {"losses": losses, "steps_per_epoch": steps_per_epoch, "monitor": mon})
    return FinetuneResult(out / "adapter", losses, mon, time.time() - t0, steps_per_epoch)


def _training_hooks(pm: torch.nn.Module, cfg: FinetuneConfig, given: dict[str, Direction]) -> Callable[[], Any]:
    """A factory of the ``with`` context that applies ``cfg.ablate`` / ``cfg.steer`` to one training
    forward (a no-op context without them)."""
    if not cfg.ablate and not cfg.steer:
        return contextlib.nullcontext

    def direction_of(source: str) -> Direction:
        if source in given:
            return given[source]
        if Path(source).suffix == ".safetensors":
            return Direction.load(source)
        raise LatentlabError(
            f"the {source!r} direction for --ablate/--steer was not fitted",
            "pass directions={...} to finetune(), or use run_finetune / the CLI, which fit it on the base",
        )

    specs = cfg.interventions()
    ablate = [(direction_of(sp.direction), sp.layers) for sp in specs if sp.kind == "ablate"]
    steer = [(direction_of(sp.direction), sp.coeff, sp.layers) for sp in specs if sp.kind == "steer"]
    model = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    with training_hooks(model, ablate=ablate, steer=steer):
        pass  # checks layers and widths now, before the first step

    def ctx() -> Any:
        return training_hooks(model, ablate=ablate, steer=steer)

    return ctx
