"""latentlab.models: loading folders and adapters, layer selection, the built-in model cache."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_char_tokenizer, tiny_gemma_config

import latentlab
import latentlab.models as lm
from latentlab.errors import LatentlabError
from latentlab.io import fingerprint_weights, write_json

TEXTS = [
    "The stagecoach left at dawn.",
    "hi",
    "A considerably longer sentence, so that the sliding window of sixteen tokens is exceeded twice over.",
]


def _acts(model: Any) -> torch.Tensor:
    return latentlab.collect(model, TEXTS, layers="all", position="mean", progress=False).acts


# --------------------------------------------------------------------------------------------
# Loading a folder.
# --------------------------------------------------------------------------------------------


def test_load_folder_info(tiny_gemma: Any, tiny_llama: Any, tiny_gemma_dir: Path) -> None:
    g = tiny_gemma.info
    assert (tiny_gemma.n_layers, tiny_gemma.d_model) == (4, 64)
    assert (g.name, g.architecture, g.d_vocab, g.device, g.dtype) == (
        "tiny-gemma", "Gemma3ForCausalLM", 128, "cpu", "float32")
    assert g.path == str(tiny_gemma_dir)
    assert g.base_fingerprint == fingerprint_weights(tiny_gemma_dir)
    assert g.adapter is None and g.adapter_fingerprint is None
    assert g.has_chat_template is False  # a "base" model
    assert (tiny_llama.n_layers, tiny_llama.d_model, tiny_llama.info.architecture) == (3, 48, "LlamaForCausalLM")
    assert tiny_llama.info.has_chat_template is True  # an "instruct" model
    assert json.loads(json.dumps(g.to_dict()))["n_layers"] == 4  # recordable in a manifest
    assert "n_layers=4" in repr(tiny_gemma)
    assert isinstance(tiny_gemma.hf_model, torch.nn.Module) and not tiny_gemma.hf_model.training


@pytest.mark.parametrize("name", ["no-such-model", "gemma-3-27b"])
def test_unknown_model_names_the_builtins(name: str) -> None:
    with pytest.raises(LatentlabError) as ei:
        latentlab.load_model(name, progress=False)
    msg = str(ei.value)
    assert f"unknown model {name!r}" in msg
    assert "gemma-3-270m" in msg and "smollm2-135m-instruct" in msg


def test_folder_without_config_names_the_builtins(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LatentlabError) as ei:
        latentlab.load_model(str(tmp_path), progress=False)
    msg = str(ei.value)
    assert "no config.json" in msg and "gemma-3-270m" in msg and "smollm2-135m-instruct" in msg


def test_unreadable_folders_are_latentlab_errors(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{oops")
    empty = tmp_path / "empty-config"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_gemma_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    for folder in (bad_json, empty, no_weights):
        with pytest.raises(LatentlabError, match=f"cannot load model {folder}"):
            latentlab.load_model(str(folder), progress=False)


def test_folder_without_tokenizer_is_an_error(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """transformers 5 builds an empty tokenizer (every word -> <unk>) instead of failing."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gemma_dir, folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(LatentlabError, match="unknown tokens"):
        latentlab.load_model(str(folder), progress=False)


def test_ensure_builtin_unknown_name() -> None:
    with pytest.raises(LatentlabError, match="unknown built-in model 'nope'.*gemma-3-270m"):
        lm.ensure_builtin("nope")


def test_resolve_dtype_and_device() -> None:
    assert lm.resolve_dtype(None) is torch.float32
    assert lm.resolve_dtype("bf16") is torch.bfloat16
    assert lm.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(LatentlabError, match="unknown dtype 'float8'"):
        lm.resolve_dtype("float8")
    assert lm.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert lm.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(LatentlabError, match="no CUDA GPU"):
            lm.resolve_device("cuda")


# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------


def test_check_layers(tiny_gemma: Any) -> None:
    assert tiny_gemma.check_layers("all") == [0, 1, 2, 3]
    assert tiny_gemma.check_layers(None) == [0, 1, 2, 3]
    assert tiny_gemma.check_layers([3, -1, 0]) == [0, 3]  # negatives from the end, deduplicated, sorted
    assert tiny_gemma.check_layers("0,2-3") == [0, 2, 3]
    with pytest.raises(LatentlabError) as ei:
        tiny_gemma.check_layers([4])
    assert str(ei.value).startswith("layer 4 is out of range for tiny-gemma (4 layers: 0-3)")
    assert "between 0 and 3" in str(ei.value)
    with pytest.raises(LatentlabError, match="layer -5 is out of range"):
        tiny_gemma.check_layers("-5")


