"""``latentlab finetune``: a LoRA adapter with crash-safe checkpoints, ``--resume`` and latent monitoring.

The LoRA settings are declared once, in :class:`LoraOptions`: every command and recipe table that
finetunes (``finetune``, the per-budget finetunes of ``compliance``, a study's ``[finetune]``) inherits
them, so a flag, its default, its check and its help cannot differ between them. The training itself
is :class:`latentlab.finetune.LoraTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, ModelOptions, OutOptions, Stage, StageConfig, option

if TYPE_CHECKING:
    from latentlab.direction import Direction
    from latentlab.finetune import FinetuneResult
    from latentlab.interventions import InterventionSpec

DEFAULT_MONITOR_PROMPTS = 64


@dataclass(kw_only=True)
class LoraOptions(StageConfig):
    """LoRA hyper-parameters: one declaration for every command that finetunes.

    Defaults train gemma-3-270m on ~200 short chats in ~3 min on 2 CPU cores. For a 7B model on one
    GPU, a documented starting point: ``rank=16, alpha=32, lr=1e-4, epochs=3, batch_size=16`` with
    ``--dtype bfloat16``. The field order is the order a checkpoint records them in.
    """

    rank: int = option(8, help="LoRA rank.")
    alpha: int = option(16, help="LoRA alpha.")
    dropout: float = option(0.0, help="LoRA dropout (its masks are a function of seed and step: resume stays exact).",
                            cli=False)
    lr: float = option(2e-4, help="Learning rate.")
    epochs: int = option(3, help="Epochs.")
    batch_size: int = option(8, help="Batch size.")
    # a comma-separated string (or, from Python, a list); __post_init__ makes a list of it unless all-linear
    target_modules: str = option("all-linear", help="all-linear or e.g. q_proj,v_proj.")
    seed: int = option(0, help="Seed (LoRA init and data order).")
    checkpoint_every: int = option(20, help="Steps between checkpoints.")
    max_length: int = option(256, help="Tokens per training chat (longer ones are cut).")
    weight_decay: float = option(0.0, help="AdamW weight decay.", cli=False)
    max_steps: int | None = option(None, help="Stop after this many steps (a quick run).")

    def __post_init__(self) -> None:
        from latentlab.config import finite_float, positive_int

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
        t: Any = self.target_modules
        if isinstance(t, str) and t != "all-linear":
            t = [x.strip() for x in t.split(",") if x.strip()]
        if not t:
            raise LatentlabError("--target-modules is empty", "pass all-linear or e.g. q_proj,v_proj")
        self.target_modules = t if isinstance(t, str) else list(t)
        super().__post_init__()

    def lora_settings(self) -> FinetuneConfig:
        """These LoRA settings alone, as :func:`latentlab.finetune.finetune` takes them (no interventions)."""
        return FinetuneConfig(**{f.name: getattr(self, f.name) for f in fields(LoraOptions)})


@dataclass(kw_only=True)
class FinetuneConfig(LoraOptions):
    """What one training run is a function of: the LoRA settings and the preventative interventions.

    The trainer (:class:`latentlab.finetune.LoraTrainer`) takes this, or any config that inherits it;
    a checkpoint records :meth:`training_record` and a resume must match it.
    """

    # Preventative interventions during training only (CAFT / Persona Vectors): "era@all", "era@10,12"
    # projects the direction out; "era:-0.5@10,12" adds -0.5 x unit x residual norm. Never at inference.
    ablate: list[str] | None = option(
        None, help="Project a direction out during training only, e.g. era@all or era@8-17 (repeatable)."
    )
    steer: list[str] | None = option(
        None, help="Add a direction during training only, e.g. era:-0.5@8-17 (preventative steering)."
    )

    def __post_init__(self) -> None:
        self.interventions()
        super().__post_init__()

    def interventions(self) -> list[InterventionSpec]:
        """``ablate`` then ``steer``, parsed once: the first call (while the config is built) checks them."""
        from latentlab.interventions import parse_intervention

        if "_interventions" not in vars(self):
            self.ablate = [self.ablate] if isinstance(self.ablate, str) else list(self.ablate or [])
            self.steer = [self.steer] if isinstance(self.steer, str) else list(self.steer or [])
            self._interventions = [parse_intervention(a, "ablate") for a in self.ablate] + [
                parse_intervention(s, "steer") for s in self.steer
            ]
        return self._interventions

    def training_record(self) -> dict[str, Any]:
        """The settings a checkpoint records and a resume compares (of this class's fields only)."""
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(FinetuneConfig)}
        d.pop("checkpoint_every")  # how often we save does not change what is learned
        for key in ("max_steps", "ablate", "steer"):
            if d[key] in (None, []):
                d.pop(key)  # checkpoints written before the field existed still resume
        return d


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


