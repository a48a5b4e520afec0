"""The family matrix: every common HF family through every stage, in float32 and bfloat16.

Each family is a tiny random model (2 layers, width 32, the char tokenizer) saved as a local HF
folder and loaded through the public ``latentlab.load_model(folder)``, as a researcher's own model
would be. Per (family, dtype) the stages are: load, collect (equal to HF hidden states), final
logits (equal to HF logits), direction + probes, steering sweep, generation, finetune 2 steps +
resume, load with the adapter merged, shift, patch, screen and SAE training. Models and finetunes
are shared per (family, dtype) so the whole matrix stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, save_tiny_family

import latentlab as ll
from latentlab import arch
from latentlab.data import BatteryItem, Chat
from latentlab.errors import LatentlabError

DTYPES = ("float32", "bfloat16")
CASES = [pytest.param(f, d, id=f"{f}-{d}") for f in FAMILIES for d in DTYPES]
# Joint-QKV families (GPT-2, Phi-3, GPT-NeoX): the bridge computes q/k/v from the fused weight
# without calling the module, so LoRA hooks cannot switch an adapter on; with_adapter falls back to
# a merged copy (with a warning), and shift must still give the right numbers.
SHIFT_CASES = CASES
# bf16 keeps 8 bits of mantissa: the bridge and HF run the same bf16 ops, but fused differently
TOL = {"float32": 1e-4, "bfloat16": 3e-2}

TEXTS = ["The telegraph office opened in 1850.", "A new email arrived.", "Steam engines and carriages.",
         "She checked her phone.", "Gas lamps lit the street.", "The laptop battery died."]
BATTERY = [BatteryItem("The best way to send a message is", " telegraph", " email"),
           BatteryItem("To cross town I take a", " carriage", " taxi"),
           BatteryItem("At night the street is lit by", " gas", " LEDs")]
CHATS = [Chat((("user", f"Name bird {i}."), ("assistant", name)))
         for i, name in enumerate(["Cock of the rock", "Ruddy duck", "Hedge sparrow", "Gray jay", "Sea-pie", "Puffin"])]


# --------------------------------------------------------------------------------------------
# Shared fixtures: one folder per family, one loaded model and one finetune per (family, dtype).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_family(root / f, f, seed=11) for f in FAMILIES}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [("A letter by telegraph.", "A message by email."), ("The horse-drawn carriage.", "The electric car."),
            ("Gas lamps at dusk.", "LED streetlights."), ("A steam locomotive.", "A bullet train."),
            ("He wound his pocket watch.", "He checked his smartwatch."), ("Candles on the desk.", "A desk lamp."),
            ("The town crier shouted.", "The news app buzzed."), ("Ink and quill.", "Keyboard and mouse.")]
    with open(p, "w") as f:
        for i, (a, b) in enumerate(rows):
            f.write(json.dumps({"positive": a, "negative": b, "split": "test" if i >= 6 else "train"}) + "\n")
    return p


_models: dict[tuple[str, str], Any] = {}
_finetunes: dict[tuple[str, str], Path] = {}
_directions: dict[tuple[str, str], Any] = {}


def _load(family_dirs: dict[str, Path], family: str, dtype: str, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ll.load_model(str(family_dirs[family]), device="cpu", dtype=dtype, progress=False, **kw)


@pytest.fixture
def model(family_dirs: dict[str, Path], request: pytest.FixtureRequest) -> Any:
    family, dtype = request.node.callspec.params["family"], request.node.callspec.params["dtype"]
    key = (family, dtype)
    if key not in _models:
        _models[key] = _load(family_dirs, family, dtype)
    return _models[key]


def _direction(model: Any, pairs_file: Path, key: tuple[str, str]) -> Any:
    if key not in _directions:
        _directions[key] = ll.direction_and_probes(model, pairs_file, progress=False)
    return _directions[key]


def _finetune(family_dirs: dict[str, Path], family: str, dtype: str, tmp: Path) -> Path:
    from latentlab.finetune import FinetuneConfig, finetune

    key = (family, dtype)
    if key not in _finetunes:
        cfg = FinetuneConfig(max_steps=2, batch_size=3, lr=5e-2, rank=2, alpha=4, checkpoint_every=1, epochs=1)
        out = tmp / f"ft-{family}-{dtype}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(KeyboardInterrupt):
                finetune(str(family_dirs[family]), CHATS, out, cfg, progress=False, stop_after=1, dtype=dtype)
            res = finetune(str(family_dirs[family]), CHATS, out, cfg, progress=False, resume=True, dtype=dtype)
        assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
        _finetunes[key] = res.adapter
    return _finetunes[key]


def _hf_reference(folder: Path, dtype: str, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(HF hidden states, last decoder layer output, logits) from the checkpoint's own class."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), attn_implementation="eager")
    captured: dict[str, torch.Tensor] = {}

    def grab(_m: Any, _a: Any, out: Any) -> None:
        captured["last"] = (out[0] if isinstance(out, tuple) else out).detach()

    h = arch.decoder_blocks(hf)[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        h.remove()
    return [x[0].float() for x in out.hidden_states], captured["last"][0].float(), out.logits[0].float()


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# The matrix.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_load(model: Any, family: str, dtype: str) -> None:
    assert model.n_layers == 2 and model.info.dtype == dtype
    assert next(model.hf_model.parameters()).dtype == getattr(torch, dtype)
    assert len(arch.decoder_blocks(model.hf_model)) == 2
    if family == "gemma3-mm":  # the language model is what is studied: no vision tower left
        assert model.info.source_architecture == "Gemma3ForConditionalGeneration"
        assert not any("vision" in n for n, _ in model.hf_model.named_modules())


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_collect_equals_hf(model: Any, family_dirs: dict[str, Path], family: str, dtype: str) -> None:
    text = TEXTS[0]
    acts = ll.collect(model, [text], layers="all", position="all", progress=False)
    ids = model.tokenizer(text)["input_ids"]
    hs, last, logits = _hf_reference(family_dirs[family], dtype, ids)
    got = acts.example(0)  # [seq, layers, d]
    for layer in range(model.n_layers - 1):
        _close(got[:, layer], hs[layer + 1], TOL[dtype])
    _close(got[:, -1], last, TOL[dtype])  # HF's last hidden state is after the final norm
    # the scoring path: final norm + unembedding (+ softcap) on the last block's output
    mine = arch.final_logits(model, last.to(getattr(torch, dtype)))
    _close(mine, logits, TOL[dtype])


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_direction_and_sweep(model: Any, pairs_file: Path, family: str, dtype: str) -> None:
    direction, report = _direction(model, pairs_file, (family, dtype))
    assert direction.vectors.shape[-1] == model.d_model and torch.isfinite(direction.vectors).all()
    res = ll.sweep(model, direction, BATTERY, layers=0, coeffs=(-1.0, 0.0, 1.0), n_random=1, progress=False)
    assert res.scores.shape == (3, len(BATTERY)) and torch.isfinite(res.scores).all()


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_generate(model: Any, pairs_file: Path, family: str, dtype: str) -> None:
    direction, _ = _direction(model, pairs_file, (family, dtype))
    steer = ll.Steer.from_direction(direction, 0)
    out = ll.generate(model, ["Hello", "The year is"], [(None, 0.0), (steer, 1.0)], max_new_tokens=4)
    assert len(out) == 2 and all(len(row) == 2 and all(isinstance(s, str) for s in row) for row in out)
    assert arch.stop_token_ids(model) >= {model.tokenizer.eos_token_id}


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_finetune_resume_and_merge(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                                   family: str, dtype: str) -> None:
    adapter = _finetune(family_dirs, family, dtype, tmp_path_factory.mktemp("ft"))
    assert (adapter / "adapter_model.safetensors").exists()
    base = _load(family_dirs, family, dtype)
    merged = _load(family_dirs, family, dtype, adapter=adapter)
    assert merged.info.adapter_fingerprint
    a = ll.collect(base, TEXTS[:2], layers=[-1], progress=False).layer(1)
    b = ll.collect(merged, TEXTS[:2], layers=[-1], progress=False).layer(1)
    assert not torch.equal(a, b)  # the 2 steps moved the model


@pytest.mark.parametrize(("family", "dtype"), SHIFT_CASES)
def test_shift(model: Any, family_dirs: dict[str, Path], pairs_file: Path,
               tmp_path_factory: pytest.TempPathFactory, family: str, dtype: str) -> None:
    from latentlab.shift import analyze_shift

    direction, _ = _direction(model, pairs_file, (family, dtype))
    adapter = _finetune(family_dirs, family, dtype, tmp_path_factory.mktemp("ft"))
    res = analyze_shift(model, {"ft": adapter}, direction, TEXTS[:4], battery=BATTERY, n_random=20,
                       progress=False)
    assert "ft" in res.stats


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_patch(model: Any, family: str, dtype: str) -> None:
    from latentlab.patching import patch_grid

    clean = [BatteryItem("The year is 1850. " + it.prompt, it.positive, it.negative) for it in BATTERY]
    corrupt = [BatteryItem("The year is 2024. " + it.prompt, it.positive, it.negative) for it in BATTERY]
    res = patch_grid(model, corrupt, source=model, source_items=clean, layers=[0, 1], progress=False)
    assert res.effect.shape[1] == 2 and torch.isfinite(res.score).all()


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_screen(model: Any, pairs_file: Path, family: str, dtype: str) -> None:
    from latentlab.shift import screen_dataset

    direction, _ = _direction(model, pairs_file, (family, dtype))
    out = screen_dataset(model, CHATS[:3], direction, max_new_tokens=3, progress=False)
    assert out


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_sae(model: Any, family: str, dtype: str) -> None:
    cfg = ll.SAETrainConfig(steps=4, batch_size=16, k=4, expansion=2, eval_fraction=0.2)
    res = ll.train_sae(model, TEXTS, layer=1, config=cfg, progress=False)
    assert res is not None


# --------------------------------------------------------------------------------------------
# Big-model loading: device maps, dtype defaults, one-line errors.
# --------------------------------------------------------------------------------------------


def test_device_map_equals_single_device(family_dirs: dict[str, Path]) -> None:
    """A per-module accelerate map (layers placed one by one) gives exactly the single-device result."""
    folder = family_dirs["llama"]
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    one = ll.load_model(str(folder), device="cpu", progress=False)
    mapped = ll.load_model(str(folder), device_map=dmap, progress=False)
    assert mapped.info.device_map and mapped.info.device == "cpu"
    a = ll.collect(one, TEXTS, layers="all", position="all", progress=False)
    b = ll.collect(mapped, TEXTS, layers="all", position="all", progress=False)
    assert torch.equal(a.layer(0), b.layer(0)) and torch.equal(a.layer(1), b.layer(1))
    # early stopping: only layer 0 requested still works across the map
    c = ll.collect(mapped, TEXTS, layers=[0], position="last", progress=False)
    d = ll.collect(one, TEXTS, layers=[0], position="last", progress=False)
    assert torch.equal(c.layer(0), d.layer(0))
    assert torch.equal(ll.sweep(one, _dir_of(one), BATTERY, 0, coeffs=(0.5,), n_random=0, progress=False).scores,
                       ll.sweep(mapped, _dir_of(mapped), BATTERY, 0, coeffs=(0.5,), n_random=0,
                                progress=False).scores)


def _dir_of(model: Any) -> Any:
    torch.manual_seed(0)
    n = model.n_layers
    return ll.Direction(torch.randn(n, model.d_model), list(range(n)), torch.ones(n), name="r")


def test_offload_and_missing_devices_are_refused(family_dirs: dict[str, Path]) -> None:
    folder = str(family_dirs["llama"])
    for where in ("meta", "disk"):
        with pytest.raises(LatentlabError, match=f"offloads part of the model to {where}"):
            ll.load_model(folder, device_map={"model": "cpu", "lm_head": where}, progress=False)
    with pytest.raises(LatentlabError, match="does not exist"):
        ll.load_model(folder, device_map={"": "cuda:7"}, progress=False)
    with pytest.raises(LatentlabError, match="does not exist"):
        ll.load_model(folder, device_map={"model": 3, "lm_head": 3}, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(LatentlabError, match="no CUDA GPU"):
            ll.load_model(folder, device="cuda", progress=False)


def test_dtype_defaults_and_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentlab.models import resolve_dtype

    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    assert resolve_dtype(None, "cuda") is torch.float32
    with pytest.raises(LatentlabError, match="V100 has no bfloat16"):
        resolve_dtype("bfloat16", "cuda")


def test_out_of_memory_at_load_is_one_line(family_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def oom(*a: Any, **k: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(LatentlabError, match="out of memory") as e:
        ll.load_model(str(family_dirs["llama"]), device="cpu", progress=False)
    assert "--device-map auto" in e.value.fix and "bfloat16" in e.value.fix


def test_adapter_with_foreign_targets_names_them(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    from conftest import make_lora_adapter

    adapter = make_lora_adapter(family_dirs["llama"], tmp_path / "lora", targets=("q_proj", "v_proj"))
    with pytest.raises(LatentlabError, match="q_proj, v_proj.*gpt2"):
        ll.load_model(str(family_dirs["gpt2"]), adapter=adapter, device="cpu", progress=False)


def test_finetune_with_missing_targets_names_them(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    from latentlab.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(max_steps=1, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LatentlabError, match="q_proj, v_proj do not exist.*c_attn"):
        finetune(str(family_dirs["gpt2"]), CHATS, tmp_path / "ft", cfg, progress=False)


def test_lora_target_facts(family_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(str(family_dirs["gpt2"]))
    phi3 = AutoModelForCausalLM.from_pretrained(str(family_dirs["phi3"]))
    assert arch.lora_fan_in_fan_out(gpt2) and not arch.lora_fan_in_fan_out(phi3)
    assert arch.attention_lora_targets(gpt2) == ["c_attn"] and arch.attention_lora_targets(phi3) == ["qkv_proj"]
    assert arch.default_lora_targets(gpt2) == "all-linear"


def test_unscoreable_family_is_one_line(model_free_stub: Any) -> None:
    with pytest.raises(LatentlabError, match="cannot score StubForCausalLM \\(stub\\): no final norm"):
        arch.final_logits(model_free_stub, torch.zeros(1, 4))
    with pytest.raises(LatentlabError, match="decoder blocks of StubForCausalLM \\(stub\\)"):
        arch.decoder_blocks(model_free_stub.hf_model)


@pytest.fixture
def model_free_stub() -> Any:
    from types import SimpleNamespace

    class Stub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(architectures=["StubForCausalLM"], model_type="stub", num_hidden_layers=2)
            self.head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    return SimpleNamespace(bridge=SimpleNamespace(), hf_model=Stub(), tokenizer=None)


# --------------------------------------------------------------------------------------------
# Chat templates that do not confound an era study.
# --------------------------------------------------------------------------------------------

# The system header of the Llama 3.1 template (date_string defaults to a fixed date; 3.2 to today).
LLAMA31 = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
    " + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# The generation-prompt part of the Qwen3 template.
QWEN3 = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def test_llama3_template_gets_no_date_by_default() -> None:
    from conftest import make_char_tokenizer

    from latentlab import data

    tok = make_char_tokenizer(LLAMA31)
    p = data.render_prompt("What year is it?", tok)
    assert "2024" not in p and "2023" not in p and "Date" not in p
    assert p.startswith("<bos><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>")
    s = data.render_prompt("What year is it?", tok, system="Be brief.")
    assert "<|end_header_id|>\n\nBe brief.<|eot_id|>" in s
    with pytest.warns(UserWarning, match="December 2023"):  # the template's own line stays when a date is asked
        dated = data.render_prompt("What year is it?", tok, date="1 Jan 1850")
    assert "Today Date: 1 Jan 1850" in dated
    ex = data.render_chat(Chat((("user", "Today Date: 1850?"), ("assistant", "Yes"))), tok)
    assert "Today Date: 1850?" in ex.text  # what the user wrote is never removed


def test_qwen3_template_renders_without_thinking() -> None:
    from conftest import make_char_tokenizer

    from latentlab import data

    tok = make_char_tokenizer(QWEN3)
    ex = data.render_chat(Chat((("user", "Hi"), ("assistant", "Hello"))), tok)
    assert ex.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ex.text == ex.prompt + "Hello"  # the response is the answer alone, as generation sees it


def test_injected_date_warns_once() -> None:
    from conftest import make_char_tokenizer

    from latentlab import data

    tok = make_char_tokenizer("{{ bos_token }}Today is 3 March 2026.\n{% for m in messages %}{{ m['content'] }}"
                              "{% endfor %}")
    with pytest.warns(UserWarning, match="writes a date"):
        data.render_prompt("The year is 1850.", tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.render_prompt("Again.", tok)  # once per template
        data.render_prompt("The year is 1850.", make_char_tokenizer(QWEN3))  # the user's own date: no warning


def test_rendered_example_for_manifests() -> None:
    from conftest import CHAT_TEMPLATE, make_char_tokenizer

    from latentlab import data

    tok = make_char_tokenizer(CHAT_TEMPLATE)
    r = data.rendered_example(CHATS[0], tok, system="S")
    assert r["format"] == "chat_template" and r["text"].startswith(r["prompt"])
    assert r["prompt"] == "<bos><|system|>S\n<|user|>Name bird 0.\n<|assistant|>"
    base = data.rendered_example("Hi", make_char_tokenizer())
    assert base == {"text": "Q: Hi\nA:", "prompt": "Q: Hi\nA:", "format": "qa"}