def test_check_layers_empty_selection_is_an_error(tiny_gemma: Any) -> None:
    with pytest.raises(LatentlabError, match="no layers"):
        tiny_gemma.check_layers([])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0,6,12", [0, 6, 12]), ("4-7", [4, 5, 6, 7]), ("all", list(range(18))), ("", list(range(18))),
     ("0, 4-6, -1", [0, 4, 5, 6, -1]), ("-3--1", [-3, -2, -1]), (" 5 ", [5])],
)
def test_parse_layers(spec: str, expected: list[int]) -> None:
    assert lm.parse_layers(spec, 18) == expected


@pytest.mark.parametrize("spec", ["a", "1.5", "0,,2", "3-", "1-2-3", "10-4"])
def test_parse_layers_rejects(spec: str) -> None:
    with pytest.raises(LatentlabError, match="layer"):
        lm.parse_layers(spec, 18)


# --------------------------------------------------------------------------------------------
# LoRA adapters.
# --------------------------------------------------------------------------------------------


def test_lora_side_by_side(tiny_gemma_dir: Path, gemma_lora_dir: Path, load_tiny: Any) -> None:
    base = load_tiny(tiny_gemma_dir)
    before = _acts(base)
    finetuned = load_tiny(tiny_gemma_dir, adapter=gemma_lora_dir)
    after = _acts(base)
    fresh = _acts(load_tiny(tiny_gemma_dir))
    tuned = _acts(finetuned)

    # the merge touched a copy: the base loaded first is exactly what a fresh load gives
    assert torch.equal(after, before) and torch.equal(after, fresh)
    # and the finetune really differs (layer 0 already: q/v of the first block are adapted)
    for col in range(4):
        diff = (tuned[:, col] - fresh[:, col]).abs().max().item()
        assert diff > 1e-3 * fresh[:, col].abs().max().item(), f"layer {col} unchanged by the adapter"

    info = finetuned.info
    assert info.adapter == str(gemma_lora_dir)
    assert info.adapter_fingerprint == lm.adapter_fingerprint(gemma_lora_dir)
    assert info.base_fingerprint == base.info.base_fingerprint
    assert "adapter=" in repr(finetuned)


def test_merged_weights_equal_peft_merge(tiny_gemma_dir: Path, gemma_lora_dir: Path, tiny_gemma_lora: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir)), str(gemma_lora_dir))
    ref = ref.merge_and_unload()
    # the bridge wraps each HF module in place: strip its wrapper from the parameter names
    got = {k.replace("._original_component", ""): v for k, v in tiny_gemma_lora.hf_model.state_dict().items()}
    for k, v in ref.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"],
                              AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir)).model.layers[0]
                              .self_attn.q_proj.weight)


def test_adapter_folder_without_config(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                       load_tiny: Any) -> None:
    broken = tmp_path / "broken-adapter"
    shutil.copytree(gemma_lora_dir, broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(LatentlabError, match="not a LoRA adapter folder"):
        load_tiny(tiny_gemma_dir, adapter=broken)
    with pytest.raises(LatentlabError, match="does not exist"):
        load_tiny(tiny_gemma_dir, adapter=tmp_path / "missing")


def test_adapter_for_other_architecture(tiny_gemma_dir: Path, tiny_llama_dir: Path, llama_lora_dir: Path,
                                        gemma_lora_dir: Path, load_tiny: Any) -> None:
    with pytest.raises(LatentlabError, match="does not fit tiny-gemma"):
        load_tiny(tiny_gemma_dir, adapter=llama_lora_dir)
    with pytest.raises(LatentlabError, match="does not fit tiny-llama"):
        load_tiny(tiny_llama_dir, adapter=gemma_lora_dir)


def test_adapter_recorded_for_another_base(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                           load_tiny: Any) -> None:
    other = tmp_path / "adapter"
    shutil.copytree(gemma_lora_dir, other)
    write_json(other / "latentlab_adapter.json", {"base_fingerprint": "0123456789abcdef"})
    with pytest.raises(LatentlabError, match="trained on another base model"):
        load_tiny(tiny_gemma_dir, adapter=other)
    write_json(other / "latentlab_adapter.json", {"base_fingerprint": fingerprint_weights(tiny_gemma_dir)})
    assert load_tiny(tiny_gemma_dir, adapter=other).info.adapter == str(other)


def test_foreign_adapter_naming_another_base_warns(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                                   load_tiny: Any) -> None:
    """An adapter without latentlab's fingerprint is checked by the base name peft recorded."""
    other = tmp_path / "adapter"
    shutil.copytree(gemma_lora_dir, other)
    (other / "latentlab_adapter.json").unlink(missing_ok=True)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "google/gemma-3-270m-it"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="names 'google/gemma-3-270m-it' as its base"):
        load_tiny(tiny_gemma_dir, adapter=other)
    cfg["base_model_name_or_path"] = str(tiny_gemma_dir)
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_tiny(tiny_gemma_dir, adapter=other)


