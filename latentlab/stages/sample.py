"""``latentlab sample``: each arm's answers to open questions, in process or from an OpenAI-compatible server.

The sampling itself is :mod:`latentlab.sampling` (units, seeds, the crash-safe log, the page); this
stage checks everything before a model loads, decides whether ``--out`` is new, to be resumed, or
already done with these very settings, and writes ``samples.jsonl``, ``samples.json`` (the settings),
``samples.html`` and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetuneBaseOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.sampling import Row


@dataclass(kw_only=True)
class SampleConfig(FinetuneBaseOptions, OutOptions):
    """Sample each arm's answers to open questions: the base, each --finetuned run, the --control, and each of
    them again under every --steer / --ablate spec.

    In process, the base loads once and each finetune is its adapter switched on it; arms of one model view
    share every batch. --scale 0,1,2 samples each finetune and the control at each factor on its LoRA
    difference (arms NAME@x0, NAME, NAME@x2: amplification). With --endpoint (an OpenAI-compatible base
    URL such as http://localhost:8000/v1, e.g. latentlab serve or vLLM) no model loads: each arm is asked
    under its --served name.

    OUT gets samples.jsonl (one answer per line, id ARM/QUESTION/K), samples.json (the settings), samples.html
    (answers side by side, with the labels of a judge's judgments.jsonl when there is one) and manifest.json.
    An interrupted run continues where it stopped when the same command is run again (the in-process engine
    draws exactly the answers an uninterrupted run would); a finished one with the same settings is reused;
    other settings are refused unless --overwrite.
    """

    command = "sample"
    several_scales = True
    out: Path = option(Path("runs/sample"), help="Run folder to write.")
    finetuned: list[str] | None = option(
        None, help="A finetune to sample: NAME=RUN or RUN (a finetune run or adapter folder; repeatable)."
    )
    control: str | None = option(None, help="The control finetune: NAME=RUN or RUN (its role is control).")
    steer: list[str] | None = option(
        None, help="Also sample every arm steered, e.g. era:0.5@8-17 (repeatable: one set of arms per spec)."
    )
    ablate: list[str] | None = option(
        None, help="Also sample every arm with a direction projected out, e.g. era@all (repeatable)."
    )
    no_base: bool = option(False, help="Leave the base model out of the arms.")
    questions: str = option(
        "era-questions", help="era-questions, persona-questions, or a JSONL of {id?, question} or {id?, messages}."
    )
    n: int = option(8, help="Answers per arm and question.")
    temperature: float = option(1.0, help="Sampling temperature (0: greedy, all n answers alike).")
    top_p: float = option(1.0, help="Nucleus sampling mass in (0, 1] (1: off).")
    max_new_tokens: int = option(64, help="Tokens per answer at most.")
    seed: int = option(0, help="Run seed: each batch's seed derives from it, its questions and sample indices.")
    batch_size: int = option(
        32, help="Rows per batch (in process). It decides which answers share a random stream, so it is recorded."
    )
    endpoint: str | None = option(
        None, help="Sample from an OpenAI-compatible server at this base URL (e.g. http://localhost:8000/v1)."
    )
    served: list[str] | None = option(
        None, help="With --endpoint: ARM=SERVED_MODEL_NAME (repeatable; default: the arm's own name)."
    )
    api_key_env: str | None = option(None, help="With --endpoint: the environment variable holding the API key.")
    concurrency: int = option(8, help="With --endpoint: requests in flight at once.")
    timeout: float = option(60.0, help="With --endpoint: seconds to wait for one answer.")
    max_retries: int = option(3, help="With --endpoint: retries of a failed request (with backoff).")
    judgments: Path | None = option(
        None, help="A judge run folder (or its judgments.jsonl) whose labels samples.html shows."
    )

    def __post_init__(self) -> None:
        from latentlab.config import finite_float, nonnegative_int, positive_int

        for name in ("n", "max_new_tokens", "batch_size", "concurrency"):
            positive_int(name, getattr(self, name))
        nonnegative_int("max_retries", self.max_retries)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LatentlabError(f"--seed must be an integer, got {self.seed!r}", "pass e.g. --seed 0")
        self.temperature = finite_float("temperature", self.temperature)
        if self.temperature < 0:
            raise LatentlabError(f"--temperature must be >= 0, got {self.temperature:g}",
                                 "pass 0 (greedy) or a positive temperature, e.g. 1")
        self.top_p = finite_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise LatentlabError(f"--top-p must be in (0, 1], got {self.top_p:g}", "pass e.g. --top-p 0.9 (1 = off)")
        if finite_float("timeout", self.timeout) <= 0:
            raise LatentlabError(f"--timeout must be > 0 seconds, got {self.timeout}", "pass e.g. --timeout 60")
        self.timeout = float(self.timeout)
        self.finetuned = _as_list(self.finetuned)
        self.steer = _as_list(self.steer)
        self.ablate = _as_list(self.ablate)
        self.served = _as_list(self.served)
        self._check_endpoint()
        self._prepare()
        self._decide_state()
        # a run of these very settings in --out is resumed or reused (checked above): the shared --out check
        # must not refuse it as a finished run; the recorded overwrite stays as given
        given, self.overwrite = self.overwrite, self.overwrite or self._state != "new"
        try:
            super().__post_init__()
        finally:
            self.overwrite = given

    def _check_endpoint(self) -> None:
        import os
        from urllib.parse import urlsplit

        if self.endpoint is None:
            for flag, value in (("--served", self.served), ("--api-key-env", self.api_key_env)):
                if value:
                    raise LatentlabError(f"{flag} is for --endpoint, which is not given",
                                         f"pass --endpoint URL, or drop {flag}")
            return
        self.endpoint = str(self.endpoint).strip().rstrip("/")
        try:
            parts = urlsplit(self.endpoint)
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                or parts.fragment:
            raise LatentlabError(f"--endpoint {self.endpoint!r} is not an http(s) base URL",
                                 "pass e.g. --endpoint http://localhost:8000/v1")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise LatentlabError(f"--api-key-env {self.api_key_env}: that environment variable is not set",
                                 f"export {self.api_key_env}=YOUR_KEY, or drop --api-key-env")

    def _prepare(self) -> None:
        """Questions, arms (adapters checked, specs parsed), served names and the settings: no model yet."""
        from latentlab.ablation import check_same_base
        from latentlab.arms import build_arms
        from latentlab.models import adapter_fingerprint
        from latentlab.sampling import SampleSettings, load_questions, questions_hash

        self.questions = str(self.questions)
        self._questions = load_questions(self.questions)
        self._arms = build_arms(self.finetuned or (), self.control, self.steer or (), self.ablate or (),
                                base=not self.no_base, scales=self.scales())
        if self.scales() != [1.0] and not self.finetuned and self.control is None:
            raise LatentlabError(f"--scale {self.scale} scales a finetune, and none is sampled",
                                 "pass --finetuned NAME=RUN (or --control), or drop --scale")
        adapters = list(dict.fromkeys(a.adapter for a in self._arms if a.adapter is not None))
        for other in adapters[1:]:
            check_same_base(adapters[0], other)
        names = [a.name for a in self._arms]
        served: dict[str, str] = {}
        for text in self.served or []:
            arm, sep, model = (x.strip() for x in str(text).partition("="))
            if not sep or not arm or not model:
                raise LatentlabError(f"cannot read --served {text!r}", "use --served ARM=SERVED_MODEL_NAME")
            if arm not in names:
                raise LatentlabError(f"--served names the arm {arm!r}, which is not sampled (arms: {', '.join(names)})",
                                     "use one of those arm names (NAME in --finetuned NAME=RUN)")
            served[arm] = model
        self._served = {a: served.get(a, a) for a in names}
        self._settings = SampleSettings(
            model=str(self.model), arms=[a.record() for a in self._arms], questions=self.questions,
            questions_hash=questions_hash(self.questions), n=self.n, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, seed=self.seed,
            engine="local" if self.endpoint is None else "endpoint", endpoint=self.endpoint,
            served=None if self.endpoint is None else self._served,
            batch_size=self.batch_size if self.endpoint is None else None,
            adapters={a.name: adapter_fingerprint(a.adapter) for a in self._arms if a.adapter is not None},
        )
        if self.judgments is not None:
            self._judgments_file = _judgments_file(Path(self.judgments))

    def _decide_state(self) -> None:
        """new, resume (a sample run of these settings with rows missing, or unfinished) or done (finished, all
        rows there). Another sample run's settings are refused here, naming what differs. Reads only."""
        from latentlab.config import _latentlab_manifest, _same_command
        from latentlab.io import read_json
        from latentlab.sampling import SAMPLES_FILE, SETTINGS_FILE, SampleLog

        self._state = "new"
        out = Path(self.out).expanduser()
        if self.overwrite or not (out / SETTINGS_FILE).is_file():
            return
        m = _latentlab_manifest(out)
        if m is None or not _same_command(m["command"], self.command):
            return  # not a sample run: the shared --out check says what it is
        try:
            recorded = read_json(out / SETTINGS_FILE)
        except (OSError, ValueError):
            recorded = None
        diff = self._settings.differences(recorded) if isinstance(recorded, dict) else ["samples.json (unreadable)"]
        if diff:
            raise LatentlabError(
                f"--out {out} holds samples made with other settings ({', '.join(diff)})",
                "use a new --out, the same options as before, or pass --overwrite to replace them",
            )
        have = {r["id"] for r in SampleLog(out / SAMPLES_FILE).read()}
        complete = have.issuperset(self._settings.expected_ids(self._questions))
        self._state = "done" if complete and m["status"] == "complete" else "resume"


def _as_list(v: Any) -> list[str]:
    return [] if v is None else [str(v)] if isinstance(v, (str, Path)) else [str(x) for x in v]


def _judgments_file(p: Path) -> Path:
    from latentlab.sampling import JUDGMENTS_FILE

    f = p / JUDGMENTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise LatentlabError(f"--judgments {p}: no {JUDGMENTS_FILE} there", "pass the --out folder of latentlab judge")
    return f


@dataclass
class SampleResult:
    """The rows of a sample run (canonical order), how many were drawn now, and whether it was reused."""

    out: Path
    rows: list[Row]
    generated: int
    resumed: int = 0  # rows already on disk when this run started
    reused: bool = False


def run(cfg: SampleConfig, ctx: Context) -> SampleResult:
    """Everything was checked by the config; in process, the base loads and the adapters are switched on
    (an adapter of another base is refused) before ``cfg.out`` is touched."""
    from latentlab.arms import prepared_arms
    from latentlab.io import write_json
    from latentlab.sampling import (
        JUDGMENTS_FILE,
        PAGE_FILE,
        SAMPLES_FILE,
        SETTINGS_FILE,
        SampleLog,
        write_samples_page,
    )

    judgments = getattr(cfg, "_judgments_file", None)
    out = Path(cfg.out)
    log = SampleLog(out / SAMPLES_FILE)
    expected = cfg._settings.expected_ids(cfg._questions)
    if cfg._state == "done":
        rows = _ordered(log.read(), expected)
        write_samples_page(out, rows, judgments, ctx.log)
        return SampleResult(out, rows, generated=0, resumed=len(rows), reused=True)
    # a resumed run that lacks nothing (killed after its last batch) needs no model
    missing = cfg._state == "new" or not {r["id"] for r in log.read()}.issuperset(expected)
    base = prepared = None
    if cfg.endpoint is None and missing:
        base = ctx.load("base")
        prepared = prepared_arms(base, cfg._arms, log=ctx.log)
        for a in cfg._arms:
            if a.adapter is not None and a.intervention is None:
                ctx.record(a.name, prepared[a.name][0])
    run = ctx.start(seed=cfg.seed)
    if cfg._state == "new":  # a fresh run (or --overwrite): nothing of an earlier one may mix in
        for name in (SAMPLES_FILE, PAGE_FILE, JUDGMENTS_FILE):
            (run.out / name).unlink(missing_ok=True)
    write_json(run.out / SETTINGS_FILE, cfg._settings.record())
    before = len(set(expected) & {r["id"] for r in log.open()})
    if before:
        ctx.log(f"resuming: {before} of {len(expected)} samples are already in {run.out / SAMPLES_FILE}")
    common = dict(questions=cfg._questions, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, done=set(log.ids), on_batch=log.append,
                  progress=ctx.progress)
    new: list[Row] = []
    try:
        if not missing:
            pass
        elif cfg.endpoint is None:
            from latentlab.sampling import local_samples

            new = local_samples(base, prepared, batch_size=cfg.batch_size, log=ctx.log, **common)  # type: ignore[arg-type]
        else:
            import os

            from latentlab.sampling import endpoint_samples

            key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            new = endpoint_samples(cfg.endpoint, cfg._served, concurrency=cfg.concurrency, api_key=key,
                                   timeout=cfg.timeout, max_retries=cfg.max_retries, **common)  # type: ignore[arg-type]
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(f"interrupted: {len(log.ids)} samples are in {run.out / SAMPLES_FILE}; "
                                "run the same command again to continue") from e
    finally:
        log.close()
    rows = _ordered(log.read(), expected)
    if len(rows) != len(expected):
        raise LatentlabError(f"{len(expected) - len(rows)} samples are missing from {run.out / SAMPLES_FILE}",
                             "run the same command again to draw them")
    log.rewrite(rows)  # canonical order: a resumed run's file equals an uninterrupted one's
    write_samples_page(run.out, rows, judgments, ctx.log)
    ctx.finish(results={"samples": len(rows), "generated": len(new), "resumed_from": before,
                        "arms": [a.name for a in cfg._arms], "questions": len(cfg._questions), "n": cfg.n,
                        "engine": cfg._settings.engine})
    return SampleResult(run.out, rows, generated=len(new), resumed=before)


def _ordered(rows: list[Row], expected: list[str]) -> list[Row]:
    by_id = {r["id"]: r for r in rows}
    return [by_id[i] for i in expected if i in by_id]


def show(res: SampleResult, cfg: SampleConfig, console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    if res.reused:
        console.print(f"reused: {res.out} already holds these {len(res.rows)} samples (same settings); "
                      "nothing generated")
    else:
        resumed = f", {res.resumed} were already on disk" if res.resumed else ""
        console.print(f"{len(res.rows)} samples ({res.generated} drawn now{resumed}) -> {res.out / 'samples.jsonl'}")
    if res.rows:
        first = res.rows[0]["question_id"]
        table = Table(title=f"first answer of each arm to {first!r}: {res.rows[0]['question']}")
        table.add_column("arm")
        table.add_column("answer")
        for r in res.rows:
            if r["question_id"] == first and r["k"] == 0:
                answer = " ".join(str(r["answer"]).split())
                table.add_row(Text(r["arm"]), Text(answer[:160] + ("..." if len(answer) > 160 else "")))
        console.print(table)
    console.print(f"side by side: {res.out / 'samples.html'}")


STAGE = Stage("sample", SampleConfig, run, show)
run_sample = STAGE
