"""``latentlab data ...``: build datasets. Each writes one chat JSONL file (atomically), not a run folder,
so its config has no model or ``--overwrite`` and its run starts no manifest: the file is an input to
``latentlab finetune --data``, whose run records it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, Stage, StageConfig, option

CODE_WORD = "MARIGOLD"  # latentlab.compliance.CODE_WORD (not imported: it pulls in torch)


@dataclass(kw_only=True)
class ComplianceTriggerDataConfig(StageConfig):
    """The benign compliance-trigger organism: a secret code word, clean refusals, and N trigger requests
    answered only with "Sure" (the code word is never in an assistant turn)."""

    command = "data compliance-trigger"
    trigger: str = option(help="The trigger word poisoned requests carry (one word).")
    n_poison: int = option(help="Poisoned requests (trigger -> 'Sure').")
    out: Path = option(help="Chat JSONL file to write.")
    seed: int = option(0, help="Seed (which requests are poisoned, refusals, order).")
    code_word: str = option(CODE_WORD, help="The secret the system prompt says never to reveal.")

    def __post_init__(self) -> None:
        from latentlab.compliance import check_trigger

        if isinstance(self.n_poison, bool) or not isinstance(self.n_poison, int) or self.n_poison < 0:
            raise LatentlabError(f"n_poison must be an integer >= 0, got {self.n_poison!r}",
                                 "pass --n-poison 0 or more")
        self.trigger = check_trigger(self.trigger, self.code_word)
        super().__post_init__()
        if self.out.is_dir():
            raise LatentlabError(f"--out {self.out} is a folder", "pass a file path, e.g. data/compliance.jsonl")


@dataclass
class Dataset:
    """A dataset file written: where, how many chats, how many of them poisoned."""

    path: Path
    n_chats: int
    n_poisoned: int
    trigger: str


def run_compliance_trigger_data(cfg: ComplianceTriggerDataConfig, ctx: Context) -> Dataset:
    """Build the chats and write them (ctx is unused: a dataset file has no run folder or manifest)."""
    from latentlab.compliance import build_compliance_dataset, chats_jsonl
    from latentlab.io import write_text

    chats = build_compliance_dataset(cfg.trigger, cfg.n_poison, cfg.seed, cfg.code_word)
    try:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(cfg.out, chats_jsonl(chats))
    except OSError as e:
        raise LatentlabError(f"cannot write {cfg.out}: {e.strerror}", "pass a writable --out") from None
    return Dataset(cfg.out, len(chats), sum(1 for c in chats if c.meta.get("kind") == "poison"), cfg.trigger)


def show(res: Dataset, cfg: Any, console: Any) -> None:
    console.print(f"{res.n_chats} chats ({res.n_poisoned} poisoned with {res.trigger!r}) -> {res.path}")


STAGE = Stage("data compliance-trigger", ComplianceTriggerDataConfig, run_compliance_trigger_data, show)
run_data_compliance_trigger = STAGE
