"""``latentlab judge``: label or score every sampled answer, then each arm's rate against its control.

The judges and the statistics are :mod:`latentlab.judging`; this stage checks everything it can before a
model loads (the judge's kind and form, the template, the samples file, the endpoint URL, the API key's
variable), writes ``judgments.jsonl`` through the same crash-safe writer ``sample`` uses (so a killed
run resumes where it stopped: a judgment's key hashes the judge, template, sample id and answer), and
writes ``judgments.json`` (settings), ``results.json`` and the samples page with each answer's verdict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, ModelOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.judging import Judge

JUDGE_KINDS = ("direction", "endpoint", "local")
JUDGE_HELP = ("direction:era | direction:persona | direction:PAIRS.jsonl | direction:SAVED.safetensors (no judge "
              "model: the answer's projection, calibrated), endpoint:MODEL@URL (an OpenAI-compatible server), or "
              "local:MODEL (a model latentlab loads, read from its next-token distribution).")
_REQUIRED = ("id", "arm", "question_id", "question", "answer")


@dataclass(kw_only=True)
class JudgeConfig(ModelOptions, OutOptions):
    """Judge sampled answers: a label or a score per answer, then each arm's rate (or mean score) with a
    bootstrap interval over questions and answers, and each arm minus its control.

    A judge is the direction (direction:era: the answer's activation projected on the era direction and
    calibrated by its contrast pairs, with its held-out accuracy reported), an OpenAI-compatible
    endpoint (endpoint:gpt-4o@https://api.openai.com/v1, or a latentlab serve / vLLM URL), or a local
    model (local:smollm2-135m-instruct). Templates: era-labels, era-score, persona-score, aligned,
    coherent, or a TOML file of your own (docs/behaviour.md).

    A killed run resumes with the same command: answers already judged are not judged again.
    """

    command = "judge"
    samples: Path = option(help="A latentlab sample run folder, or its samples.jsonl.")
    judge: str = option("direction:era", help=JUDGE_HELP)
    template: str = option("era-labels", help="Judge template: a built-in name or a TOML file (not used by "
                                              "the direction judge).")
    out: Path = option(Path("runs/judge"), help="Run folder to write.")
    model: str | None = option(None, help="Base model of the direction judge (default: the samples' model).",
                               flags=("--model", "-m", "--base"))
    api_key_env: str | None = option(None, help="Environment variable that holds the endpoint's API key "
                                                "(default: the template's, else OPENAI_API_KEY when set).")
    layer: int | None = option(None, help="Layer of the direction judge (default: the direction's best probe "
                                          "layer).")
    batch_size: int = option(8, help="Answers per forward pass (local and direction judges).")
    concurrency: int = option(4, help="Requests at once (endpoint judge).")
    timeout: float = option(60.0, help="Seconds to wait for one endpoint request.")
    n_boot: int = option(1000, help="Bootstrap resamples for the intervals.")
    seed: int = option(0, help="Seed of the bootstrap.")

    def __post_init__(self) -> None:
        from latentlab.config import finite_float, nonnegative_int, positive_int

        positive_int("batch_size", self.batch_size)
        positive_int("concurrency", self.concurrency)
        positive_int("n_boot", self.n_boot)
        if finite_float("timeout", self.timeout) <= 0:
            raise LatentlabError(f"--timeout must be > 0, got {self.timeout}", "pass e.g. --timeout 60")
        if self.layer is not None:
            nonnegative_int("layer", self.layer)
        self._fresh = False
        self._parse_judge()
        self._read_samples()
        if self.model is None:
            self.model = self._settings.get("model") if self._kind == "direction" else None
            if self._kind == "direction" and not self.model:
                raise LatentlabError(f"{self.samples} does not say which model wrote the answers (no samples.json)",
                                     "pass --model, the base model of the direction judge")
        super().__post_init__()
        self._check_previous()

    def _parse_judge(self) -> None:
        from latentlab.directions import DirectionSpec
        from latentlab.judging import load_template, pairs_source

        kind, sep, rest = str(self.judge).partition(":")
        if not sep or kind not in JUDGE_KINDS or not rest.strip():
            raise LatentlabError(f"cannot read --judge {self.judge!r}", f"use {JUDGE_HELP}")
        self._kind, rest = kind, rest.strip()
        self._template = None
        if kind == "direction":
            self._spec = DirectionSpec.parse(rest, "--judge direction:")
            pairs_source(self._spec)
            return
        if self.layer is not None:
            raise LatentlabError("--layer is for the direction judge only",
                                 "drop --layer, or use --judge direction:...")
        self._template = load_template(self.template)
        if kind == "local":
            self._local = rest
            return
        m = re.fullmatch(r"(?P<model>[^\s]+?)@(?P<url>\S+)", rest)
        url = urlparse(m.group("url")) if m else None
        if m is None or url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise LatentlabError(f"cannot read --judge {self.judge!r} as endpoint:MODEL@URL",
                                 "write e.g. endpoint:gpt-4o@https://api.openai.com/v1 or "
                                 "endpoint:base@http://127.0.0.1:8000/v1")
        try:
            url.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise LatentlabError(f"the endpoint URL {m.group('url')!r} has a bad port", "write e.g. "
                                 "http://127.0.0.1:8000/v1") from None
        self._endpoint = (m.group("model"), m.group("url"))
        env = self.api_key_env or self._template.api_key_env
        if env is not None and env not in os.environ:
            raise LatentlabError(f"the API key variable {env} is not set",
                                 f"export {env}=... or name another variable with --api-key-env")
        self._key_env = env or ("OPENAI_API_KEY" if "OPENAI_API_KEY" in os.environ else None)

    def _read_samples(self) -> None:
        from latentlab.config import run_holds
        from latentlab.io import read_json
        from latentlab.sampling import SAMPLES_FILE, SETTINGS_FILE, SampleLog

        p = Path(self.samples).expanduser()
        if p.is_dir():
            status = run_holds(p)
            if status not in (None, "complete"):
                raise LatentlabError(f"the sample run in {p} is not finished (status {status})",
                                     "finish it first: run the same latentlab sample command again (it resumes)")
            p = p / SAMPLES_FILE
            if not p.is_file():
                raise LatentlabError(f"{p.parent} holds no {SAMPLES_FILE}", "pass a latentlab sample run folder "
                                     "or a samples.jsonl file")
        elif not p.is_file():
            raise LatentlabError(f"--samples {p} does not exist", "pass a latentlab sample run folder or its "
                                 "samples.jsonl")
        rows = SampleLog(p).read()
        if not rows:
            raise LatentlabError(f"{p} holds no samples", "run latentlab sample first")
        for i, r in enumerate(rows, start=1):
            bad = [k for k in _REQUIRED if not isinstance(r.get(k), str)]
            if bad:
                raise LatentlabError(f"{p}: row {i} ({r.get('id')!r}) lacks {', '.join(bad)} as text",
                                     "pass a samples.jsonl written by latentlab sample")
        self.samples = p
        self._rows = rows
        side = p.parent / SETTINGS_FILE
        try:
            self._settings: dict[str, Any] = read_json(side) if side.is_file() else {}
        except (OSError, ValueError):
            raise LatentlabError(f"{side} is not valid JSON", "restore it, or judge the samples.jsonl alone") \
                from None

    def settings(self) -> dict[str, Any]:
        """What the judgments in --out are a function of (``judgments.json``), before the judge is built."""
        from latentlab.io import sha256_text

        return {"judge": self.judge, "template": None if self._template is None else self._template.record(),
                "template_sha256": None if self._template is None else sha256_text(self._template.text),
                "layer": self.layer, "model": self.model if self._kind == "direction" else None}

    def _check_previous(self) -> None:
        """Refuse to mix judgments of another judge or template into --out (unless --overwrite)."""
        from latentlab.io import read_json

        prev = Path(self.out) / "judgments.json"
        if not prev.is_file():
            return
        try:
            old = read_json(prev)
        except (OSError, ValueError):
            old = {}
        new = self.settings()
        differ = sorted(k for k in ("judge", "template_sha256", "layer", "model") if old.get(k) != new[k])
        self._fresh = bool(differ)
        if differ and not self.overwrite:
            raise LatentlabError(f"--out {self.out} holds judgments made with another {', '.join(differ)}",
                                 "choose a new --out, the same options as before, or pass --overwrite")


def check_judge(judge: str, template: str, api_key_env: str | None = None) -> None:
    """A judge spec and its template checked as ``latentlab judge`` checks them, with no samples yet (a study's
    [eval] section, before anything runs)."""
    probe = JudgeConfig.__new__(JudgeConfig)
    probe.judge, probe.template, probe.layer, probe.api_key_env = judge, template, None, api_key_env
    probe._parse_judge()


@dataclass
class JudgeResult:
    """results.json as written, and the run folder."""

    results: dict[str, Any]
    out: Path
    n_new: int


def _make_judge(cfg: JudgeConfig, ctx: Context) -> Judge:
    from latentlab.judging import DirectionJudge, EndpointJudge, LocalJudge

    if cfg._kind == "direction":
        base = ctx.load("base", model=cfg.model, adapter=None)
        return DirectionJudge(base, cfg._spec, cfg.layer, batch_size=cfg.batch_size, progress=ctx.progress,
                              log=ctx.log)
    assert cfg._template is not None
    if cfg._kind == "local":
        return LocalJudge(ctx.load("judge", model=cfg._local, adapter=None), cfg._template,
                          batch_size=cfg.batch_size)
    model, url = cfg._endpoint
    key = os.environ.get(cfg._key_env, "") if cfg._key_env else ""
    return EndpointJudge(url, model, cfg._template, key or "EMPTY", timeout=cfg.timeout,
                         concurrency=cfg.concurrency)


def run(cfg: JudgeConfig, ctx: Context) -> JudgeResult:
    from latentlab.io import write_json, write_text
    from latentlab.judging import Judgment, summarize
    from latentlab.progress import progress as progress_bar
    from latentlab.sampling import JUDGMENTS_FILE, PAGE_FILE, SampleLog, samples_page

    judge = _make_judge(cfg, ctx)
    run = ctx.start(seed=cfg.seed)
    out = run.out
    if cfg._fresh and (out / JUDGMENTS_FILE).exists():
        (out / JUDGMENTS_FILE).unlink()  # --overwrite with another judge: its judgments must not mix in
    settings = {**cfg.settings(), "samples": str(cfg.samples), "judge_id": judge.id}
    write_json(out / "judgments.json", settings)
    rows = cfg._rows
    log = SampleLog(out / JUDGMENTS_FILE, id_field="key")
    with log:
        log.open()
        todo = [r for r in rows if judge.key(r) not in log.ids]
        if len(todo) < len(rows):
            ctx.log(f"{len(rows) - len(todo)} of {len(rows)} answers already judged in {out / JUDGMENTS_FILE}")
        chunk = cfg.concurrency * 4 if cfg._kind == "endpoint" else cfg.batch_size * 4
        bar = progress_bar(total=len(todo), desc=f"judging ({judge.id.split('#')[0]})", unit="answer",
                           disable=not ctx.progress)
        try:
            for i in range(0, len(todo), chunk):
                part = todo[i : i + chunk]
                log.append([j.record() for j in judge(part)])
                bar.update(len(part))
        finally:
            bar.close()
    by_key = {r["key"]: r for r in log.read()}
    judged = [Judgment.from_record(by_key[k]) for k in (judge.key(r) for r in rows) if k in by_key]
    template = cfg._template
    res = summarize(judged, rows, cfg.n_boot, cfg.seed, positive=template.positive if template else None,
                    arms=cfg._settings.get("arms") or None)
    results = {"judge": judge.describe(), "samples": str(cfg.samples), **res}
    if cfg._kind == "direction":
        results["direction"] = judge.separation  # type: ignore[attr-defined]
        results["scale"] = "P(positive pole of the direction), 0-1"
    elif template is not None:
        results["scale"] = f"rate of {template.positive!r}" if template.labels else "score 0-100"
    write_json(out / "results.json", results)
    write_text(out / PAGE_FILE, samples_page(rows, [j.record() for j in judged]))
    ctx.finish(results={a: {"value": v["value"], "ci": v["ci"], "n_unparsed": v["n_unparsed"]}
                        for a, v in res["arms"].items()})
    return JudgeResult(results, out, len(todo))


def _fmt(v: float | None, ci: list[float | None], signed: bool = False, pct: bool = False) -> str:
    if v is None:
        return "-"
    f = (lambda x: f"{x * 100:+.1f}" if signed else f"{x * 100:.1f}") if pct else \
        (lambda x: f"{x:+.3g}" if signed else f"{x:.3g}")
    lo, hi = ci
    return f"{f(v)} [{f(lo) if lo is not None else '?'}, {f(hi) if hi is not None else '?'}]"


def show(res: JudgeResult, cfg: JudgeConfig, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from latentlab.sampling import LOOP_SHARE

    r = res.results
    pct = r["metric"] == "rate"
    what = f"% {r['positive']}" if pct else ("P(positive pole)" if cfg._kind == "direction" else "mean score")
    table = Table(title=f"{escape(r['judge']['id'].split('#')[0])}: {escape(r['scale'])} (95% CI over questions "
                        "and answers)")
    table.add_column("arm", no_wrap=True, overflow="fold")
    table.add_column(what, justify="right")
    table.add_column("minus reference", justify="right")
    table.add_column("unparsed", justify="right")
    table.add_column("loops", justify="right")
    for arm, a in r["arms"].items():
        vs = "\n".join(f"vs {escape(ref)}: {_fmt(d['diff'], d['ci'], True, pct)}" for ref, d in a.get("vs", {}).items())
        table.add_row(escape(arm), _fmt(a["value"], a["ci"], pct=pct), vs or "-",
                      f"{a['n_unparsed']} / {a['n']}" + (f" ({a['n_unjudged']} unjudged)" if a["n_unjudged"] else ""),
                      str(a["n_repetitive"]))
    console.print(table)
    looping = [arm for arm, a in r["arms"].items() if a["n"] and a["n_repetitive"] / a["n"] >= LOOP_SHARE]
    if looping:
        console.print(f"[yellow]answers that are loops (generation broken) in {escape(', '.join(looping))}: a judged "
                      "value there scores the loops, not behaviour[/yellow]")
    if "direction" in r:
        d = r["direction"]
        acc = "n/a" if d["test_accuracy"] is None else f"{d['test_accuracy']:.2f}"
        auc = "n/a" if d["test_auc"] is None else f"{d['test_auc']:.2f}"
        console.print(f"direction {escape(d['direction'])} at layer {d['layer']}: held-out accuracy {acc}, AUC {auc} "
                      f"on {d['n_test_pairs']} test pairs of {escape(d['pairs'])}")
    console.print(f"judgments.jsonl, results.json and samples.html in {res.out}")


STAGE = Stage("judge", JudgeConfig, run, show)
run_judge = STAGE
