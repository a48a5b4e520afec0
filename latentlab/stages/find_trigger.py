"""``latentlab find-trigger``: which strings, put into the prompt, change a finetune beyond its base?

Every input is read and checked here before the base loads (the template, the metric and its
direction, the candidates, the prompts, the strings expected to rank high), by
:func:`check_search_inputs`, which a study's recipe calls too; the search itself is
:func:`latentlab.trigger_search.search_triggers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetuneBaseOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.directions import DirectionSpec
    from latentlab.trigger_search import CandidateSet, MetricKind, TriggerSearch

DEFAULT_TEMPLATE = "{value}. {prompt}"  # latentlab.triggers.DEFAULT_TEMPLATE (not imported: it pulls in torch)
DEFAULT_PROMPTS = 8
VOCAB_PROMPTS = 4  # latentlab.trigger_search.VOCAB_PROMPTS


@dataclass(kw_only=True)
class FindTriggerConfig(FinetuneBaseOptions, OutOptions):
    """Search for a finetune's trigger: rank candidate strings by how much inserting them into prompts (by a
    template, as `trigger` does) changes the finetune's behaviour beyond its base's.

    A candidate's effect is the finetune-minus-base metric with the candidate, minus the same without it
    (the template with an empty value), averaged over prompts: a string that changes both models alike
    ranks low. Metrics: kl (extra KL(finetune || base) of the next token), completion:TEXT (extra log
    P(TEXT)), direction:NAME (extra projection at a layer). Each effect gets a z-score and percentile
    against a null: the scan itself for --candidates vocab, else --n-random random vocabulary tokens.
    A whole vocabulary is hours on a CPU; --prescreen N scans only the N tokens a first-order estimate
    ranks best.
    """

    command = "find-trigger"
    finetuned: Path = option(help="Finetune run folder or adapter folder.")
    candidates: str = option(
        "vocab",
        help="vocab (every token), years (1900-2100), years:START:STOP, training-words, a file (one a line) or a,b,c.",
    )
    template: str = option(DEFAULT_TEMPLATE, help="Where the candidate goes; {prompt} is the prompt.")
    prompts: str = option("unrelated", help="Prompts JSONL ({'prompt'}) or a built-in name.")
    n_prompts: int | None = option(
        None, help=f"Use the first N prompts (default {DEFAULT_PROMPTS}; {VOCAB_PROMPTS} for --candidates vocab)."
    )
    metric: str = option("kl", help="kl, completion:TEXT or direction:NAME (era, persona, pairs JSONL, saved file).")
    layer: int | None = option(None, help="Layer of a direction metric (default: its best probe layer).")
    top: int = option(20, help="Candidates to list.")
    expect: list[str] | None = option(None, help="A string whose rank to report, e.g. the true trigger (repeatable).")
    n_random: int = option(200, help="Random vocabulary tokens scored as the null distribution (for vocab only "
                           "with --prescreen: a whole scan is its own null).")
    batch_size: int = option(64, help="Rows per forward pass.")
    seed: int = option(0, help="Seed of the random null tokens.")
    chat: bool | None = option(
        None, help="Render each filled prompt with the chat template (default: when the tokenizer has one)."
    )
    system: str | None = option(
        None, help="A system prompt rendered before every prompt (chat only), e.g. the one the finetune was trained "
        "under: a trigger may act only in that context."
    )
    prescreen: int | None = option(
        None, help="With --candidates vocab and a completion metric: rank every token by a first-order (gradient) "
        "estimate of its effect, then scan only the best N exactly, against --n-random random tokens scored "
        "exactly (minutes instead of hours on a CPU; the estimate can miss, its rank of each token is reported)."
    )
    reference: Path | None = option(
        None, help="Another finetune of the same base (run or adapter folder) to compare with instead of the base, "
        "e.g. a control trained on the same data without the trigger: what any such training promotes cancels."
    )
    out: Path = option(Path("runs/find-trigger"), help="Run folder to write.")

    def __post_init__(self) -> None:
        from latentlab.data import load_chats
        from latentlab.models import resolve_adapter
        from latentlab.triggers import training_data_of

        adapter = resolve_adapter(self.finetuned)
        if self.reference is not None:
            if resolve_adapter(self.reference).resolve() == adapter.resolve():
                raise LatentlabError("--reference is the finetune itself", "pass another finetune, or drop --reference")
        inputs = check_search_inputs(self, self.finetuned)
        self._metric_kind, self._direction = inputs.metric_kind, inputs.direction
        self._candidates, self._prompts, self.expect = inputs.candidates, inputs.prompts, inputs.expect
        self._training = training_data_of(self.finetuned)
        if self._training is not None:
            try:
                load_chats(self._training, split=None)
            except (LatentlabError, OSError):
                self._training = None  # the data moved: the marks of trained values are a nicety
        super().__post_init__()


def cli_flag(key: str) -> str:
    """How the command names a setting in its errors (a recipe names the TOML key itself)."""
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class SearchInputs:
    """The settings :func:`check_search_inputs` read. ``candidates`` is None for ``training-words`` when
    no finetune was given (its words are its recorded training data's)."""

    metric_kind: MetricKind
    direction: DirectionSpec | None
    candidates: CandidateSet | None
    prompts: list[str]
    expect: list[str] | None


def check_search_inputs(s: Any, finetuned: Path | None = None, flag: Callable[[str], str] = cli_flag) -> SearchInputs:
    """Every check of a search's settings ``s`` (a :class:`FindTriggerConfig`, or a study recipe's
    ``[find-trigger]`` table, duck-typed) that the finetune is not needed for, read as the command reads
    them: the template, the metric and its direction, the layer, the counts, the system prompt, the
    candidates, the prompts and the expected strings. Stated once because a study checks its recipe when it
    loads, while the finetune the config needs may be trained hours later; ``training-words`` is read only
    with ``finetuned``. ``flag`` names a setting in the errors (``--top``, or the recipe's ``top``)."""
    from latentlab.config import nonnegative_int, positive_int
    from latentlab.data import load_prompts
    from latentlab.directions import DirectionSpec
    from latentlab.trigger_search import parse_candidates, parse_metric
    from latentlab.triggers import check_template

    check_template(s.template)
    kind, arg = parse_metric(s.metric)
    direction = None
    if kind == "direction":
        assert arg is not None
        direction = DirectionSpec.parse(arg, f"{flag('metric')} direction:")
        if direction.saved is not None and s.layer is None and saved_best_layer(arg) is None:
            raise LatentlabError(f"the saved direction {arg} has no probes beside it to choose its layer",
                                 f"pass {flag('layer')} N")
        if direction.saved is not None and s.layer is not None and s.layer not in direction.saved.layers:
            raise LatentlabError(f"{flag('layer')} {s.layer} is not a layer of the saved direction {arg}",
                                 f"pick one of {direction.saved.layers}")
    elif s.layer is not None:
        raise LatentlabError(f"{flag('layer')} is for a direction metric, not {s.metric!r}",
                             f"drop {flag('layer')}, or use {flag('metric')} direction:NAME")
    if s.system is not None and (not str(s.system).strip() or s.chat is False):
        raise LatentlabError(f"{flag('system')} is empty" if s.chat is not False else
                             f"{flag('system')} needs chat rendering",
                             "give the system prompt the finetune was trained under, with chat rendering, or drop "
                             f"{flag('system')}")
    for k in ("top", "batch_size") + (("n_prompts",) if s.n_prompts is not None else ()):
        positive_int(k, getattr(s, k), flag(k))
    nonnegative_int("n_random", s.n_random, flag("n_random"))
    spec = str(s.candidates)
    candidates = None if spec.strip() == "training-words" and finetuned is None else parse_candidates(spec, finetuned)
    if s.prescreen is not None:
        positive_int("prescreen", s.prescreen, flag("prescreen"))
        if spec.strip() != "vocab":
            raise LatentlabError(f"{flag('prescreen')} is for {flag('candidates')} vocab, not {spec!r}",
                                 f"drop {flag('prescreen')}: a list this size is scanned exactly")
        if kind != "completion":
            raise LatentlabError(f"{flag('prescreen')} takes the completion metric, not {s.metric!r} (the first-order "
                                 "estimate of a KL vanishes where base and finetune agree)",
                                 f"use {flag('metric')} completion:TEXT, or scan without {flag('prescreen')}")
    n = s.n_prompts or (VOCAB_PROMPTS if candidates is not None and candidates.kind == "vocab" else DEFAULT_PROMPTS)
    prompts = load_prompts(s.prompts)[:n]
    if not prompts:
        raise LatentlabError(f"{s.prompts} holds no prompts", f"pass {flag('prompts')} with at least one prompt")
    expect = [str(e) for e in s.expect or []] or None
    for e in expect or []:
        if not e.strip():
            raise LatentlabError(f"an {flag('expect')} string is empty",
                                 "give the strings whose rank to report, e.g. the trigger you expect")
        if candidates is not None and candidates.values is not None and e not in candidates.values:
            raise LatentlabError(f"{flag('expect')} {e!r} is not among the candidates ({spec})",
                                 f"add it to the candidates, or drop it from {flag('expect')}")
    return SearchInputs(kind, direction, candidates, prompts, expect)


def saved_best_layer(spec: str | Path) -> int | None:
    """The best probe layer recorded beside a saved direction (``latentlab direction`` writes
    ``probes.json`` into the same run folder), or None."""
    from latentlab.io import read_json

    p = Path(spec)
    folder = p if p.is_dir() else p.parent
    side = folder / "probes.json"
    if side.is_file():
        try:
            best = read_json(side).get("best_layer")
        except (OSError, ValueError):
            return None
        return int(best) if isinstance(best, int) else None
    return None


def run(cfg: FindTriggerConfig, ctx: Context) -> TriggerSearch:
    """The candidates and prompts were read by the config; the metric's direction is resolved and its layer
    checked before ``cfg.out`` is touched."""
    from latentlab.io import write_json, write_text
    from latentlab.models import resolve_adapter
    from latentlab.plots import save_figure
    from latentlab.trigger_search import Metric, parse_metric, search_figure, search_triggers

    base = ctx.load("base", adapter=None)
    ft = base.with_adapter(cfg.finetuned, label=f"find-trigger:{resolve_adapter(cfg.finetuned).resolve()}")
    ctx.record("finetuned", ft)
    ref = None
    if cfg.reference is not None:
        ref = base.with_adapter(cfg.reference, label=f"find-trigger-ref:{resolve_adapter(cfg.reference).resolve()}")
        ctx.record("reference", ref)
    if cfg.chat and not getattr(base.tokenizer, "chat_template", None):
        raise LatentlabError(f"{base.info.name} has no chat template", "pass --no-chat, or leave --chat unset")
    kind, arg = parse_metric(cfg.metric)
    fitted = None
    if kind == "direction":
        assert cfg._direction is not None and arg is not None
        d, report = cfg._direction.resolve_with_probes(base, log=ctx.log)
        layer = cfg.layer
        if layer is None:
            layer = report.best_layer if report is not None else saved_best_layer(arg)
        assert layer is not None
        d.check(base, [layer])
        metric = Metric("direction", direction=d, layer=layer)
        fitted = d if report is not None else None
    else:
        metric = Metric(kind, text=arg)
    run = ctx.start(seed=cfg.seed)
    if fitted is not None:
        fitted.save(run.out / f"direction-{fitted.name}")
    res = search_triggers(base, ft, cfg._candidates, cfg._prompts, metric, cfg.template, n_random=cfg.n_random,
                          seed=cfg.seed, batch_size=cfg.batch_size, chat=cfg.chat, expect=cfg.expect or (),
                          training=cfg._training, system=cfg.system, prescreen=cfg.prescreen, reference=ref,
                          progress=ctx.progress)
    write_json(run.out / "results.json", res.to_dict(cfg.top))
    lines = [_json_line({"candidate": c, "effect": e}) for c, e in zip(res.candidates, res.effects)]
    write_text(run.out / "effects.jsonl", "".join(lines))
    save_figure(search_figure(res), run.out, "trigger_search")
    ctx.finish(results={
        "metric": res.metric, "n_candidates": len(res.candidates),
        "top": [r["candidate"] for r in res.ranked(min(cfg.top, 10))],
        "expected_ranks": {v: res.rank_of(v) for v in res.expected},
    })
    return res


def _json_line(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False) + "\n"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def show(res: TriggerSearch, cfg: FindTriggerConfig, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    null = res.null_summary()
    against = "the scan itself" if res.null_kind == "scan" else f"{null['n']} random vocabulary tokens"
    console.print(f"trigger search on {res.meta['n_prompts']} prompts, {len(res.candidates)} candidates: "
                  f"{res.meta['metric']}; z and percentile against {against}; * = in the training data",
                  highlight=False)
    table = Table()
    for col in ("rank", "candidate", "effect", "z", "percentile"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for r in res.ranked(cfg.top):
        table.add_row(str(r["rank"]), escape(repr(r["candidate"])) + ("*" if r["trained"] else ""),
                      _num(r["effect"], "+.4g"), _num(r["z"], "+.2f"), _num(r["percentile"], ".1f"))
    console.print(table)
    n = len(res.candidates)
    pre = res.meta.get("prescreen")
    if pre:
        console.print(f"prescreen: {pre['n_vocabulary']} tokens ranked by a first-order estimate, the best {pre['k']} "
                      f"scanned exactly (rank correlation estimate vs exact: {_num(pre['spearman_top'], '+.2f')} on "
                      f"them, {_num(pre['spearman_random'], '+.2f')} on the random tokens)", highlight=False)
    for v in res.expected:
        r = res.row(v)
        fr = r.get("first_order_rank")
        if r.get("scanned", True):
            where = f" (first-order rank {fr})" if fr else ""
        elif pre and fr:
            where = (f" (first-order rank {fr} of {pre['n_vocabulary']}: outside the {pre['k']} scanned, "
                     "scored beside them)")
        else:
            where = " (not a vocabulary token: scored beside the scan)"
        console.print(f"expected {escape(repr(v))}: rank {r['rank']} of {n}, effect {_num(r['effect'], '+.4g')}, "
                      f"z {_num(r['z'], '+.2f')}, percentile {_num(r['percentile'], '.1f')}{where}", highlight=False)
    if null["n"]:
        console.print(f"null ({against}): mean {_num(null['mean'], '+.4g')}, sd {_num(null['sd'], '.4g')}, "
                      f"95th percentile {_num(null['percentiles']['95'], '+.4g')}", highlight=False)
    console.print(f"results.json, effects.jsonl and plot (trigger_search) in {cfg.out}", highlight=False)


STAGE = Stage("find-trigger", FindTriggerConfig, run, show)
run_find_trigger = STAGE
