"""LoRA finetuning on tiny random models: exact resume, complete checkpoints, guards, monitoring.

The central promise of :mod:`latentlab.finetune` is that an interrupted run continued with
``resume=True`` ends with *the same adapter, bit for bit* as an uninterrupted run (on CPU). The
interruption is simulated with ``stop_after`` (which raises ``KeyboardInterrupt`` after that many
steps, as Ctrl-C would), *between* two checkpoints, so the resumed run has to replay a step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CHAT_TEMPLATE, assert_close_rel, make_char_tokenizer
from safetensors.torch import load_file

import latentlab
from latentlab.activations import ActivationSet, hf_last_token_acts
from latentlab.data import Chat, render_prompt
from latentlab.directions import Direction, fit_direction
from latentlab.errors import LatentlabError
from latentlab.finetune import IGNORE, FinetuneConfig, _tokenise, finetune, latest_checkpoint
from latentlab.io import fingerprint_weights

ADAPTER_FILE = "adapter_model.safetensors"
MONITOR_PROMPTS = ["hello there", "what is the time?", "tell me a long story about a cat and a dog and a bus", "x"]


def chats(n: int, response: Callable[[int], str] = lambda i: f"answer {i * 7} ok") -> list[Chat]:
    return [Chat((("user", f"question {i}?"), ("assistant", response(i)))) for i in range(n)]


def cfg(**kw: Any) -> FinetuneConfig:
    base = {"epochs": 2, "batch_size": 4, "checkpoint_every": 2, "rank": 2, "lr": 1e-2}
    return FinetuneConfig(**{**base, **kw})


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_FILE))


def synthetic_direction(layers: list[int], name: str, seed: int) -> Direction:
    """A direction of the tiny Gemma's width (64) fitted on synthetic activation sets."""
    g = torch.Generator().manual_seed(seed)
    pos = ActivationSet(torch.randn(6, len(layers), 64, generator=g) + 1.0, layers, "last")
    neg = ActivationSet(torch.randn(6, len(layers), 64, generator=g), layers, "last")
    return fit_direction(pos, neg, name=name)


@pytest.fixture(scope="module")
def monitor_dirs() -> dict[str, Direction]:
    return {"every": synthetic_direction([0, 1, 2, 3], "every", 0), "some": synthetic_direction([1, 3], "some", 1)}


