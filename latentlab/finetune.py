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
from safetensors.torch import load_file
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
from latentlab.progress import progress as progress_bar
from latentlab.stages.finetune import DEFAULT_MONITOR_PROMPTS, FinetuneConfig, LoraOptions

__all__ = ["IGNORE", "FinetuneConfig", "FinetuneResult", "LoraOptions", "LoraTrainer", "finetune", "latest_checkpoint"]

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


class LoraTrainer:
    """One LoRA training run: the peft model, its AdamW optimiser, the tokenised chats, and where the run stands.

    Building one does everything that can fail before training (the chats, the base model, the LoRA
    targets, the interventions' layers and widths), so nothing is written until it exists. The rows of
    a step are a function of (seed, epoch) and its dropout masks of (seed, step): a run resumed from a
    checkpoint (:meth:`resume`) replays exactly the steps an uninterrupted one would have taken.
    """

    def __init__(
        self,
        model: str,
        chats: Sequence[Chat],
        settings: FinetuneConfig,
        interventions: dict[str, Direction] | None = None,
        *,
        out: str | Path,
        monitor: dict[str, Direction] | None = None,
        monitor_prompts: Sequence[str] | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        if not chats:
            raise LatentlabError("the finetuning dataset is empty", "pass at least one chat")
        self.settings, self.out, self.progress = settings, Path(out), progress
        self.checkpoints = self.out / "checkpoints"
        self.device = resolve_device(device)
        self.name, hf, self.tokenizer, self.base_fingerprint = _load_base(model, self.device, dtype, progress)
        torch.manual_seed(settings.seed)  # the LoRA init
        self.model = _peft_model(hf, settings).to(self.device)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.rows = _tokenise(chats, self.tokenizer, settings.max_length)
        self.data_hash = sha256_text(json.dumps(self.rows))[:16]  # what is trained on, as the model sees it
        self.steps_per_epoch = math.ceil(len(self.rows) / settings.batch_size)
        self.total = self.steps_per_epoch * settings.epochs
        if settings.max_steps is not None:
            self.total = min(self.total, settings.max_steps)
        self.monitor = monitor or {}
        self.monitor_prompts = list(monitor_prompts or [])
        if self.monitor and not self.monitor_prompts:
            self.monitor_prompts = load_prompts("unrelated")[:DEFAULT_MONITOR_PROMPTS]
        self.hooks = _training_hooks(self.model, settings, interventions or {})
        self.global_step, self.losses = 0, []
        self.resumed_from: Path | None = None
        self.history: dict[str, Any] = {"steps": [], "projections": {k: [] for k in self.monitor}}

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``, which must have been trained with these settings, data and base."""
        from peft import set_peft_model_state_dict

        state = read_json(checkpoint / "trainer_state.json")
        for same, problem, fix in (
            (state["config"] == self.settings.training_record(), "with another config", "the same options"),
            (state.get("data_hash", self.data_hash) == self.data_hash, "on other data", "the same --data"),
            (state.get("base_fingerprint", self.base_fingerprint) == self.base_fingerprint,
             "on another base model", "the same --model"),
        ):
            if not same:
                raise LatentlabError(f"{checkpoint} was trained {problem}", f"resume with {fix}, or use a new --out")
        set_peft_model_state_dict(self.model, load_file(str(checkpoint / "adapter" / "adapter_model.safetensors")))
        _load_optimizer(self.optimizer, *load_tensors(checkpoint / "optimizer"))
        self.global_step, self.losses, self.history = state["step"], state["losses"], state["monitor"]
        self.resumed_from = checkpoint

    def batch(self, step: int) -> list[tuple[list[int], list[int]]]:
        """The rows of ``step``: its epoch's order is a function of (seed, epoch) alone."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = _epoch_order(len(self.rows), self.settings.seed, epoch)
        size = self.settings.batch_size
        return [self.rows[i] for i in order[k * size : (k + 1) * size]]

    def step(self, batch: list[tuple[list[int], list[int]]]) -> float:
        """One optimiser step on ``batch`` (with the interventions on, for this forward only); its loss."""
        ids, mask = pad_batch([ids for ids, _ in batch], self.pad, self.device)
        labels = torch.full_like(ids, IGNORE)
        for j, (_, lab) in enumerate(batch):
            labels[j, : len(lab)] = torch.tensor(lab, device=self.device)
        # dropout masks as a pure function of (seed, step), so a resumed run draws the same ones
        torch.manual_seed(self.settings.seed * 1_000_003 + self.global_step)
        with self.hooks():  # monitor and saved adapter never see them
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        if not torch.isfinite(loss):
            raise LatentlabError(
                f"loss became {loss.item()} at step {self.global_step}", "lower --lr; finished checkpoints are kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.global_step += 1
        self.losses.append(float(loss.item()))
        return self.losses[-1]

    def observe(self) -> None:
        """Record each monitor direction's mean projection of the monitor prompts (last token, its layers)."""
        if not self.monitor:
            return
        self.model.eval()
        tok = self.tokenizer
        h = hf_last_token_acts(self.model, tok, [render_prompt(p, tok) for p in self.monitor_prompts], self.device)
        self.history["steps"].append(self.global_step)
        for key, d in self.monitor.items():
            self.history["projections"][key].append((h[:, d.layers] * d.units()).sum(-1).mean(0).tolist())
        self.model.train()

    def checkpoint(self, path: Path) -> Path:
        """A complete checkpoint at ``path``: adapter, AdamW state, then the trainer state (written last,
        so its presence means the rest is whole), in a temporary folder renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".step-tmp-", dir=path.parent))
        record = self.settings.training_record()
        self.model.save_pretrained(str(tmp / "adapter"))
        write_json(tmp / "adapter" / "latentlab_adapter.json",
                   {"base": self.name, "base_fingerprint": self.base_fingerprint, "config": record,
                    "step": self.global_step})
        save_tensors(tmp / "optimizer", *_optimizer_tensors(self.optimizer))
        write_json(tmp / "trainer_state.json",
                   {"step": self.global_step, "total_steps": self.total, "losses": self.losses, "config": record,
                    "data_hash": self.data_hash, "base_fingerprint": self.base_fingerprint, "monitor": self.history})
        replace_dir(tmp, path)
        return path

    def fit(self, stop_after: int | None = None) -> FinetuneResult:
        """Train to the last step, checkpointing every ``checkpoint_every`` steps and at the end; then
        ``out/adapter`` (the last checkpoint's) and ``out/losses.json``. ``stop_after``: raise
        ``KeyboardInterrupt`` after that many steps, as Ctrl-C would."""
        if self.resumed_from is None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)  # a fresh run must not mix with an older one's
            self.observe()  # step 0: the base
        t0 = time.time()
        self.model.train()
        bar = progress_bar(total=self.total, initial=self.global_step, desc=f"finetune {self.name}", unit="step",
                           disable=not self.progress)
        try:
            while self.global_step < self.total:
                loss = self.step(self.batch(self.global_step))
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", epoch=(self.global_step - 1) // self.steps_per_epoch + 1)
                if self.global_step % self.settings.checkpoint_every == 0 or self.global_step == self.total:
                    self.observe()
                    self.checkpoint(self.checkpoints / f"step-{self.global_step:06d}")
                if stop_after is not None and stop_after <= self.global_step < self.total:
                    raise KeyboardInterrupt(f"stopped after {self.global_step} steps (stop_after)")
        finally:
            bar.close()
        return self._finish(time.time() - t0)

    def _finish(self, seconds: float) -> FinetuneResult:
        final = latest_checkpoint(self.out)
        assert final is not None
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=self.out))
        shutil.copytree(final / "adapter", tmp, dirs_exist_ok=True)
        replace_dir(tmp, self.out / "adapter")
        write_json(self.out / "losses.json",
                   {"losses": self.losses, "steps_per_epoch": self.steps_per_epoch, "monitor": self.history})
        return FinetuneResult(self.out / "adapter", self.losses, self.history, seconds, self.steps_per_epoch)


def _load_base(
    model: str, device: torch.device, dtype: str | torch.dtype | None, progress: bool
) -> tuple[str, Any, Any, str]:
    """(name, HF model, tokenizer, weights fingerprint) of the base model, loaded on ``device``."""
    name, source, fingerprint = resolve_source(model, progress)
    hf, tok = load_hf(source, resolve_dtype(dtype, device), trust_remote_code=False, device=device)
    if fingerprint is None:
        fingerprint = fingerprint_weights(source) if isinstance(source, Path) else str(source)
    return name, hf, tok, fingerprint


def _peft_model(hf: Any, settings: LoraOptions) -> Any:
    """``hf`` with fresh LoRA adapters on the settings' target modules (checked against the model first)."""
    from peft import LoraConfig, get_peft_model

    arch.check_lora_targets(hf, settings.target_modules)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        fan_in_fan_out=arch.lora_fan_in_fan_out(hf),  # GPT-2's Conv1D stores weights (in, out)
        task_type="CAUSAL_LM",
    )
    return get_peft_model(hf, lora, autocast_adapter_dtype=True)


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
    checkpoint. ``stop_after``: stop after that many steps (as an interruption would); ``resume=True``
    continues from the newest complete checkpoint. ``directions``: the fitted directions
    ``config.ablate`` / ``config.steer`` name (by their spec string's direction part); a spec naming a
    saved ``.safetensors`` file is loaded here. ``on_start``: called once every check has passed,
    before anything is written into ``out`` (the run manifest goes there).
    """
    chats = list(load_chats(data) if isinstance(data, (str, Path)) else data)
    trainer = LoraTrainer(model, chats, config or FinetuneConfig(), directions, out=out, monitor=monitor,
                          monitor_prompts=monitor_prompts, device=device, dtype=dtype, progress=progress)
    if resume:
        ck = latest_checkpoint(trainer.out)
        if ck is None and trainer.checkpoints.exists():
            raise LatentlabError(f"no complete checkpoint under {trainer.checkpoints}", "start again without --resume")
        if ck is not None:
            trainer.resume(ck)
    if on_start is not None:
        on_start()
    return trainer.fit(stop_after)


def _training_hooks(pm: torch.nn.Module, cfg: FinetuneConfig, given: dict[str, Direction]) -> Callable[[], Any]:
    """A factory of the ``with`` context that applies ``cfg.ablate`` / ``cfg.steer`` to one training
    forward (a no-op context without them); layers and widths are checked here, before any step."""
    specs = cfg.interventions()
    if not specs:
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

    ablate = [(direction_of(sp.direction), sp.layers) for sp in specs if sp.kind == "ablate"]
    steer = [(direction_of(sp.direction), sp.coeff, sp.layers) for sp in specs if sp.kind == "steer"]
    model = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    with training_hooks(model, ablate=ablate, steer=steer):
        pass  # checks layers and widths now, before the first step

    def ctx() -> Any:
        return training_hooks(model, ablate=ablate, steer=steer)

    return ctx
