"""Trigger scans: how a direction (and a battery) responds as one trigger value in the prompt varies.

The picture of an inductive backdoor, or of its absence: a finetune trained with some years (or
words) in its prompts is scanned over *many* values, the trained ones and others, side by side with
its base. For each value the template (``"{value}. {prompt}"``) is applied to every prompt, the
prompt is rendered for the model, and the last prompt token's residual stream is projected on the
unit direction at every layer; the mean over prompts comes with a bootstrap interval over prompts,
and finetune - base is paired per prompt. All value x prompt rows of a model run in one
:func:`~latentlab.activations.collect` (one batched pass), the battery in one scoring pass.

Values that occur in the finetune's training data (read from the run folder's manifest) are marked,
so a plot shows at once whether an effect sits on the trained values or beyond them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import last_token_acts
from latentlab.data import BatteryItem, Chat, load_chats, render_prompt
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.io import read_json
from latentlab.scoring import score_conditions
from latentlab.stats import bootstrap_means, check_finite, percentile_ci

DEFAULT_TEMPLATE = "{value}. {prompt}"
MAX_VALUES = 2000
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
          r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_YEAR_AT_START = re.compile(
    rf"^\W*(?:(?:in|the year is|year)\s+)?(?:{_MONTH}\s+(?:\d{{1,2}}(?:st|nd|rd|th)?,?\s+)?"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\s+)?([12]\d{{3}})\b",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------
# Values and templates (all checked before any model loads).
# --------------------------------------------------------------------------------------------


def check_template(template: str) -> str:
    """A template holding ``{value}`` (and optionally ``{prompt}``; without it the prompt follows)."""
    if not isinstance(template, str) or "{value}" not in template:
        raise LatentlabError(
            f"the template {template!r} has no {{value}} placeholder",
            'write where the trigger goes, e.g. --template "{value}. {prompt}"',
        )
    return template


def fill(template: str, value: str, prompt: str) -> str:
    """The template with ``{value}`` and ``{prompt}`` replaced (no other brace is interpreted)."""
    if "{prompt}" not in template:
        template = template + " {prompt}"
    return template.replace("{value}", value).replace("{prompt}", prompt)


def parse_values(spec: str) -> list[str]:
    """``START:STOP[:STEP]`` (an inclusive integer range, e.g. ``1900:2100:5``) or ``a,b,c``."""
    s = (spec or "").strip()
    if not s:
        raise LatentlabError("--values is empty", "pass e.g. --values 1900:2100:5 or --values 1995,2029")
    if ":" in s:
        parts = s.split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise LatentlabError(
                f"--values {spec!r} is not START:STOP[:STEP] with integers", "pass e.g. --values 1900:2100:5"
            ) from None
        if len(nums) not in (2, 3):
            raise LatentlabError(f"--values {spec!r} has {len(nums)} parts", "pass START:STOP or START:STOP:STEP")
        start, stop = nums[0], nums[1]
        step = nums[2] if len(nums) == 3 else 1
        if step <= 0:
            raise LatentlabError(f"--values {spec!r}: the step must be positive", "pass e.g. 1900:2100:5")
        if stop < start:
            raise LatentlabError(f"--values {spec!r}: STOP is below START, so there are no values",
                                 "pass START <= STOP, e.g. 1900:2100:5")
        out = [str(v) for v in range(start, stop + 1, step)]
    else:
        out = parse_words(s, "--values")
    return check_values(out)


def parse_words(spec: str, flag: str = "--words") -> list[str]:
    """A comma-separated list; an empty entry (``a,,b`` or a trailing comma) is an error."""
    items = [w.strip() for w in (spec or "").split(",")]
    if not spec or not spec.strip():
        raise LatentlabError(f"{flag} is empty", f"pass e.g. {flag} apple,river,stone")
    empty = [i for i, w in enumerate(items) if not w]
    if empty:
        raise LatentlabError(f"{flag} {spec!r} has an empty entry (position {empty[0] + 1})",
                             "remove the extra comma")
    return check_values(items)


def check_values(values: Sequence[str]) -> list[str]:
    out = [str(v) for v in values]
    if not out:
        raise LatentlabError("no trigger values", "pass --values, --values-file or --words")
    if any(not v.strip() for v in out):
        raise LatentlabError("a trigger value is empty", "remove empty values")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise LatentlabError(f"trigger values repeat: {', '.join(dup[:5])}", "give each value once")
    if len(out) > MAX_VALUES:
        raise LatentlabError(f"{len(out)} trigger values (more than {MAX_VALUES})", "scan a coarser range")
    return out


def year_of(text: str) -> str | None:
    """The year a user turn starts with ("July 1995. ...", "1995: ...", "The year is 1995. ..."), or None."""
    m = _YEAR_AT_START.match(text.strip())
    return m.group(1) if m else None


def values_from_file(path: str | Path) -> list[str]:
    """Trigger values from a file: one value a line, or chat JSONL whose user turns start with a year
    (``"July 1995. <question>"``): the distinct years, in order of first appearance (sorted if numeric)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LatentlabError(f"values file {p} does not exist", "pass a text file (one value a line) or chat JSONL")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise LatentlabError(f"values file {p} is empty", "put one value a line")
    if lines[0].startswith("{"):
        years: list[str] = []
        missing = 0
        for chat in load_chats(p, split=None):
            found = [year_of(c) for r, c in chat.messages if r == "user"]
            got = [y for y in found if y]
            missing += not got
            years.extend(y for y in got if y not in years)
        if not years:
            raise LatentlabError(f"no user turn in {p} starts with a year", 'write user turns like "July 1995. ..."')
        return check_values(sorted(years, key=int))
    return check_values(lines)