@pytest.fixture(scope="module")
def runs(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         monitor_dirs: dict[str, Direction]) -> dict[str, Any]:
    """One uninterrupted run, and the same run stopped after step 3 (checkpoint at 2) then resumed."""
    root = tmp_path_factory.mktemp("finetune")
    data = chats(12)
    kw = {"monitor": monitor_dirs, "monitor_prompts": MONITOR_PROMPTS, "progress": False, "device": "cpu"}
    straight = finetune(str(tiny_gemma_dir), data, root / "straight", cfg(), **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_gemma_dir), data, root / "resumed", cfg(), stop_after=3, **kw)
    interrupted = {
        "checkpoints": sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir()),
        "has_adapter": (root / "resumed" / "adapter").exists(),
        "step2": adapter_tensors(root / "resumed" / "checkpoints" / "step-000002" / "adapter"),
    }
    resumed = finetune(str(tiny_gemma_dir), data, root / "resumed", cfg(), resume=True, **kw)
    return {"root": root, "straight": straight, "resumed": resumed, "interrupted": interrupted, "data": data}


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(runs: dict[str, Any]) -> None:
    straight, resumed, interrupted = runs["straight"], runs["resumed"], runs["interrupted"]
    # the interruption really happened between checkpoints, before any adapter was written
    assert interrupted["checkpoints"] == ["step-000002"] and not interrupted["has_adapter"]
    a, b = adapter_tensors(straight.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and training did move the adapter after the checkpoint it resumed from (equality is not trivial)
    assert any(not torch.equal(a[k], interrupted["step2"][k]) for k in a)
    assert len(straight.losses) == 6 and resumed.losses == straight.losses
    assert resumed.monitor == straight.monitor
    saved = json.loads((runs["root"] / "resumed" / "losses.json").read_text())
    assert saved["losses"] == straight.losses and saved["steps_per_epoch"] == 3


def test_checkpoints_are_complete(runs: dict[str, Any]) -> None:
    ck = runs["root"] / "straight" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    for p in ck.iterdir():
        state = json.loads((p / "trainer_state.json").read_text())
        step = int(p.name.split("-")[1])
        assert state["step"] == step and state["total_steps"] == 6 and len(state["losses"]) == step
        assert state["losses"] == runs["straight"].losses[:step]
        assert (p / "adapter" / ADAPTER_FILE).exists() and (p / "adapter" / "adapter_config.json").exists()
        assert (p / "optimizer.safetensors").exists() and (p / "optimizer.json").exists()
    assert not list(ck.glob(".step-tmp-*"))  # no temporary folder left behind
    assert latest_checkpoint(runs["root"] / "straight") == ck / "step-000006"
    final = adapter_tensors(ck / "step-000006" / "adapter")
    for k, v in adapter_tensors(runs["straight"].adapter).items():
        assert torch.equal(v, final[k])


def test_latest_checkpoint_ignores_a_half_written_one(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", out / "checkpoints")
    assert latest_checkpoint(out) == out / "checkpoints" / "step-000006"
    # a crash while writing step 8: adapter there, trainer_state.json (written last) missing
    half = out / "checkpoints" / "step-000008"
    shutil.copytree(out / "checkpoints" / "step-000006", half)
    (half / "trainer_state.json").unlink()
    (out / "checkpoints" / ".step-tmp-abc").mkdir()
    assert latest_checkpoint(out) == out / "checkpoints" / "step-000006"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_monitor_has_one_entry_per_checkpoint(runs: dict[str, Any], monitor_dirs: dict[str, Direction]) -> None:
    mon = runs["straight"].monitor
    assert mon["steps"] == [0, 2, 4, 6]
    assert set(mon["projections"]) == {"every", "some"}
    for name, d in monitor_dirs.items():
        rows = mon["projections"][name]
        assert len(rows) == 4 and all(len(r) == len(d.layers) for r in rows)
        assert all(torch.isfinite(torch.tensor(r)).all() for r in rows)
    assert mon["projections"]["every"][0] != mon["projections"]["every"][-1]  # training moved them


def test_monitor_values_match_collect(runs: dict[str, Any], monitor_dirs: dict[str, Direction],
                                      tiny_gemma_dir: Path, load_tiny: Callable[..., Any]) -> None:
    """Step 0 = the base model, the last entry = the final adapter, both measured through latentlab.collect."""
    mon = runs["straight"].monitor
    for step_idx, adapter in ((0, None), (-1, runs["straight"].adapter)):
        m = load_tiny(tiny_gemma_dir, adapter=adapter)
        rendered = [render_prompt(p, m.tokenizer) for p in MONITOR_PROMPTS]
        for name, d in monitor_dirs.items():
            acts = latentlab.collect(m, rendered, d.layers, "last", progress=False)
            expected = (acts.acts * d.units()).sum(-1).mean(0)
            got = torch.tensor(mon["projections"][name][step_idx])
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()), name


def test_losses_decrease_on_a_memorisable_dataset(trainable_gemma_dir: Path, tmp_path: Path) -> None:
    data = chats(8, lambda i: "Z Z Z Z Z Z")
    res = finetune(str(trainable_gemma_dir), data, tmp_path / "run",
                   FinetuneConfig(epochs=10, batch_size=4, lr=1e-2, rank=4, checkpoint_every=100), progress=False)
    assert len(res.losses) == 20
    assert res.losses[-1] < 0.2 * res.losses[0], res.losses
    assert sum(res.losses[-4:]) / 4 < sum(res.losses[:4]) / 4
    # one checkpoint: the last step always checkpoints, whatever checkpoint_every says
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000020"]


def test_resume_with_another_config_is_refused(runs: dict[str, Any], tiny_gemma_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", out / "checkpoints")
    with pytest.raises(LatentlabError, match="another config"):
        finetune(str(tiny_gemma_dir), runs["data"], out, cfg(lr=2e-2), resume=True, progress=False)
    # checkpoint_every does not change what is learnt: a different one is accepted
    res = finetune(str(tiny_gemma_dir), runs["data"], out, cfg(checkpoint_every=3), resume=True, progress=False)
    assert res.losses == runs["straight"].losses


def test_resume_with_other_data_is_refused(runs: dict[str, Any], tiny_gemma_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", out / "checkpoints")
    other = chats(12, lambda i: f"something else {i}")
    with pytest.raises(LatentlabError, match="other data"):
        finetune(str(tiny_gemma_dir), other, out, cfg(), resume=True, progress=False)


def test_resume_with_another_base_is_refused(runs: dict[str, Any], tmp_path: Path) -> None:
    from conftest import save_tiny_model, tiny_gemma_config

    other = save_tiny_model(tmp_path / "other-gemma", tiny_gemma_config(), seed=99)  # same shapes, same tokenizer
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", out / "checkpoints")
    with pytest.raises(LatentlabError, match="another base model"):
        finetune(str(other), runs["data"], out, cfg(), resume=True, progress=False)


def test_resume_is_exact_with_dropout(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """Dropout draws random masks: they must be the same whether or not the run was interrupted."""
    data, c = chats(12), cfg(dropout=0.1)
    straight = finetune(str(tiny_gemma_dir), data, tmp_path / "a", c, progress=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_gemma_dir), data, tmp_path / "b", c, progress=False, stop_after=3)
    resumed = finetune(str(tiny_gemma_dir), data, tmp_path / "b", c, progress=False, resume=True)
    assert resumed.losses == straight.losses
    a, b = adapter_tensors(straight.adapter), adapter_tensors(resumed.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_dropout = finetune(str(tiny_gemma_dir), data, tmp_path / "c", cfg(), progress=False)
    assert no_dropout.losses[1:] != straight.losses[1:]  # dropout really was on


def test_resume_without_complete_checkpoints(runs: dict[str, Any], tiny_gemma_dir: Path, tmp_path: Path) -> None:
    # checkpoints folder with only a half-written checkpoint: refused, nothing to continue from
    out = tmp_path / "half"
    half = out / "checkpoints" / "step-000002"
    shutil.copytree(runs["root"] / "straight" / "checkpoints" / "step-000002", half)
    (half / "trainer_state.json").unlink()
    with pytest.raises(LatentlabError, match="no complete checkpoint"):
        finetune(str(tiny_gemma_dir), runs["data"], out, cfg(), resume=True, progress=False)
    # an empty --out: resume has nothing to continue, so it trains from the start (same result)
    res = finetune(str(tiny_gemma_dir), runs["data"], tmp_path / "empty", cfg(), resume=True, progress=False)
    assert res.losses == runs["straight"].losses


def test_fresh_run_discards_old_checkpoints(runs: dict[str, Any], tiny_gemma_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "step-000099").mkdir()
    res = finetune(str(tiny_gemma_dir), runs["data"], out, cfg(epochs=1), progress=False)
    assert len(res.losses) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_nan_guard(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="loss became nan"):
        finetune(str(tiny_gemma_dir), chats(8), tmp_path / "run", cfg(lr=1e6, epochs=3, checkpoint_every=1),
                 progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_empty_dataset_is_refused(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="empty"):
        finetune(str(tiny_gemma_dir), [], tmp_path / "run", cfg(), progress=False)


def test_adapter_folder_records_its_base(runs: dict[str, Any], tiny_gemma_dir: Path, tiny_llama_dir: Path,
                                         load_tiny: Callable[..., Any], tiny_gemma: Any) -> None:
    adapter = runs["straight"].adapter
    assert adapter == runs["root"] / "straight" / "adapter"
    meta = json.loads((adapter / "latentlab_adapter.json").read_text())
    assert meta["base_fingerprint"] == fingerprint_weights(tiny_gemma_dir)
    assert meta["base"] == tiny_gemma_dir.name and meta["step"] == 6 and meta["config"]["rank"] == 2
    ft = load_tiny(tiny_gemma_dir, adapter=adapter)
    assert ft.info.adapter == str(adapter) and ft.info.adapter_fingerprint
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert not torch.allclose(ft.hf_model(ids).logits, tiny_gemma.hf_model(ids).logits)
    with pytest.raises(LatentlabError, match="another base model"):
        load_tiny(tiny_llama_dir, adapter=adapter)


def test_resid_by_layer_equals_collect(tiny_gemma_dir: Path, tiny_gemma: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_gemma_dir))
    prompts = [*MONITOR_PROMPTS, "a prompt long enough to run past the sixteen-token sliding window, twice over"]
    rendered = [render_prompt(p, tok) for p in prompts]
    got = hf_last_token_acts(hf, tok, rendered, torch.device("cpu"), batch_size=2)  # batches of mixed lengths
    expected = latentlab.collect(tiny_gemma, rendered, "all", "last", progress=False).acts
    assert got.shape == expected.shape == (len(prompts), 4, 64)
    assert_close_rel(got, expected, 1e-4)


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_tokenise_masks_the_prompt(chat_template: str | None) -> None:
    tok = make_char_tokenizer(chat_template)
    data = [Chat((("user", "hi?"), ("assistant", "yes ok"))),
            Chat((("user", "a longer question"), ("assistant", "no")))]
    rows = _tokenise(data, tok, max_length=256)
    for (ids, labels), chat in zip(rows, data):
        assert len(ids) == len(labels)
        n_masked = sum(1 for x in labels if x == IGNORE)
        assert labels[:n_masked] == [IGNORE] * n_masked and IGNORE not in labels[n_masked:]
        assert labels[n_masked:] == ids[n_masked:]
        # the masked part is exactly the rendered prompt (BOS once: added, or written by the template)
        prompt = render_prompt(chat.prompt_messages, tok)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids[1:n_masked]) == prompt.removeprefix("<bos>")
        trained = tok.decode(ids[n_masked:], skip_special_tokens=True)
        if chat_template is None:  # base model: " answer" + EOS, so it learns to stop
            assert trained == " " + chat.response and ids[-1] == tok.eos_token_id
        else:  # the template ends the turn itself; no extra EOS
            assert trained.startswith(chat.response) and tok.eos_token_id not in ids
    short = _tokenise(data[:1], tok, max_length=5)
    assert len(short[0][0]) == 5 and short[0][1][-1] != IGNORE  # truncated, still one trained token


def test_max_steps_stops_early_with_a_complete_adapter(runs: dict[str, Any], tiny_gemma_dir: Path,
                                                       tmp_path: Path) -> None:
    """A quick run (max_steps) ends like the full run's checkpoint at that step, adapter written."""
    res = finetune(str(tiny_gemma_dir), runs["data"], tmp_path / "short", cfg(max_steps=2), progress=False)
    assert len(res.losses) == 2 and res.steps_per_epoch == 3
    assert (res.adapter / ADAPTER_FILE).exists()
    ck2 = runs["root"] / "straight" / "checkpoints" / "step-000002" / "adapter"
    a, b = adapter_tensors(res.adapter), adapter_tensors(ck2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LatentlabError, match="max.steps"):
        finetune(str(tiny_gemma_dir), runs["data"], tmp_path / "bad", cfg(max_steps=0), progress=False)


def test_monitor_without_prompts_uses_the_builtin_unrelated_prompts(tiny_gemma_dir: Path, tmp_path: Path,
                                                                   monitor_dirs: dict[str, Direction]) -> None:
    from latentlab.plots import monitor_figure

    res = finetune(str(tiny_gemma_dir), chats(4), tmp_path / "m", cfg(epochs=1), monitor=monitor_dirs,
                   progress=False)
    assert res.monitor["steps"] == [0, 1]  # before training and at the final checkpoint
    assert len(res.monitor["projections"]["every"]) == 2
    fig = monitor_figure(res.monitor["steps"], res.monitor["projections"]["every"], [0, 1, 2, 3], "every",
                         show_layers=[1, 3])
    assert [t.name for t in fig.data] == ["L1", "L3"]
    with pytest.raises(LatentlabError, match="no monitor data"):
        monitor_figure([], [], [0], "every")