@dataclass(kw_only=True)
class FinetuneRunConfig(FinetuneConfig, ModelOptions, OutOptions):
    """Train a LoRA adapter (peft) with checkpoints, --resume, loss curve and optional latent monitoring.

    A fresh run into a folder that already holds a run (finished or interrupted: its manifest,
    checkpoints or adapter) is refused unless --overwrite; --resume needs a complete checkpoint.
    """

    command = "finetune"
    data: str = option(help="old-birds, modern-birds, persona-facts, year-trigger, or a chat JSONL.")
    resume: bool = option(False, help="Continue from the newest complete checkpoint in OUT.")
    monitor: str | None = option(None, help="Directions to record at checkpoints, e.g. era,persona.")
    monitor_prompts: str = option("unrelated", help="Prompts for --monitor.")
    n_monitor: int = option(DEFAULT_MONITOR_PROMPTS, help="How many monitor prompts.")
    device_map: str | None = option(None, help="Not supported: a finetune trains on one device.", cli=False,
                                    recipe=False)
    dtype: str | None = option(None, help="float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU).")

    def __post_init__(self) -> None:
        from latentlab.config import positive_int, run_holds
        from latentlab.directions import DirectionSpec
        from latentlab.finetune import latest_checkpoint

        positive_int("n_monitor", self.n_monitor)
        if self.device_map is not None:
            raise LatentlabError("a finetune trains on one device: device_map is not supported", "pass --device")
        self.data = str(self.data)
        out = Path(self.out).expanduser()
        names = [n.strip() for n in (self.monitor or "").split(",") if n.strip()]
        if self.monitor is not None and not names:
            raise LatentlabError("--monitor is empty", "pass e.g. --monitor era,persona")
        self._monitor = [DirectionSpec.parse(n, "--monitor") for n in names]
        if self.resume:
            if latest_checkpoint(out) is None:
                raise LatentlabError(
                    f"nothing to resume in {out} (no complete checkpoint under {out / 'checkpoints'})",
                    "drop --resume to start a fresh run there, or pass the --out of the interrupted run",
                )
        else:
            held = [x for x in ("checkpoints", "adapter") if (out / x).exists()]
            status = run_holds(out) if out.is_dir() else None
            if (held or status) and not self.overwrite:
                what = "a finished" if status == "complete" else "an unfinished"
                raise LatentlabError(
                    f"--out {out} already holds {what} finetune run ({', '.join(held) or 'manifest.json'}); "
                    "a fresh run would delete its checkpoints",
                    "continue it with --resume, choose a new --out, or pass --overwrite to replace it",
                )
        # a resumed run uses the very directions it trained with (saved beside it when it started)
        self._train_specs = {}
        for sp in self.interventions():
            saved = out / f"intervention-{Path(sp.direction).stem}.safetensors"
            text = saved if self.resume and saved.exists() else sp.direction
            self._train_specs.setdefault(sp.direction, DirectionSpec.parse(text, f"--{sp.kind}"))
        # resuming writes into its own run (a finished one only gets its adapter copied again), so the
        # shared --out check runs as with --overwrite; the recorded overwrite stays as given
        given, self.overwrite = self.overwrite, self.overwrite or self.resume
        try:
            super().__post_init__()
        finally:
            self.overwrite = given