# --------------------------------------------------------------------------------------------
# The built-in model cache (fake caches under a temporary LATENTLAB_HOME).
# --------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LATENTLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_cache(home: Path, name: str = "gemma-3-270m") -> Path:
    d = home / "models" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"w" * 5000)
    files = {p.name: p.stat().st_size for p in d.iterdir()}
    write_json(d / "latentlab_cache.json", {"format": lm.CACHE_FORMAT, "name": name, "files": files,
                                            "weights_fingerprint": fingerprint_weights(d)})
    return d


def test_latentlab_home_from_env(home: Path) -> None:
    assert lm.latentlab_home() == home
    assert lm.builtin_cache_dir("gemma-3-270m") == home / "models" / "gemma-3-270m"


def test_cache_status_ready_and_not_converted(home: Path) -> None:
    assert lm.cache_status("gemma-3-270m") == (False, "not converted yet")
    _fake_cache(home)
    assert lm.cache_status("gemma-3-270m") == (True, "ready")


def test_cache_status_missing_marker(home: Path) -> None:
    d = _fake_cache(home)
    (d / "latentlab_cache.json").unlink()
    ok, why = lm.cache_status("gemma-3-270m")
    assert not ok and "no completion marker" in why


def test_cache_status_wrong_size(home: Path) -> None:
    d = _fake_cache(home)
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"x")
    ok, why = lm.cache_status("gemma-3-270m")
    assert not ok and "model.safetensors" in why and "wrong size" in why


def test_cache_status_missing_file(home: Path) -> None:
    d = _fake_cache(home)
    (d / "config.json").unlink()
    ok, why = lm.cache_status("gemma-3-270m")
    assert not ok and "config.json" in why


def test_cache_status_same_size_other_content(home: Path) -> None:
    d = _fake_cache(home)
    (d / "model.safetensors").write_bytes(b"v" * 5000)
    ok, why = lm.cache_status("gemma-3-270m")
    assert not ok and "fingerprint" in why


def test_cache_status_bad_marker(home: Path) -> None:
    d = _fake_cache(home)
    (d / "latentlab_cache.json").write_text("{not json")
    assert lm.cache_status("gemma-3-270m") == (False, "cache marker is unreadable")
    write_json(d / "latentlab_cache.json", {"format": 999})
    assert lm.cache_status("gemma-3-270m") == (False, "cache was written by another latentlab version")


def test_list_models_reports_status(home: Path) -> None:
    _fake_cache(home)
    rows = {r["name"].split()[0]: r for r in lm.list_models()}
    assert set(rows) == {"gemma-3-270m", "smollm2-135m-instruct"}
    assert rows["gemma-3-270m"]["name"] == "gemma-3-270m (default)"
    assert rows["gemma-3-270m"]["status"] == "ready"
    assert rows["smollm2-135m-instruct"]["status"] in ("not converted yet",) or "package missing" in \
        rows["smollm2-135m-instruct"]["status"]
    assert rows["smollm2-135m-instruct"]["chat"] is True and rows["gemma-3-270m"]["chat"] is False


def _assert_nothing_left(home: Path, name: str) -> None:
    models = home / "models"
    assert not (models / name).exists(), "an interrupted conversion left a final cache folder"
    leftovers = [p.name for p in models.iterdir() if p.suffix != ".lock"] if models.exists() else []
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def test_interrupted_conversion_in_locate(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Path] = {}

    def interrupted(spec: Any, workdir: Path) -> Path:
        seen["tmp"] = workdir
        (workdir / spec.gguf_name).write_bytes(b"half a gguf")  # partial work in the temp folder
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.builtin, "_locate_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.ensure_builtin("gemma-3-270m", progress=False)
    assert seen["tmp"].parent == home / "models" and not seen["tmp"].exists()
    _assert_nothing_left(home, "gemma-3-270m")
    assert lm.cache_status("gemma-3-270m") == (False, "not converted yet")


