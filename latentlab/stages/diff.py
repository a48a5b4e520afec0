"""``latentlab diff``: what a finetune changed on unrelated prompts (logit lens of its mean shift, per-token KL).

The model diffing itself is :mod:`latentlab.diff` (why the shift is read through the reference's mean
activation, why the KL is streamed); this stage checks the adapters and prompts before the base loads,
switches each finetune's LoRA on the one loaded base, and writes results.json and diff.html.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetunedOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.diff import DiffResult


@dataclass(kw_only=True)
class DiffConfig(FinetunedOptions, OutOptions):
    """What a finetune changed on unrelated prompts: the logit lens of its mean shift per layer (vs base and vs a
    control) and per-token KL(base || finetune).
    """

    command = "diff"
    out: Path = option(Path("runs/diff"), help="Run folder to write.")
    prompts: str = option("unrelated", help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")
    layers: str = option("all", help="Layers for the logit lens: all, or e.g. 8-17.")
    k: int = option(10, help="Tokens / positions to report.")
    batch_size: int = option(16, help="Prompts per forward pass.", cli=False)

    def __post_init__(self) -> None:
        from latentlab.ablation import check_same_base
        from latentlab.config import check_layer_spec
        from latentlab.data import load_prompts
        from latentlab.models import resolve_adapter

        if self.k < 1:
            raise LatentlabError(f"--k {self.k} tokens to report", "pass --k 1 or more")
        check_layer_spec(str(self.layers))
        ft = resolve_adapter(Path(self.finetuned))
        if self.control is not None:
            check_same_base(ft, resolve_adapter(Path(self.control)))
        self._prompts = load_prompts(self.prompts)
        if not self._prompts:
            raise LatentlabError(f"{self.prompts} holds no prompts", "pass --prompts with at least one prompt")
        super().__post_init__()


def run(cfg: DiffConfig, ctx: Context) -> DiffResult:
    """Adapters and prompts were read by the config; the layers are checked before ``cfg.out`` is touched."""
    from latentlab.diff import STAGE, diff_html, diff_models
    from latentlab.io import write_json, write_text
    from latentlab.models import resolve_adapter

    base = ctx.load("base")
    layers = base.check_layers(cfg.layers)
    ft = base.with_adapter(cfg.finetuned, label=f"{STAGE}:finetuned:{resolve_adapter(cfg.finetuned).resolve()}",
                           scale=cfg.scales()[0])
    ctx.record("finetuned", ft)
    ctrl = None
    if cfg.control is not None:
        ctrl = base.with_adapter(cfg.control, label=f"{STAGE}:control:{resolve_adapter(cfg.control).resolve()}",
                                 scale=cfg.scales()[0])
        ctx.record("control", ctrl)
    run = ctx.start()
    res = diff_models(base, ft, cfg._prompts, control=ctrl, layers=layers, k=cfg.k, batch_size=cfg.batch_size,
                      progress=ctx.progress)
    write_json(run.out / "results.json", res.to_dict())
    write_text(run.out / "diff.html", diff_html(res))
    ctx.finish(results={"kl_mean": {k: v["mean"] for k, v in res.kl.items()}})
    return res


def show(res: DiffResult, cfg: DiffConfig, console: Any) -> None:
    from rich.table import Table

    table = Table(title="logit lens of the mean shift at the last prompt token (top promoted / suppressed)")
    table.add_column("layer", justify="right")
    for label in res.logit_lens:
        table.add_column(f"{label}: promoted")
        table.add_column("suppressed")
    for i, layer in enumerate(res.layers):
        cells = []
        for rows in res.logit_lens.values():
            cells += [" ".join(repr(r["token"]) for r in rows[i]["promoted"][:5]),
                      " ".join(repr(r["token"]) for r in rows[i]["suppressed"][:5])]
        table.add_row(str(layer), *cells)
    console.print(table)
    for label, kl in res.kl.items():
        top = kl["top_positions"][0] if kl["top_positions"] else None
        where = f"; highest at {top['context']!r} ({top['kl']:.3g})" if top else ""
        console.print(f"KL({kl['reference']} || {kl['model']}) [{label}]: mean {kl['mean']:.4g} nats per "
                      f"token, last prompt token {kl['last_position_mean']:.4g}{where}")
    console.print(f"results.json and diff.html in {cfg.out}")


STAGE = Stage("diff", DiffConfig, run, show)
run_diff = STAGE
