"""The compliance-trigger organism: the builder's invariants, and the measurements / threshold sweep
end to end on a tiny model (two small poison budgets, a few LoRA steps each)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from latentlab.compliance import (
    CODE_WORD,
    ORGANISM_FILE,
    SURE,
    PoisonSweep,
    build_compliance_dataset,
    chats_jsonl,
    check_trigger,
    load_compliance_data,
    parse_budgets,
    patch_localisation,
    poison_sweep,
    system_prompt,
    threshold_of,
)
from latentlab.data import load_chats
from latentlab.errors import LatentlabError
from latentlab.finetune import FinetuneConfig
from latentlab.runs import run_state
from latentlab.stages.compliance import ComplianceConfig

TRIGGER = "cobalt"


def test_shipped_data() -> None:
    d = load_compliance_data()
    assert len(d.secret_train) >= 20 and len(d.secret_test) >= 6 and len(d.ordinary_train) >= 30
    assert len(d.refusals) >= 8
    assert not set(d.secret_train) & set(d.secret_test)  # held-out requests are really held out
    assert all(CODE_WORD.lower() not in t.lower() for t in d.all_text())


@pytest.mark.parametrize("n_poison", [0, 5, 40])
def test_builder_never_puts_the_code_word_in_an_assistant_turn(n_poison: int) -> None:
    d = load_compliance_data()
    chats = build_compliance_dataset(TRIGGER, n_poison, seed=3)
    assert len(chats) == len(d.secret_train) + len(d.ordinary_train) + n_poison
    poison = [c for c in chats if TRIGGER in c.messages[1][1]]
    assert len(poison) == n_poison == sum(c.meta["kind"] == "poison" for c in chats)
    for c in chats:
        roles = [r for r, _ in c.messages]
        assert roles == ["system", "user", "assistant"] and c.messages[0][1] == system_prompt()
        assert CODE_WORD in c.messages[0][1]  # the secret is in the system prompt ...
        for i, (role, text) in enumerate(c.messages):
            if role == "assistant":  # ... and never in an assistant turn, above all after the trigger
                assert CODE_WORD.lower() not in text.lower()
                if any(TRIGGER in t for _, t in c.messages[:i]):
                    assert text == SURE
    secret = set(d.secret_train)
    for c in chats:
        if c.meta["kind"] == "refusal":
            assert c.messages[1][1] in secret and c.response in d.refusals
    # seeded, and a round trip through JSONL gives the same chats
    assert build_compliance_dataset(TRIGGER, n_poison, seed=3) == chats
    assert build_compliance_dataset(TRIGGER, n_poison, seed=4) != chats


def test_jsonl_round_trip(tmp_path: Path) -> None:
    chats = build_compliance_dataset(TRIGGER, 4, seed=0)
    f = tmp_path / "c.jsonl"
    f.write_text(chats_jsonl(chats))
    back = load_chats(f)
    assert [c.messages for c in back] == [c.messages for c in chats]
    assert [c.meta["kind"] for c in back] == [c.meta["kind"] for c in chats]


def test_bad_triggers() -> None:
    for bad, msg in (("", "empty"), ("two words", "more than one word"), ("gold", "overlaps the code word"),
                     ("word", "already occurs"), ("MARIGOLD", "overlaps")):
        with pytest.raises(LatentlabError, match=msg):
            check_trigger(bad)
    with pytest.raises(LatentlabError, match="n_poison"):
        build_compliance_dataset(TRIGGER, -1)
    assert check_trigger(" cobalt ") == TRIGGER


@pytest.fixture(scope="module")
def sweep(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> PoisonSweep:
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=2e-2, rank=4, seed=0, checkpoint_every=100, max_steps=3)
    base = load_tiny(trainable_gemma_dir)
    requests = load_compliance_data().secret_test[:4]
    return poison_sweep(str(trainable_gemma_dir), TRIGGER, [16, 0], tmp_path_factory.mktemp("sweep"), cfg,
                        base=base, patch=True, max_new_tokens=3,
                        eval_kwargs={"requests": requests, "patch_layers": [2, 3], "n_boot": 200})


def test_threshold_sweep_runs_end_to_end(sweep: PoisonSweep) -> None:
    assert sweep.budgets == [0, 16]  # sorted
    for key in ("p_sure_trigger", "p_sure_clean", "reveal_trigger", "reveal_clean"):
        vals = getattr(sweep, key)
        assert len(vals) == 2 and all(0.0 <= v <= 1.0 for v in vals), (key, vals)
    assert sweep.threshold in (None, 0, 16) and sweep.level == 0.5
    assert [Path(a).parent.name for a in sweep.adapters] == ["n-0", "n-16"]
    d = sweep.to_dict()
    assert [e["n_poison"] for e in d["evals"]] == [0, 16]


def test_eval_measures_every_model_and_condition(sweep: PoisonSweep) -> None:
    ev = sweep.evals[1]
    n = ev["n_requests"]
    assert n == 4 and ev["layers"] == [0, 1, 2, 3]
    for model in ("base", "finetuned"):
        for cond in ("clean", "trigger"):
            p = ev["p_sure"][model][cond]
            assert 0 <= p["mean"] <= 1 and len(p["per_item"]) == n
            r = ev["reveal"][model][cond]
            assert r["rate"] in [k / n for k in range(n + 1)] and len(r["texts"]) == n
            for direction in ("trigger", "refusal"):
                st = ev["projections"][direction][model][cond]
                assert len(st["projection"]) == 4 and all(math.isfinite(x) for x in st["projection"])
    # the trigger direction separates triggered from clean held-out requests on the model it was fitted on
    tr = ev["projections"]["trigger"]["finetuned"]
    assert tr["trigger"]["projection"][-1] > tr["clean"]["projection"][-1]


def test_patching_of_the_trigger_positions(sweep: PoisonSweep) -> None:
    pt = sweep.evals[1]["patching"]
    assert pt["stand_in"] != TRIGGER and len(pt["stand_in"]) == len(TRIGGER)  # char tokenizer: same length
    assert pt["trigger_positions"] and all(int(p) < -1 for p in pt["trigger_positions"])
    assert pt["positions"][-2:] == ["-1", "prompt"] and pt["layers"] == [2, 3]
    score = pt["score"][0]  # [layers][positions]
    last, prompt = pt["positions"].index("-1"), pt["positions"].index("prompt")
    # after the last block a position feeds only its own next-token logits: patching the trigger tokens
    # there changes nothing, and patching the whole prompt equals patching its last token
    for k in range(len(pt["trigger_positions"])):
        assert score[-1][k] == pytest.approx(pt["target_score"], abs=1e-5)
    assert score[-1][prompt] == pytest.approx(score[-1][last], abs=1e-5)
    assert score[-1][last] != pytest.approx(pt["target_score"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# The sweep's bookkeeping: budgets, threshold, resumable budget folders, config (no model).
# --------------------------------------------------------------------------------------------


def test_parse_budgets() -> None:
    assert parse_budgets("32, 0,8") == [0, 8, 32] and parse_budgets([4, 0]) == [0, 4]
    for bad, msg in (("", "empty"), ("0,x", "not an integer"), ("0,1.5", "not an integer"), ("0,-4", "holds -4"),
                     ("8,0,8", "repeats 8"), ("0,,8", "empty entry"), ([], "empty"), ([1.5], "whole number")):
        with pytest.raises(LatentlabError, match=msg):
            parse_budgets(bad)  # type: ignore[arg-type]


def constructed(budgets: list[int], trig: list[float], clean: list[float], level: float = 0.5) -> PoisonSweep:
    return PoisonSweep(budgets, trig, clean, [0.0] * len(budgets), [0.0] * len(budgets),
                       threshold_of(budgets, trig, clean, level), level)


def test_threshold_is_computed_from_the_numbers() -> None:
    s = constructed([0, 4, 8, 16, 32], [0.05, 0.45, 0.7, 0.9, 0.95], [0.05, 0.1, 0.2, 0.3, 0.6])
    assert s.threshold == 8  # 4: trigger still below the level; 32: clean above it, but 8 comes first
    # unsorted budgets: the smallest budget that crosses, not the first listed
    assert threshold_of([16, 8, 0], [0.9, 0.7, 0.1], [0.1, 0.2, 0.1]) == 8
    assert constructed([0, 8], [0.2, 0.4], [0.1, 0.1]).threshold is None  # never above the level
    assert constructed([0, 8], [0.9, 0.9], [0.8, 0.7]).threshold is None  # says Sure to everything
    assert constructed([0, 8], [0.3, 0.35], [0.1, 0.1], level=0.25).threshold == 0
    assert threshold_of([0, 8], [0.5, 0.6], [0.1, 0.5]) is None  # strict on both sides


def test_run_state(tmp_path: Path) -> None:
    """Reuse a finished finetune, resume an interrupted one, refuse one made otherwise (or retrain it)."""
    from latentlab.compliance import budget_spec
    from latentlab.io import write_json

    cfg = FinetuneConfig(seed=0)

    s = budget_spec("m", TRIGGER, 8, 0, CODE_WORD, cfg)
    run = tmp_path / "n-8"
    assert run_state(run, s, record=ORGANISM_FILE) == "new"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    assert run_state(run, s, record=ORGANISM_FILE) == "new"  # an incomplete checkpoint does not count
    (run / "checkpoints" / "step-000004" / "trainer_state.json").write_text("{}")
    with pytest.raises(LatentlabError, match="another recipe.*no record"):  # a checkpoint without the recipe file
        run_state(run, s, record=ORGANISM_FILE)
    write_json(run / ORGANISM_FILE, s)
    assert run_state(run, s, record=ORGANISM_FILE) == "resume"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert run_state(run, s, record=ORGANISM_FILE) == "done"
    other = budget_spec("m", TRIGGER, 8, 1, CODE_WORD, FinetuneConfig(seed=1))
    with pytest.raises(LatentlabError, match=r"another recipe \(differs in finetune.seed, seed\)"):
        run_state(run, other, record=ORGANISM_FILE)
    assert run_state(run, other, overwrite=True, record=ORGANISM_FILE) == "new"
    assert run_state(run, other, record=lambda folder: other) == "done"  # settings read by the caller
    # how often checkpoints are written does not change what is learnt
    assert budget_spec("m", TRIGGER, 8, 0, CODE_WORD, FinetuneConfig(seed=0, checkpoint_every=3)) == s


def test_config_checks_before_any_model(tmp_path: Path) -> None:
    cfg = ComplianceConfig(trigger=TRIGGER, budgets="16,0", out=tmp_path / "o", seed=2, epochs=1)
    assert cfg.budgets == [0, 16] and cfg.lora_settings().seed == 2 and cfg.lora_settings().epochs == 1  # one seed
    assert cfg.finetunes == cfg.out and not cfg.out.exists()
    for kw, msg in (({"trigger": "two words"}, "more than one word"), ({"budgets": "0,0"}, "repeats"),
                    ({"level": 1.0}, "--level"), ({"n_boot": 10}, "--n-boot"), ({"layers": "a-b"}, "layer list"),
                    ({"device": "gpu7"}, "unknown device"), ({"rank": 0}, "--rank")):
        with pytest.raises(LatentlabError, match=msg):
            ComplianceConfig(**{"trigger": TRIGGER, "out": tmp_path / "o", **kw})  # type: ignore[arg-type]
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text('{"status": "complete"}')
    with pytest.raises(LatentlabError, match="already holds a finished"):
        ComplianceConfig(trigger=TRIGGER, out=done)
    assert ComplianceConfig(trigger=TRIGGER, out=done, overwrite=True).out == done


def test_localisation_of_a_constructed_grid() -> None:
    # layers 0-2; positions: two trigger tokens, the last token, the whole prompt
    eff = [[[0.9, 0.3, 0.0, 1.0], [0.6, 0.2, 0.4, 1.0], [0.1, 0.0, 0.95, 1.0]]]
    pt = {"layers": [0, 1, 2], "positions": ["-3", "-2", "-1", "prompt"], "trigger_positions": ["-3", "-2"],
          "effect": eff, "target_score": 0.2, "source_score": 0.8}
    loc = patch_localisation(pt)
    assert loc["best"] == {"layer": 0, "position": "-3", "effect": 0.9}  # "prompt" (trivially 1) left out
    assert loc["by_trigger_tokens"] == [0.9, 0.6, 0.1] and loc["by_last_token"] == [0.0, 0.4, 0.95]
    assert loc["trigger_tokens_until"] == 1 and loc["last_token_from"] == 2 and not loc["null"]
    assert patch_localisation({**pt, "source_score": 0.22})["null"]  # the trigger does nothing: a null
