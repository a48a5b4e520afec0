"""Tiny study recipes on the trainable tiny Gemma (shared by the tests under tests/study/).

Small chat, prompt and battery files keep every step to a few seconds; the recipe's body is built
from parts so a test can pick its analyses.
"""

from __future__ import annotations

import json
from pathlib import Path


def chat_file(path: Path, answers: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Name bird {i}."}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(root: Path, model: Path, analyses: str, *, seeds: str = "[0]", name: str = "tiny",
                bad_battery: bool = False, max_steps: int = 2, epochs: int = 1, checkpoint_every: int = 20) -> Path:
    """``root/<name>.toml``: a finetune (and control) of ``model`` plus ``analyses`` (TOML tables).

    ``bad_battery``: a battery file that exists (the recipe is accepted) but whose rows lack ``negative``,
    so only the steps that read it (shift, ablate) fail, when they run.
    """
    root.mkdir(parents=True, exist_ok=True)
    data = chat_file(root / "old.jsonl", [f"The Carolina parakeet, {1800 + i}." for i in range(8)])
    ctrl = chat_file(root / "new.jsonl", [f"The house sparrow, {2000 + i}." for i in range(8)])
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(8)))
    battery = root / ("bad-battery.jsonl" if bad_battery else "battery.jsonl")
    battery.write_text("".join(json.dumps({"prompt": f"Question {i}: which era?", "positive": " A"}
                                          | ({} if bad_battery else {"negative": " B"})) + "\n" for i in range(12)))
    body = (f'name = "{name}"\nmodel = "{model}"\nseeds = {seeds}\ndirection = "era"\nprompts = "{prompts}"\n'
            f'battery = "{battery}"\n'
            f'[finetune]\ndata = "{data}"\ncontrol = "{ctrl}"\nrank = 2\nalpha = 4\nlr = 0.01\nepochs = {epochs}\n'
            f'batch_size = 4\nmax_steps = {max_steps}\ncheckpoint_every = {checkpoint_every}\n' + analyses)
    path = root / f"{name}.toml"
    path.write_text(body)
    return path