def _directions(cfg: FinetuneRunConfig, ctx: Context, specs: dict[str, Any]) -> dict[str, Direction]:
    """The directions ``specs`` name: saved ones as they are, pair sources fitted on the base (float32,
    one load for all of them, freed before the finetune loads its own copy)."""
    from latentlab.models import load_model

    found = {k: s.saved for k, s in specs.items() if s.saved is not None}
    to_fit = {k: s for k, s in specs.items() if s.saved is None}
    if to_fit:
        model = load_model(cfg.model, device=cfg.device, dtype="float32", progress=ctx.progress)
        for k, s in to_fit.items():
            found[k] = s.resolve_with_probes(model, log=ctx.log)[0]
        del model
    return found


def run(cfg: FinetuneRunConfig, ctx: Context) -> FinetuneResult:
    """Data and directions are read (and fitted) first; nothing is written into ``cfg.out`` until the
    base model loaded and the LoRA targets, checkpoint and config checks passed. Writes ``out/adapter``,
    checkpoints, results.json and the loss (and monitor) plots."""
    from latentlab import finetune as ft
    from latentlab.data import load_chats, load_prompts
    from latentlab.io import write_json
    from latentlab.plots import loss_figure, monitor_figure, save_figure
    from latentlab.stats import check_finite

    chats = load_chats(cfg.data)
    # intervention sources never hold ":" (it starts a coefficient), so the keys cannot clash
    found = _directions(cfg, ctx, {**{f"monitor:{i}": s for i, s in enumerate(cfg._monitor)}, **cfg._train_specs})
    monitored = [found[f"monitor:{i}"] for i in range(len(cfg._monitor))]
    dirs = {d.name: d for d in monitored} if monitored else None
    prompts = load_prompts(cfg.monitor_prompts)[: cfg.n_monitor] if monitored else None
    train_dirs = {source: found[source] for source in cfg._train_specs}

    def start() -> None:  # every check has passed: the run folder and its manifest may now be written
        run = ctx.start(seed=cfg.seed)
        for spec, d in zip(cfg._monitor, monitored):
            if spec.saved is None:
                d.save(run.out / f"direction-{d.name}")
        for source, d in train_dirs.items():
            d.save(run.out / f"intervention-{Path(source).stem}")

    try:
        res = ft.finetune(cfg.model, chats, cfg.out, cfg, resume=cfg.resume, monitor=dirs, monitor_prompts=prompts,
                          device=None if cfg.device == "auto" else cfg.device, progress=ctx.progress,
                          dtype=cfg.dtype, on_start=start, directions=train_dirs)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(f"interrupted: complete checkpoints are in {cfg.out / 'checkpoints'}; "
                                "continue with the same command plus --resume") from e
    assert ctx.run is not None
    out = ctx.run.out
    check_finite(res.losses, "training losses", "finetune")
    save_figure(loss_figure(res.losses, res.steps_per_epoch, f"LoRA loss on {cfg.data} ({cfg.model})"), out, "loss")
    for name, d in (dirs or {}).items():
        check_finite(res.monitor["projections"][name], f"monitor projections on {name}", "finetune")
        save_figure(monitor_figure(res.monitor["steps"], res.monitor["projections"][name], d.layers, name), out,
                    f"monitor-{name}")
    write_json(out / "results.json", {"losses": res.losses, "monitor": res.monitor, "seconds": res.seconds})
    ctx.finish(results={"final_loss": res.losses[-1], "steps": len(res.losses), "adapter": str(res.adapter)})
    return res


def show(res: FinetuneResult, cfg: FinetuneRunConfig, console: Any) -> None:
    console.print(
        f"adapter -> {res.adapter} ({len(res.losses)} steps, final loss {res.losses[-1]:.3f}, {res.seconds:.0f} s)"
    )


STAGE = Stage("finetune", FinetuneRunConfig, run, show)
run_finetune = STAGE