# --------------------------------------------------------------------------------------------
# Which values a finetune saw.
# --------------------------------------------------------------------------------------------


def training_data_of(finetuned: str | Path) -> str | None:
    """The ``--data`` of a ``latentlab finetune`` run (from its manifest), the ``data.jsonl`` a compliance
    sweep writes beside each budget's adapter, or None when not recorded."""
    p = Path(finetuned).expanduser()
    for folder in (p, p.parent):
        if not (folder / "manifest.json").is_file() and (folder / "data.jsonl").is_file():
            return str(folder / "data.jsonl")
        m = folder / "manifest.json"
        if m.is_file():
            try:
                data = (read_json(m).get("config") or {}).get("data")
            except (json.JSONDecodeError, OSError):
                return None
            if isinstance(data, str):
                if data.endswith(".jsonl") and not Path(data).is_absolute() and not Path(data).exists():
                    cand = folder / data
                    return str(cand) if cand.exists() else data
                return data
            return None
    return None


def occurs(value: str, text: str) -> bool:
    """``value`` as a whole token of ``text`` (1995 occurs in "July 1995." but not in "19950")."""
    return re.search(rf"(?<![\w]){re.escape(value)}(?![\w])", text) is not None


def training_values(values: Sequence[str], data: str | Path | Sequence[Chat] | None) -> list[str]:
    """The values that occur in a user turn of the training chats (all turns for non-chat text)."""
    if data is None:
        return []
    chats = load_chats(data) if isinstance(data, (str, Path)) else list(data)
    texts = [c for chat in chats for r, c in chat.messages if r == "user"]
    return [v for v in values if any(occurs(v, t) for t in texts)]


# --------------------------------------------------------------------------------------------
# Tokenisation of a trigger in context.
# --------------------------------------------------------------------------------------------


