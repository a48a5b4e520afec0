"""``latentlab sae train | latents | shift`` on tiny models: run folders, tables, plots, one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli, run_quietly
from conftest import make_lora_adapter
from safetensors.torch import load_file

from latentlab import plots
from latentlab.directions import Direction

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()
LAYER = 2


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


def read(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_sae")
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9))) for _ in range(30)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "empty.jsonl").write_text("\n")
    g = torch.Generator().manual_seed(0)
    Direction(torch.randn(4, 64, generator=g), [0, 1, 2, 3], torch.ones(4), name="marker").save(root / "dir")
    Direction(torch.randn(4, 48, generator=g), [0, 1, 2, 3], torch.ones(4), name="narrow").save(root / "narrow")
    nan = torch.randn(4, 64, generator=g)
    nan[LAYER, 3] = float("nan")
    Direction(nan, [0, 1, 2, 3], torch.ones(4), name="nan").save(root / "nan")
    Direction(torch.zeros(4, 64), [0, 1, 2, 3], torch.ones(4), name="zero").save(root / "zero")
    make_lora_adapter(tiny_gemma_dir, root / "control-lora", seed=11)
    return {
        "root": root,
        "prompts": root / "prompts.jsonl",
        "empty": root / "empty.jsonl",
        "direction": root / "dir.safetensors",
        "narrow": root / "narrow.safetensors",
        "nan": root / "nan.safetensors",
        "zero": root / "zero.safetensors",
        "control": root / "control-lora",
    }


TRAIN_ARGS = ["--d-sae", "64", "--k", "4", "--steps", "40", "--batch-size", "64", "--lr", "0.003", "--device", "cpu"]


@pytest.fixture(scope="module")
def sae_run(files: dict[str, Path], tiny_gemma_dir: Path) -> dict[str, Any]:
    """One ``latentlab sae train`` run shared by the tests below."""
    out = files["root"] / "sae-run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(plots._PNG_STATE, "ok", False)
        code, stdout, err = run_quietly(
            mp, "sae", "train", "--model", str(tiny_gemma_dir), "--data", str(files["prompts"]), "--layer", str(LAYER),
            "--out", str(out), *TRAIN_ARGS,
        )
    assert code == 0, err
    return {"out": out, "stdout": stdout}


def test_sae_train_writes_a_run_folder(sae_run: dict[str, Any], tiny_gemma_dir: Path) -> None:
    out = sae_run["out"]
    m = read(out, "manifest.json")
    assert m["status"] == "complete" and m["command"].startswith("latentlab sae train") and m["seed"] == 0
    assert m["config"]["layer"] == LAYER and m["config"]["d_sae"] == 64
    assert m["models"]["model"]["name"] == "tiny-gemma"
    assert {"cfg.json", "sae_weights.safetensors", "latentlab_sae.json"} <= {p.name for p in (out / "sae").iterdir()}
    side = read(out / "sae", "latentlab_sae.json")
    assert side["datasets"] == [str(Path(sae_run["out"]).parent / "prompts.jsonl")]
    assert side["dataset_kinds"] == ["prompts"] and side["layer"] == LAYER
    assert side["model"]["base_fingerprint"] == m["models"]["model"]["base_fingerprint"]
    res = read(out, "results.json")
    assert len(res["losses"]) == 40 and res["stats"]["final_loss"] < res["stats"]["initial_loss"]
    assert (out / "loss.html").exists()
    assert "explained variance" in sae_run["stdout"] and "dead latents" in sae_run["stdout"]


def test_sae_latents(sae_run: dict[str, Any], files: dict[str, Path], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lat"
    code, stdout, err = run_cli(monkeypatch, capsys, "sae", "latents", "--sae", str(sae_run["out"]), "--direction",
                                str(files["direction"]), "--k", "3", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    res = read(out, "results.json")
    assert res["layer"] == LAYER and res["direction"] == "marker" and res["d_sae"] == 64
    assert len(res["top_positive"]) == 3 and res["top_positive"][0]["cosine"] >= res["top_positive"][1]["cosine"]
    cos = load_file(str(out / "latents.safetensors"))["cosines"]
    assert cos.shape == (64,) and float(cos.max()) == pytest.approx(res["top_positive"][0]["cosine"])
    assert (out / "direction_latents.html").exists() and read(out, "manifest.json")["status"] == "complete"
    assert f"#{res['top_positive'][0]['latent']}" in stdout and "chance level" in stdout


def test_sae_shift(sae_run: dict[str, Any], files: dict[str, Path], tiny_gemma_dir: Path, gemma_lora_dir: Path,
                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shift"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "sae", "shift", "--base", str(tiny_gemma_dir), "--finetuned", str(gemma_lora_dir),
        "--control", str(files["control"]), "--sae", str(sae_run["out"] / "sae"), "--direction",
        str(files["direction"]), "--prompts", str(files["prompts"]), "--k", "5", "--n-boot", "200",
        "--out", str(out), "--device", "cpu")
    assert code == 0, err
    res = read(out, "results.json")
    assert res["comparisons"] == ["finetuned", "control", "finetuned - control"]
    assert res["primary"] == "finetuned - control" and len(res["top"]) == 5 and res["n_prompts"] == 30
    for row in res["top"]:
        for c in res["comparisons"]:
            lo, hi = row[c]["ci"]
            assert lo <= row[c]["mean_change"] <= hi
    for d in res["decomposition"].values():
        assert d["latent_term"] + d["error_term"] == pytest.approx(d["projection"], rel=1e-3, abs=1e-3)
    t = load_file(str(out / "latent_shift.safetensors"))
    assert t["finetuned-control.mean_change"].shape == (64,)
    assert (out / "latent_shift.html").exists() and (out / "decomposition.html").exists()
    m = read(out, "manifest.json")
    assert m["status"] == "complete" and set(m["models"]) == {"base", "finetuned", "control"}
    assert m["config"]["k"] == 5 and m["config"]["n_boot"] == 200 and m["config"]["control"] == str(files["control"])
    assert set(m["config"]) >= {"finetuned", "sae", "model", "direction", "prompts", "layer", "seed", "device", "dtype"}
    assert m["models"]["control"]["adapter"] == str(files["control"])
    assert "SAE error" in stdout and f"#{res['top'][0]['latent']}" in stdout


def test_sae_shift_nan_activations_are_one_line(sae_run: dict[str, Any], files: dict[str, Path],
                                                tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("latentlab.activations.last_token_acts",
                        lambda m, p, layers, progress=False: torch.full((len(p), len(layers), 64), float("nan")))
    code, _, err = run_cli(monkeypatch, capsys, "sae", "shift", "--base", str(tiny_gemma_dir), "--finetuned",
                           str(gemma_lora_dir), "--sae", str(sae_run["out"]), "--prompts", str(files["prompts"]),
                           "--out", str(tmp_path / "o"), "--device", "cpu")
    assert_one_line_error(code, err, "NaN")


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing_sae", ("does not exist", "Fix:")),
        ("wrong_layer", ("trained on layer 2", "--layer 2")),
        ("narrow_direction", ("width 48",)),
        ("empty_data", ("is empty",)),
        ("bad_architecture", ("--architecture",)),
        ("offline_release", ("cannot load pretrained SAE",)),
    ],
)
def test_sae_errors_are_one_line(case: str, needles: tuple[str, ...], sae_run: dict[str, Any],
                                 files: dict[str, Path], tiny_gemma_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sae, out = str(sae_run["out"]), str(tmp_path / "o")
    lat = ["sae", "latents", "--direction", str(files["direction"]), "--out", out, "--device", "cpu"]
    train = ["sae", "train", "--model", str(tiny_gemma_dir), "--layer", "1", "--out", out, *TRAIN_ARGS]
    args = {
        "missing_sae": [*lat, "--sae", str(tmp_path / "nope")],
        "wrong_layer": [*lat, "--sae", sae, "--layer", "1"],
        "narrow_direction": ["sae", "latents", "--direction", str(files["narrow"]), "--sae", sae, "--out", out],
        "empty_data": [*train, "--data", str(files["empty"])],
        "bad_architecture": [*train, "--architecture", "gated"],
        "offline_release": [*lat, "--sae", "no-such-release:layer_1"],
    }[case]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, *needles)


def test_sae_shift_on_a_model_of_another_width(sae_run: dict[str, Any], files: dict[str, Path],
                                               tiny_llama_dir: Path, llama_lora_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "sae", "shift", "--base", str(tiny_llama_dir), "--finetuned",
                           str(llama_lora_dir), "--sae", str(sae_run["out"]), "--prompts", str(files["prompts"]),
                           "--out", str(tmp_path / "o"), "--device", "cpu")
    assert_one_line_error(code, err, "width 64", "width 48")


def test_sae_help_lists_the_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "sae", "--help")
    assert code == 0 and all(c in out for c in ("train", "latents", "shift"))


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("latents_k0", ("k must be >= 1", "--k 1")),
        ("latents_few_random", ("n_random must be >= 20",)),
        ("latents_nan_direction", ("nan direction", "NaN")),
        ("latents_zero_direction", ("zero direction", "all zero")),
        ("shift_k0", ("k must be >= 1",)),
        ("shift_few_boot", ("n_boot must be >= 100",)),
        ("shift_nan_direction", ("nan direction", "NaN")),
        ("shift_zero_direction", ("zero direction", "all zero")),
        ("shift_narrow_direction", ("width 48", "width 64")),
        ("shift_missing_control", ("no-control", "Fix:")),
        ("shift_missing_finetuned", ("no-finetune", "Fix:")),
        ("train_k0", ("k must be >= 1",)),
        ("train_steps0", ("steps must be >= 1",)),
        ("train_bad_eval_fraction", ("eval_fraction",)),
        ("train_bad_device", ("unknown device",)),
    ],
)
def test_bad_inputs_fail_before_a_model_loads_and_leave_out_alone(
    case: str, needles: tuple[str, ...], sae_run: dict[str, Any], files: dict[str, Path], tiny_gemma_dir: Path,
    gemma_lora_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """One `error: ... Fix: ...` line, exit 2, no model loaded, and an existing --out folder as it was (a hidden
    file: a visible file of another tool is refused first, as test_bad_input's test_foreign_out_is_refused shows)."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / ".kept.json").write_text('{"kept": true}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_model(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("latentlab.models.load_model", no_model)
    sae = str(sae_run["out"])
    lat = ["sae", "latents", "--sae", sae, "--out", str(out), "--device", "cpu"]
    shift = ["sae", "shift", "--base", str(tiny_gemma_dir), "--sae", sae, "--prompts", str(files["prompts"]),
             "--out", str(out), "--device", "cpu"]
    ft = ["--finetuned", str(gemma_lora_dir)]
    train = ["sae", "train", "--model", str(tiny_gemma_dir), "--layer", "1", "--out", str(out), *TRAIN_ARGS]
    args = {
        "latents_k0": [*lat, "--direction", str(files["direction"]), "--k", "0"],
        "latents_few_random": [*lat, "--direction", str(files["direction"]), "--n-random", "5"],
        "latents_nan_direction": [*lat, "--direction", str(files["nan"])],
        "latents_zero_direction": [*lat, "--direction", str(files["zero"])],
        "shift_k0": [*shift, *ft, "--k", "0"],
        "shift_few_boot": [*shift, *ft, "--n-boot", "10"],
        "shift_nan_direction": [*shift, *ft, "--direction", str(files["nan"])],
        "shift_zero_direction": [*shift, *ft, "--direction", str(files["zero"])],
        "shift_narrow_direction": [*shift, *ft, "--direction", str(files["narrow"])],
        "shift_missing_control": [*shift, *ft, "--control", str(tmp_path / "no-control")],
        "shift_missing_finetuned": [*shift, "--finetuned", str(tmp_path / "no-finetune")],
        "train_k0": [*train, "--k", "0"],
        "train_steps0": [*train, "--steps", "0"],
        "train_bad_eval_fraction": [*train, "--eval-fraction", "1.5"],
        "train_bad_device": [*train[:-2], "--device", "tpu"],
    }[case]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, *needles)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_library_functions_run_a_command_from_a_notebook(sae_run: dict[str, Any], files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """run_sae_latents is what `latentlab sae latents` calls: same config, same run folder."""
    import latentlab as ll

    cfg = ll.SAELatentsConfig(sae=str(sae_run["out"]), direction=str(files["direction"]), k=2, out=tmp_path / "nb",
                              device="cpu")
    res = ll.run_sae_latents(cfg, progress=False)
    m = read(tmp_path / "nb", "manifest.json")
    assert m["status"] == "complete" and m["config"]["k"] == 2 and m["config"]["n_random"] == 200
    assert read(tmp_path / "nb", "results.json")["top_positive"] == json.loads(json.dumps(res.top_positive))
