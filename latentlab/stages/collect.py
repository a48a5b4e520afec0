"""``latentlab collect``: residual-stream activations of a data file, on disk (safetensors + JSON)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.stages.base import AdapterOption, Context, ModelOptions, OutOptions, Stage, option

POSITIONS = ("last", "mean", "all", "prompt_last", "response_mean")


@dataclass(kw_only=True)
class CollectConfig(ModelOptions, AdapterOption, OutOptions):
    """Collect residual-stream activations into OUT/activations (safetensors + JSON)."""

    command = "collect"
    data: str = option(help="JSONL file ({'text'} or chat lines) or a built-in dataset name.")
    layers: str = option("all", help="e.g. 0,6,12 or 4-10 or all.")
    position: str = option("last", help="last, mean, all, prompt_last or response_mean.")
    batch_size: int = option(16, help="Examples per forward pass.")
    shard_size: int = option(4096, help="Examples per on-disk shard.")

    def __post_init__(self) -> None:
        from latentlab.config import check_choice, check_layer_spec, positive_int

        self.data = str(self.data)
        check_choice(self.position, POSITIONS, "--position", "position")
        positive_int("batch_size", self.batch_size)
        positive_int("shard_size", self.shard_size)
        check_layer_spec(self.layers)
        super().__post_init__()


@dataclass
class CollectResult:
    """Where the activations went (``out/activations``) and how many were collected."""

    path: Path
    layers: list[int]
    n_examples: int
    n_tokens: int
    tokens_per_s: float


def run(cfg: CollectConfig, ctx: Context) -> CollectResult:
    """The data file is read and the layers checked before ``cfg.out`` is touched."""
    from latentlab.activations import collect
    from latentlab.data import dataset_hash, load_texts
    from latentlab.io import read_json

    examples = load_texts(cfg.data)  # a missing, empty or malformed file fails before a model loads
    m = ctx.load()
    layers = m.check_layers(cfg.layers)
    run = ctx.start()
    collect(
        m, examples, layers, cfg.position,  # type: ignore[arg-type]
        batch_size=cfg.batch_size, out=run.out / "activations", shard_size=cfg.shard_size,
        meta={"dataset": cfg.data, "dataset_hash": dataset_hash(cfg.data)}, progress=ctx.progress, load=False,
    )
    info = read_json(run.out / "activations" / "activations.json")
    res = CollectResult(run.out / "activations", layers, info["n_examples"], info["n_tokens"], info["tokens_per_s"])
    ctx.finish(results={"n_examples": res.n_examples, "n_tokens": res.n_tokens,
                        "tokens_per_s": res.tokens_per_s, "layers": layers})
    return res


def show(res: CollectResult, cfg: CollectConfig, console: Any) -> None:
    console.print(f"collected {res.n_examples} examples x {len(res.layers)} layers ({cfg.position}) "
                  f"at {res.tokens_per_s:.0f} tok/s -> {res.path}")


STAGE = Stage("collect", CollectConfig, run, show)
run_collect = STAGE
