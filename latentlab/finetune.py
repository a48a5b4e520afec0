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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentlab import arch
from latentlab.activations import encode_with, hf_last_token_acts, pad_batch
from latentlab.data import Chat, load_chats, load_prompts, render_chat, render_prompt
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.interventions import parse_intervention, training_hooks
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

IGNORE = -100


DEFAULT_MONITOR_PROMPTS = 64


@dataclass
class FinetuneConfig:
    """LoRA hyper-parameters. Defaults train gemma-3-270m on ~200 short chats in ~3 min on 2 CPU cores.

    For a 7B model on one GPU, a documented starting point: ``rank=16, alpha=32, lr=1e-4, epochs=3,
    batch_size=16`` with ``--dtype bfloat16``.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 2e-4
    epochs: int = 3
    batch_size: int = 8
    target_modules: list[str] | str = "all-linear"
    seed: int = 0
    checkpoint_every: int = 20
    max_length: int = 256
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop after this many steps (a quick demo run); None: all epochs
    # Preventative interventions during training only (CAFT / Persona Vectors): "era@all", "era@10,12"
    # projects the direction out; "era:-0.5@10,12" adds -0.5 x unit x residual norm. Never at inference.
    ablate: list[str] = field(default_factory=list)
    steer: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from latentlab.ablation import parse_intervention
        from latentlab.config import finite_float, positive_int

        self.ablate = [self.ablate] if isinstance(self.ablate, str) else list(self.ablate)
        self.steer = [self.steer] if isinstance(self.steer, str) else list(self.steer)
        for spec in self.ablate:
            parse_intervention(spec, "ablate")
        for spec in self.steer:
            parse_intervention(spec, "steer")

        for name in ("rank", "alpha", "epochs", "batch_size", "checkpoint_every", "max_length"):
            positive_int(name, getattr(self, name))
        if self.max_steps is not None:
            positive_int("max_steps", self.max_steps)
        if finite_float("lr", self.lr) <= 0:
            raise LatentlabError(f"--lr must be > 0, got {self.lr}", "pass a positive --lr, e.g. 2e-4")
        if not 0.0 <= finite_float("dropout", self.dropout) < 1.0:
            raise LatentlabError(f"dropout must be in [0, 1), got {self.dropout}", "pass a dropout between 0 and 1")
        if finite_float("weight_decay", self.weight_decay) < 0:
            raise LatentlabError(f"weight_decay must be >= 0, got {self.weight_decay}", "pass 0 or more")
        t = self.target_modules
        if isinstance(t, str) and t != "all-linear":
            t = [x.strip() for x in t.split(",") if x.strip()]
        if not t:
            raise LatentlabError("--target-modules is empty", "pass all-linear or e.g. q_proj,v_proj")
        self.target_modules = t if isinstance(t, str) else list(t)


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
        if state["config"] != _cfg_dict(cfg):
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
            {"base": name, "base_fingerprint": base_fp, "config": _cfg_dict(cfg), "step": step},
        )
        t, meta = _optimizer_tensors(opt)
        save_tensors(tmp / "optimizer", t, meta)
        write_json(
            tmp / "trainer_state.json",
            {
                "step": step,
                "total_steps": total,
                "losses": losses,
                "config": _cfg_dict(cfg),
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


def _cfg_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("checkpoint_every")  # how often we save does not change what is learned
    for key in ("max_steps", "ablate", "steer"):
        if d[key] in (None, []):
            d.pop(key)  # checkpoints written before the field existed still resume
    return d


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

    ablate = [(direction_of(sp.direction), sp.layers) for sp in (parse_intervention(a, "ablate") for a in cfg.ablate)]
    steer = [
        (direction_of(sp.direction), sp.coeff, sp.layers) for sp in (parse_intervention(x, "steer") for x in cfg.steer)
    ]
    model = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    with training_hooks(model, ablate=ablate, steer=steer):
        pass  # checks layers and widths now, before the first step

    def ctx() -> Any:
        return training_hooks(model, ablate=ablate, steer=steer)

    return ctx


# --------------------------------------------------------------------------------------------
# latentlab finetune: config -> run folder.
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneRunConfig:
    """What ``latentlab finetune`` takes: data, base model and run folder around the LoRA
    hyper-parameters (``finetune``, a :class:`FinetuneConfig`). Validated on construction, recorded
    whole in the manifest.

    A fresh run into a folder that already holds a run (finished or interrupted: its manifest,
    checkpoints or adapter) is refused unless ``overwrite``; ``resume`` needs a complete checkpoint.
    """

    data: str
    out: Path
    model: str = "gemma-3-270m"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resume: bool = False
    monitor: str | None = None
    monitor_prompts: str = "unrelated"
    n_monitor: int = DEFAULT_MONITOR_PROMPTS
    device: str = "auto"
    dtype: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from latentlab.config import check_device_dtype, check_out, positive_int, run_holds

        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        positive_int("n_monitor", self.n_monitor)
        check_device_dtype(self.device, self.dtype)
        self.data = str(self.data)
        out = Path(self.out).expanduser()
        if self.monitor is not None and not [n for n in self.monitor.split(",") if n.strip()]:
            raise LatentlabError("--monitor is empty", "pass e.g. --monitor era,persona")
        if self.resume:
            if latest_checkpoint(out) is None:
                raise LatentlabError(
                    f"nothing to resume in {out} (no complete checkpoint under {out / 'checkpoints'})",
                    "drop --resume to start a fresh run there, or pass the --out of the interrupted run",
                )
            self.out = check_out(out, overwrite=True)  # resuming a finished run only re-copies its adapter
            return
        held = [x for x in ("checkpoints", "adapter") if (out / x).exists()]
        status = run_holds(out) if out.is_dir() else None
        if (held or status) and not self.overwrite:
            what = "a finished" if status == "complete" else "an unfinished"
            raise LatentlabError(
                f"--out {out} already holds {what} finetune run ({', '.join(held) or 'manifest.json'}); "
                "a fresh run would delete its checkpoints",
                "continue it with --resume, choose a new --out, or pass --overwrite to replace it",
            )
        self.out = check_out(out, self.overwrite, "finetune")  # refuses files latentlab did not write


def run_finetune(config: FinetuneRunConfig, command: str | None = None, progress: bool = True) -> FinetuneResult:
    """``latentlab finetune``: data and monitor directions are read first; nothing is written into
    ``config.out`` until the base model loaded and the LoRA targets, checkpoint and config checks passed.
    Writes ``out/adapter``, checkpoints, results.json and the loss (and monitor) plots."""
    from latentlab.data import load_prompts
    from latentlab.directions import direction_spec, fit_or_use
    from latentlab.plots import loss_figure, monitor_figure, save_figure
    from latentlab.runs import Run
    from latentlab.stats import check_finite

    cfg = config
    chats = load_chats(cfg.data)
    dirs: dict[str, Direction] | None = None
    fitted: list[Direction] = []
    prompts = None
    if cfg.monitor:
        specs = [direction_spec(name.strip()) for name in cfg.monitor.split(",") if name.strip()]
        prompts = load_prompts(cfg.monitor_prompts)[: cfg.n_monitor]
        model = None
        found = []
        for spec in specs:
            if isinstance(spec, Direction):
                found.append(spec.validate())
                continue
            if model is None:
                from latentlab.models import load_model

                model = load_model(cfg.model, device=cfg.device, dtype="float32", progress=progress)
            d, _ = fit_or_use(model, spec)
            fitted.append(d)
            found.append(d)
        del model
        dirs = {d.name: d for d in found}
    from latentlab.ablation import parse_intervention

    needed = [parse_intervention(x, "ablate").direction for x in cfg.finetune.ablate]
    needed += [parse_intervention(x, "steer").direction for x in cfg.finetune.steer]
    train_dirs: dict[str, Direction] = {}
    to_fit = []
    for source in dict.fromkeys(needed):
        saved = Path(cfg.out) / f"intervention-{Path(source).stem}.safetensors"
        if cfg.resume and saved.exists():
            train_dirs[source] = Direction.load(saved)  # a resumed run uses the very same direction
        else:
            spec = direction_spec(source)
            if isinstance(spec, Direction):
                train_dirs[source] = spec.validate()
            else:
                to_fit.append((source, spec))
    if to_fit:
        from latentlab.models import load_model

        model = load_model(cfg.model, device=cfg.device, dtype="float32", progress=progress)
        for source, spec in to_fit:
            train_dirs[source] = fit_or_use(model, spec)[0]
        del model
    holder: dict[str, Run] = {}

    def start() -> None:
        from dataclasses import asdict

        run = Run.start(cfg.out, command or "latentlab.run_finetune", asdict(cfg), seed=cfg.finetune.seed)
        for d in fitted:
            d.save(run.out / f"direction-{d.name}")
        for source, d in train_dirs.items():
            d.save(run.out / f"intervention-{Path(source).stem}")
        holder["run"] = run

    res = finetune(
        cfg.model,
        chats,
        cfg.out,
        cfg.finetune,
        resume=cfg.resume,
        monitor=dirs,
        monitor_prompts=prompts,
        device=None if cfg.device == "auto" else cfg.device,
        progress=progress,
        dtype=cfg.dtype,
        on_start=start,
        directions=train_dirs,
    )
    run = holder["run"]
    check_finite(res.losses, "training losses", "finetune")
    spe = res.steps_per_epoch or -(-len(chats) // cfg.finetune.batch_size)
    save_figure(loss_figure(res.losses, spe, f"LoRA loss on {cfg.data} ({cfg.model})"), run.out, "loss")
    for name, d in (dirs or {}).items():
        check_finite(res.monitor["projections"][name], f"monitor projections on {name}", "finetune")
        save_figure(
            monitor_figure(res.monitor["steps"], res.monitor["projections"][name], d.layers, name),
            run.out,
            f"monitor-{name}",
        )
    write_json(run.out / "results.json", {"losses": res.losses, "monitor": res.monitor, "seconds": res.seconds})
    run.finish(results={"final_loss": res.losses[-1], "steps": len(res.losses), "adapter": str(res.adapter)})
    return res