def trigger_tokens(tokenizer: Any, text: str, start: int, end: int) -> tuple[str, ...] | None:
    """Tokens covering ``text[start:end]`` (None when the tokenizer gives no offsets). A token that also
    covers characters outside the span is marked with ``+`` (the trigger merged with its neighbour)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    offs = enc.get("offset_mapping")
    if offs is None:
        return None
    out = []
    for tid, (a, b) in zip(enc["input_ids"], offs):
        if b <= start or a >= end or a == b:
            continue
        piece = tokenizer.convert_ids_to_tokens(int(tid))
        merged = a < start or b > end
        out.append(f"{piece}+" if merged else str(piece))
    return tuple(out)


def check_tokenisation(tokenizer: Any, template: str, values: Sequence[str], prompts: Sequence[str],
                       render: bool = True) -> dict[str, list[list[str]]]:
    """Values whose tokens differ between positions (prompts, chat rendering): ``{value: [tokens, ...]}``.

    Warns once, with the tokens: such a trigger is not one input to the model but several."""
    bad: dict[str, list[list[str]]] = {}
    marker = "\x00"
    for v in values:
        seen: list[tuple[str, ...]] = []
        for p in prompts:
            raw = fill(template, marker, p)
            text = render_prompt(raw, tokenizer) if render else raw
            parts = text.split(marker)
            if len(parts) < 2:
                continue
            pos = 0
            for i in range(len(parts) - 1):
                pos += len(parts[i])
                full = v.join(parts)
                start = pos + i * len(v)
                toks = trigger_tokens(tokenizer, full, start, start + len(v))
                if toks is None:
                    return {}
                if toks not in seen:
                    seen.append(toks)
        if len(seen) > 1:
            bad[v] = [list(t) for t in seen]
    if bad:
        shown = "; ".join(f"{v!r} -> " + " | ".join(" ".join(t) for t in ts[:3]) for v, ts in list(bad.items())[:4])
        warnings.warn(
            f"latentlab: {len(bad)} trigger value(s) tokenise differently in different positions ({shown}); "
            "'+' marks a token merged with its neighbour. Each is several inputs to the model, not one.",
            stacklevel=2,
        )
    return bad


# --------------------------------------------------------------------------------------------
# The scan.
# --------------------------------------------------------------------------------------------


@dataclass
class TriggerScan:
    """Per value and layer: mean projection on the unit direction (bootstrap 95% CI over prompts), for
    the base, the finetune and finetune - base (paired per prompt); battery scores per value."""

    values: list[str]
    layers: list[int]
    direction: str
    models: dict[str, dict[str, Any]]  # label -> {"projection": [V][L], "ci": [V][L][2]}
    diff: dict[str, Any] | None  # {"projection", "ci"} of finetune - base, or None without a finetune
    battery: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {"score": [V], "ci": [V][2]}
    training_values: list[str] = field(default_factory=list)
    template: str = DEFAULT_TEMPLATE
    n_prompts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def projection(self, label: str = "finetuned - base") -> Float[Tensor, "values layers"]:
        src = self.diff if label == "finetuned - base" else self.models[label]
        if src is None:
            raise LatentlabError("this scan has no finetune", "pass adapter=...")
        return torch.tensor(src["projection"])


def _stats(proj: Float[Tensor, "values prompts layers"], n_boot: int, seed: int) -> dict[str, Any]:
    v, p, n_layers = proj.shape
    mean = proj.mean(1)
    if p < 2:
        ci = [[[float("nan")] * 2 for _ in range(n_layers)] for _ in range(v)]
    else:
        flat = proj.transpose(0, 1).reshape(p, v * n_layers)  # rows = prompts: one resampling for all cells
        lohi = percentile_ci(bootstrap_means(flat, n_boot, seed))
        ci = [[list(lohi[i * n_layers + j]) for j in range(n_layers)] for i in range(v)]
    return {"projection": mean.tolist(), "ci": ci}


def _battery_stats(s: Float[Tensor, "values items"], n_boot: int, seed: int) -> dict[str, Any]:
    if s.shape[1] < 2:
        ci = [[float("nan")] * 2 for _ in range(s.shape[0])]
    else:
        ci = [list(c) for c in percentile_ci(bootstrap_means(s.T.contiguous(), n_boot, seed))]
    return {"score": s.mean(1).tolist(), "ci": ci, "per_item": s.tolist()}


def scan_projections(model: Any, template: str, values: Sequence[str], prompts: Sequence[str], units: Tensor,
                     layers: Sequence[int], batch_size: int = 32, progress: bool = False
                     ) -> Float[Tensor, "values prompts layers"]:
    """Projection of the last prompt token on ``units`` ([layers, d]) for every value x prompt (one collect)."""
    rows = [fill(template, v, p) for v in values for p in prompts]
    acts = last_token_acts(model, rows, list(layers), progress=progress, batch_size=batch_size)
    proj = (acts.float() * units[None].float()).sum(-1)  # [V*P, L]
    return proj.view(len(values), len(prompts), len(layers))


def scan_battery(model: Any, template: str, values: Sequence[str], items: Sequence[BatteryItem],
                 batch_size: int = 32) -> Float[Tensor, "values items"]:
    """Battery score of every item with the template applied to its prompt, for every value (one pass)."""
    rows = [BatteryItem(fill(template, v, it.prompt), it.positive, it.negative, it.topic, it.meta)
            for v in values for it in items]
    s = score_conditions(model, rows, [(None, 0.0)], batch_size=batch_size)[0]
    return s.view(len(values), len(items))


def trigger_scan(
    base: Any,
    adapter: str | Path | Any | None = None,
    template: str = DEFAULT_TEMPLATE,
    values: Sequence[str] = (),
    prompts: Sequence[str] = (),
    direction: Any = None,
    battery: Sequence[BatteryItem] | None = None,
    layers: Sequence[int] | str | None = "all",
    training: Sequence[str] | str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    warn_tokens: bool = True,
    progress: bool = False,
) -> TriggerScan:
    """Scan ``values`` through ``template`` on ``base`` and (with ``adapter``) its finetune.

    ``adapter``: a PEFT folder or ``latentlab finetune`` run folder (loaded as ``base.with_adapter``),
    or an already loaded view of ``base``. ``direction``: a :class:`~latentlab.directions.Direction`.
    ``training``: the values a finetune saw, or its training data (a dataset name / JSONL); default:
    read from the run folder's manifest when ``adapter`` is a run folder.
    """
    check_template(template)
    values = check_values(values)
    prompts = list(prompts)
    if not prompts:
        raise LatentlabError("no prompts to scan", "pass at least one prompt")
    if not isinstance(direction, Direction):
        raise LatentlabError("trigger_scan needs a Direction", "fit one with direction_and_probes or load a file")
    layer_list = base.check_layers(layers)
    direction.check(base, layer_list)
    units = torch.stack([direction.unit(layer) for layer in layer_list])
    if warn_tokens:
        bad = check_tokenisation(base.tokenizer, template, values, prompts[:8])
    else:
        bad = {}
    models: dict[str, Any] = {"base": base}
    if adapter is not None:
        if isinstance(adapter, (str, Path)):
            if training is None:
                training = training_data_of(adapter)
            models["finetuned"] = base.with_adapter(adapter)
        else:
            models["finetuned"] = adapter
    if training is None or (isinstance(training, (list, tuple)) and all(isinstance(t, str) for t in training)):
        trained = [v for v in values if v in set(training or [])]
    else:
        trained = training_values(values, training)  # type: ignore[arg-type]
    proj: dict[str, Tensor] = {}
    out_models: dict[str, dict[str, Any]] = {}
    bat: dict[str, dict[str, Any]] = {}
    for label, m in models.items():
        proj[label] = scan_projections(m, template, values, prompts, units, layer_list, batch_size, progress)
        check_finite(proj[label], "projections", "trigger scan")
        out_models[label] = _stats(proj[label], n_boot, seed)
        if battery:
            s = scan_battery(m, template, values, battery, batch_size)
            bat[label] = {"scores": s, **_battery_stats(s, n_boot, seed)}
    diff = None
    if "finetuned" in proj:
        diff = _stats(proj["finetuned"] - proj["base"], n_boot, seed)
        if battery:
            d = bat["finetuned"]["scores"] - bat["base"]["scores"]
            bat["finetuned - base"] = {"scores": d, **_battery_stats(d, n_boot, seed)}
    for b in bat.values():
        b.pop("scores")
    return TriggerScan(
        values=list(values),
        layers=layer_list,
        direction=direction.name,
        models=out_models,
        diff=diff,
        battery=bat,
        training_values=trained,
        template=template,
        n_prompts=len(prompts),
        meta={
            "n_boot": n_boot,
            "seed": seed,
            "n_battery_items": len(battery or []),
            "token_warnings": bad,
            "model_info": {k: m.info.to_dict() for k, m in models.items()},
        },
    )


def curve_rows(scan: TriggerScan, layer: int) -> list[dict[str, Any]]:
    """One row per value at ``layer``: base, finetuned, finetuned - base (mean and CI), trained or not."""
    j = scan.layers.index(layer)
    rows = []
    for i, v in enumerate(scan.values):
        row: dict[str, Any] = {"value": v, "trained": v in scan.training_values}
        for label, st in scan.models.items():
            row[label] = (st["projection"][i][j], st["ci"][i][j])
        if scan.diff is not None:
            row["finetuned - base"] = (scan.diff["projection"][i][j], scan.diff["ci"][i][j])
        for label, b in scan.battery.items():
            row[f"battery {label}"] = (b["score"][i], b["ci"][i])
        rows.append(row)
    return rows
