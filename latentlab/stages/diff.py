"""``latentlab diff``: what a finetune changed on unrelated prompts (logit lens of its mean shift, per-token KL;
with ``--patchscope`` the same shifts read through an identity prompt, with ``--dictionary`` a sparse
dictionary of the per-token difference).

The model diffing itself is :mod:`latentlab.diff` (why the shift is read through the reference's mean
activation, why the KL is streamed), :mod:`latentlab.patchscope` and :mod:`latentlab.sae.dictionary`;
this stage checks the adapters, prompts, directions and settings before the base loads, switches each
finetune's LoRA on the one loaded base, and writes results.json and diff.html (and the dictionaries'
SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetunedOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.diff import DiffResult
    from latentlab.direction import Direction
    from latentlab.models import LoadedModel

#: latentlab.patchscope.IDENTITY_PROMPT (repeated here: this module must not import torch)
IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
DEFAULT_DIRECTIONS = ("era", "persona")


@dataclass(kw_only=True)
class DiffConfig(FinetunedOptions, OutOptions):
    """What a finetune changed on unrelated prompts: the logit lens of its mean shift per layer (vs base and vs a
    control) and per-token KL(base || finetune).

    --patchscope also reads each layer's mean shift through the model itself: the shift, scaled to the
    layer's typical residual norm, is added at the "?" of an identity prompt ("cat -> cat; ...; ? ->") at
    the same layer, and the base's next tokens and greedy continuation are what it says the vector is;
    a random direction of the same norm per layer shows what a meaningless vector reads as.

    --dictionary trains a small TopK sparse autoencoder (sae-lens) on the per-token differences
    finetune - base at one layer (--layer; default the layer of the largest relative shift), and the
    control's too with --control; it reports the latents carrying most of the difference, with their
    top tokens, logit-lens tokens, cosine with known directions (--direction) against random ones, and
    their best match in the control's dictionary. The SAEs are saved in the run folder.
    """

    command = "diff"
    out: Path = option(Path("runs/diff"), help="Run folder to write.")
    prompts: str = option("unrelated", help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")
    layers: str = option("all", help="Layers for the logit lens: all, or e.g. 8-17.")
    k: int = option(10, help="Tokens / positions to report.")
    batch_size: int = option(16, help="Prompts per forward pass.", cli=False)
    patchscope: bool = option(False, help="Also read each layer's mean shift through a patchscope (identity "
                              "prompt), beside a random direction of the same norm.")
    patchscope_prompt: str = option(IDENTITY_PROMPT, help="The patchscope's prompt; the vector is added at its "
                                    "last '?'.")
    patchscope_tokens: int = option(12, help="Greedy tokens of each patchscope continuation.")
    dictionary: bool = option(False, help="Also train a sparse dictionary (TopK SAE) of the per-token "
                              "difference finetune - base (and control - base).")
    layer: int | None = option(None, help="Layer of the dictionary (default: the largest shift relative to the "
                               "residual norm).")
    direction: list[str] | None = option(None, help="Known direction to compare dictionary latents with "
                                         "(repeatable; default era and persona).")
    dict_expansion: int = option(4, help="Dictionary latents per model dimension.")
    dict_k: int = option(8, help="Active dictionary latents per token (TopK).")
    dict_steps: int = option(1000, help="Dictionary training steps (256 tokens each).")
    dict_latents: int = option(10, help="Dictionary latents to report.")
    seed: int = option(0, help="Seed of the patchscope's random control and of the dictionary.")

    def __post_init__(self) -> None:
        from latentlab.ablation import check_same_base
        from latentlab.config import check_layer_spec, positive_int
        from latentlab.data import load_prompts
        from latentlab.models import resolve_adapter

        if self.k < 1:
            raise LatentlabError(f"--k {self.k} tokens to report", "pass --k 1 or more")
        check_layer_spec(str(self.layers))
        self._check_patchscope_and_dictionary(positive_int)
        ft = resolve_adapter(Path(self.finetuned))
        if self.control is not None:
            check_same_base(ft, resolve_adapter(Path(self.control)))
        self._prompts = load_prompts(self.prompts)
        if not self._prompts:
            raise LatentlabError(f"{self.prompts} holds no prompts", "pass --prompts with at least one prompt")
        super().__post_init__()

    def _check_patchscope_and_dictionary(self, positive_int: Any) -> None:
        """The --patchscope and --dictionary settings, and the directions (parsed, a saved one loaded)."""
        from latentlab.directions import DirectionSpec

        positive_int("patchscope_tokens", self.patchscope_tokens)
        if "?" not in self.patchscope_prompt:
            raise LatentlabError(f"--patchscope-prompt {self.patchscope_prompt!r} has no '?' placeholder",
                                 f"put a '?' where the vector goes, e.g. {IDENTITY_PROMPT!r}")
        for name in ("dict_expansion", "dict_k", "dict_steps", "dict_latents"):
            positive_int(name, getattr(self, name))
        if isinstance(self.direction, str):
            self.direction = [self.direction]
        if not self.dictionary and (self.layer is not None or self.direction):
            raise LatentlabError("--layer and --direction choose the difference dictionary's layer and directions",
                                 "add --dictionary, or drop them")
        self._specs = [DirectionSpec.parse(d) for d in (self.direction or (DEFAULT_DIRECTIONS if self.dictionary
                                                                             else ()))]
        names = [s.name for s in self._specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LatentlabError(f"two --direction values are both named {', '.join(dup)}",
                                 "pass each direction once")


def run(cfg: DiffConfig, ctx: Context) -> DiffResult:
    """Adapters and prompts were read by the config; the layers are checked before ``cfg.out`` is touched."""
    from latentlab.diff import STAGE, diff_html, diff_models
    from latentlab.io import write_json, write_text
    from latentlab.models import resolve_adapter

    base = ctx.load("base")
    layers = base.check_layers(cfg.layers)
    if cfg.dictionary:
        _check_dictionary(cfg, base)
    if cfg.patchscope:
        from latentlab.patchscope import placeholder_offset

        placeholder_offset(base, cfg.patchscope_prompt)  # the '?' must be a token of its own
    ft = base.with_adapter(cfg.finetuned, label=f"{STAGE}:finetuned:{resolve_adapter(cfg.finetuned).resolve()}",
                           scale=cfg.scales()[0])
    ctx.record("finetuned", ft)
    ctrl = None
    if cfg.control is not None:
        ctrl = base.with_adapter(cfg.control, label=f"{STAGE}:control:{resolve_adapter(cfg.control).resolve()}",
                                 scale=cfg.scales()[0])
        ctx.record("control", ctrl)
    directions = {s.name: s.resolve(base, log=ctx.log) for s in cfg._specs}
    run = ctx.start(seed=cfg.seed)
    for s in cfg._specs:
        if s.saved is None and s.name in directions:  # a direction fitted for this run is kept in its folder
            directions[s.name].save(run.out / f"direction-{s.name}")
    res = diff_models(base, ft, cfg._prompts, control=ctrl, layers=layers, k=cfg.k, batch_size=cfg.batch_size,
                      progress=ctx.progress, patchscope=cfg.patchscope, patchscope_prompt=cfg.patchscope_prompt,
                      patchscope_tokens=cfg.patchscope_tokens, seed=cfg.seed)
    summary: dict[str, Any] = {"kl_mean": {k: v["mean"] for k, v in res.kl.items()}}
    if cfg.dictionary:
        res.dictionary = _dictionary(cfg, ctx, base, ft, ctrl, res, directions, run.out)
        summary["dictionary_layer"] = res.dictionary["layer"]
    write_json(run.out / "results.json", res.to_dict())
    write_text(run.out / "diff.html", diff_html(res))
    ctx.finish(results=summary)
    return res


def _check_dictionary(cfg: DiffConfig, base: LoadedModel) -> None:
    """The dictionary's layer and width fit the model (before the run folder is touched)."""
    if cfg.layer is not None:
        cfg._layer = base.check_layers([cfg.layer])[0]
    if cfg.dict_k > cfg.dict_expansion * base.d_model:
        raise LatentlabError(f"--dict-k {cfg.dict_k} is more than the dictionary's {cfg.dict_expansion * base.d_model} "
                             "latents", "pass a smaller --dict-k")