def test_interrupted_conversion_in_tokenizer(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def fake_locate(spec: Any, workdir: Path) -> Path:
        p = workdir / spec.gguf_name
        p.write_bytes(b"gguf")
        return p

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.builtin, "_locate_gguf", fake_locate)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.ensure_builtin("smollm2-135m-instruct", progress=False)
    _assert_nothing_left(home, "smollm2-135m-instruct")


def test_conversion_pipeline_with_a_fake_gguf(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole convert -> verify -> load path, with a tiny model standing in for the dequantised GGUF."""
    import transformers

    def fake_locate(spec: Any, workdir: Path) -> Path:
        p = workdir / spec.gguf_name
        p.write_bytes(b"gguf bytes")
        return p

    def fake_tokenizer(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("gguf_file") == "gemma-3-270m-q4_k_m.gguf"
        return make_char_tokenizer()

    def fake_model(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("gguf_file") == "gemma-3-270m-q4_k_m.gguf"
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(tiny_gemma_config())
        m.config.quantization_config = {"quant_method": "gguf"}  # what save_pretrained refuses
        return m

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with monkeypatch.context() as mp:
        mp.setattr(lm.builtin, "_locate_gguf", fake_locate)
        mp.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
        path = lm.ensure_builtin("gemma-3-270m", progress=False)

    assert path == home / "models" / "gemma-3-270m"
    assert lm.cache_status("gemma-3-270m") == (True, "ready")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "latentlab_cache.json"} <= names
    assert "gemma-3-270m-q4_k_m.gguf" not in names  # the intermediate is not kept
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sorted(p.name for p in (home / "models").iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]

    model = latentlab.load_model("gemma-3-270m", progress=False)  # from the cache, no conversion
    assert (model.info.name, model.n_layers, model.d_model) == ("gemma-3-270m", 4, 64)
    marker = json.loads((path / "latentlab_cache.json").read_text())
    assert model.info.base_fingerprint == marker["weights_fingerprint"]

    # a damaged cache is rebuilt, never used
    with open(path / "model.safetensors", "ab") as f:
        f.write(b"junk")
    with monkeypatch.context() as mp:
        mp.setattr(lm.builtin, "_locate_gguf", fake_locate)
        mp.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
        with pytest.warns(UserWarning, match="rebuilding the cache"):
            lm.ensure_builtin("gemma-3-270m", progress=False)
    assert lm.cache_status("gemma-3-270m") == (True, "ready")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]


# Run in two processes at once by the test below: a fake conversion (tiny model for the dequantised GGUF)
# that records each time it runs and takes long enough for the other process to arrive meanwhile.
_CONVERTER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import torch, transformers
from conftest import make_char_tokenizer, tiny_gemma_config
import latentlab.models.builtin as b

count, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()

def fake_locate(spec, workdir):
    with open(count, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(2)
    p = workdir / spec.gguf_name
    p.write_bytes(b"gguf bytes")
    return p

def fake_model(*args, **kwargs):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(tiny_gemma_config())
    m.config.quantization_config = {"quant_method": "gguf"}
    return m

b._locate_gguf = fake_locate
transformers.AutoTokenizer.from_pretrained = lambda *a, **k: make_char_tokenizer()
transformers.AutoModelForCausalLM.from_pretrained = fake_model
while not go.exists():
    time.sleep(0.01)
print(b.ensure_builtin("gemma-3-270m", progress=False))
"""


def test_two_processes_convert_a_builtin_once(home: Path, tmp_path: Path) -> None:
    """Two processes (a study's workers on a shared LATENTLAB_HOME) converting one built-in into an empty
    cache at once: one converts under the lock, the other waits and reuses its cache; both succeed."""
    import os
    import subprocess
    import sys
    import time

    script, count, go = tmp_path / "convert.py", tmp_path / "conversions.txt", tmp_path / "go"
    script.write_text(_CONVERTER)
    env = {**os.environ, "LATENTLAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    tests = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(count), str(go), tests], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 240
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()  # both start converting together, once their imports are done
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == str(home / "models" / "gemma-3-270m")
    assert len(count.read_text().splitlines()) == 1  # exactly one conversion
    assert any("another process is converting gemma-3-270m" in err for _, err in outs)  # the other waited
    assert lm.cache_status("gemma-3-270m") == (True, "ready")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]