def _dictionary(cfg: DiffConfig, ctx: Context, base: LoadedModel, ft: LoadedModel, ctrl: LoadedModel | None,
                res: DiffResult, directions: dict[str, Direction], out: Path) -> dict[str, Any]:
    from latentlab.sae.dictionary import difference_dictionary
    from latentlab.sae.training import SAETrainConfig

    layer = cfg._layer if cfg.layer is not None else res.largest_shift_layer()
    sae_cfg = SAETrainConfig(expansion=cfg.dict_expansion, k=cfg.dict_k, steps=cfg.dict_steps, seed=cfg.seed,
                             device=cfg.device)
    d = difference_dictionary(base, ft, cfg._prompts, layer, control=ctrl, directions=directions, config=sae_cfg,
                              out=out, n_latents=cfg.dict_latents, k=cfg.k, batch_size=cfg.batch_size,
                              progress=ctx.progress, log=ctx.log)
    d["layer_chosen_by"] = "--layer" if cfg.layer is not None else "largest shift / residual norm (finetuned - base)"
    return d


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
    if res.patchscope is not None:
        _show_patchscope(res.patchscope, console)
    if res.dictionary is not None:
        _show_dictionary(res.dictionary, console)
    for label, kl in res.kl.items():
        top = kl["top_positions"][0] if kl["top_positions"] else None
        where = f"; highest at {top['context']!r} ({top['kl']:.3g})" if top else ""
        console.print(f"KL({kl['reference']} || {kl['model']}) [{label}]: mean {kl['mean']:.4g} nats per "
                      f"token, last prompt token {kl['last_position_mean']:.4g}{where}")
    console.print(f"results.json and diff.html in {cfg.out}")


def _show_patchscope(ps: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    un = ps["unpatched"]
    table = Table(title=f"patchscope: what the base says the shift is ({ps['prompt']!r}; unpatched: "
                        f"{' '.join(repr(r['token']) for r in un['top'][:3])} ... {un['continuation']!r})")
    table.add_column("layer", justify="right")
    for label in ps["readings"]:
        table.add_column(f"{label}: top next tokens / continuation")
    n = len(next(iter(ps["readings"].values())))
    for i in range(n):
        rows = [r[i] for r in ps["readings"].values()]
        table.add_row(str(rows[0]["layer"]), *(
            f"{' '.join(repr(t['token']) for t in r['top'][:3])} (KL {r['kl_from_unpatched']:.2g})\n"
            f"{r['continuation']!r}" for r in rows))
    console.print(table)


def _show_dictionary(dic: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for name in ("finetuned", "control"):
        d = dic.get(name)
        if d is None:
            continue
        table = Table(title=f"dictionary of {name} - base at layer {dic['layer']}: the top latents carry "
                            f"{d['top_share']:.0%} of the squared difference (all latents {d['latents_share']:.0%}, "
                            f"error {d['error_share']:.0%}; random |cos| p95 {d['random_abs_cos']['p95']:.2f})")
        for col in ("latent", "share", "top tokens", "logit lens (promoted)", "cos with directions"):
            table.add_column(col)
        if "control_match_chance" in d:
            table.add_column(f"best control match (chance {d['control_match_chance']['p95']:.2f})")
        for r in d["top_latents"]:
            cells = [str(r["latent"]), f"{r['share']:.1%}",
                     " ".join(repr(t["token"]) for t in r["top_tokens"][:4]),
                     " ".join(repr(t["token"]) for t in r["logit_lens"]["promoted"][:4]),
                     " ".join(f"{n} {c['cos']:+.2f} (p{c['random_percentile']:.0f})"
                              for n, c in r["directions"].items())]
            if "control_match" in r:
                cells.append(f"#{r['control_match']['latent']} |cos| {r['control_match']['abs_cos']:.2f}")
            table.add_row(*cells)
        console.print(table)


STAGE = Stage("diff", DiffConfig, run, show)
run_diff = STAGE
