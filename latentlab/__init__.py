"""latentlab: a workbench for persona and era latents in language models.

The public API, usable from notebooks without the CLI::

    import latentlab as ll
    model = ll.load_model("gemma-3-270m")                 # or a hub id / local folder, adapter=...
    acts = ll.collect(model, "unrelated", layers="all", position="last")

Attributes are imported lazily so ``latentlab --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "latentlab.models",
    "LoadedModel": "latentlab.models",
    "ModelInfo": "latentlab.models",
    "list_models": "latentlab.models",
    "collect": "latentlab.activations",
    "ActivationSet": "latentlab.activations",
    "LatentlabError": "latentlab.errors",
    "Run": "latentlab.runs",
    "load_pairs": "latentlab.data",
    "load_battery": "latentlab.data",
    "load_texts": "latentlab.data",
    "load_chats": "latentlab.data",
    "render_prompt": "latentlab.data",
    "Direction": "latentlab.directions",
    "find_direction": "latentlab.directions",
    "direction_and_probes": "latentlab.directions",
    "fit_direction": "latentlab.directions",
    "fit_probes": "latentlab.probes",
    "ProbeReport": "latentlab.probes",
    "Steer": "latentlab.interventions",
    "sweep": "latentlab.steering",
    "generate": "latentlab.generation",
    "generate_samples": "latentlab.generation",
    "load_prompts": "latentlab.data",
    "Ablate": "latentlab.interventions",
    "score_conditions": "latentlab.scoring",
    "battery_score": "latentlab.scoring",
    "fitted_direction": "latentlab.directions",
    "load_sae": "latentlab.sae",
    "train_sae": "latentlab.sae",
    "SAETrainConfig": "latentlab.sae",
    "direction_latents": "latentlab.sae",
    "DirectionLatents": "latentlab.sae",
    "latent_shift": "latentlab.sae",
    "analyze_latent_shift": "latentlab.sae",
    "LatentShift": "latentlab.sae",
    "SAETrainRunConfig": "latentlab.stages.sae",
    "SAELatentsConfig": "latentlab.stages.sae",
    "SAEShiftConfig": "latentlab.stages.sae",
    "run_sae_train": "latentlab.stages.sae",
    "run_sae_latents": "latentlab.stages.sae",
    "run_sae_shift": "latentlab.stages.sae",
    "export_gguf": "latentlab.vectors",
    "import_vector": "latentlab.vectors",
    "sidecar_fields": "latentlab.vectors",
    "trigger_scan": "latentlab.triggers",
    "TriggerScan": "latentlab.triggers",
    "TriggerConfig": "latentlab.stages.trigger",
    "run_trigger": "latentlab.stages.trigger",
    "parse_values": "latentlab.triggers",
    "search_triggers": "latentlab.trigger_search",
    "TriggerSearch": "latentlab.trigger_search",
    "FindTriggerConfig": "latentlab.stages.find_trigger",
    "run_find_trigger": "latentlab.stages.find_trigger",
    "build_compliance_dataset": "latentlab.compliance",
    "compliance_eval": "latentlab.compliance",
    "ComplianceEval": "latentlab.compliance",
    "poison_sweep": "latentlab.compliance",
    "PoisonSweep": "latentlab.compliance",
    "ComplianceConfig": "latentlab.stages.compliance",
    "StudyConfig": "latentlab.study",
    "run_study": "latentlab.study",
    "load_recipe": "latentlab.study",
    "summarize_study": "latentlab.study",
    "run_compliance": "latentlab.stages.compliance",
    "ablate": "latentlab.ablation",
    "AblateConfig": "latentlab.stages.ablate",
    "AblationResult": "latentlab.ablation",
    "run_ablate": "latentlab.stages.ablate",
    "training_hooks": "latentlab.interventions",
    "parse_intervention": "latentlab.interventions",
    "diff_models": "latentlab.diff",
    "DiffConfig": "latentlab.stages.diff",
    "DiffResult": "latentlab.diff",
    "run_diff": "latentlab.stages.diff",
    "CollectConfig": "latentlab.stages.collect",
    "run_collect": "latentlab.stages.collect",
    "DirectionConfig": "latentlab.stages.direction",
    "ProbeConfig": "latentlab.stages.direction",
    "run_direction": "latentlab.stages.direction",
    "run_probe": "latentlab.stages.direction",
    "DirectionSpec": "latentlab.directions",
    "SteerConfig": "latentlab.stages.steer",
    "run_steer": "latentlab.stages.steer",
    "choose_layer": "latentlab.steering",
    "finetune": "latentlab.finetune",
    "LoraTrainer": "latentlab.finetune",
    "FinetuneConfig": "latentlab.stages.finetune",
    "LoraOptions": "latentlab.stages.finetune",
    "FinetuneRunConfig": "latentlab.stages.finetune",
    "run_finetune": "latentlab.stages.finetune",
    "analyze_shift": "latentlab.shift",
    "screen_dataset": "latentlab.shift",
    "ShiftConfig": "latentlab.stages.shift",
    "run_shift": "latentlab.stages.shift",
    "ScreenConfig": "latentlab.stages.shift",
    "run_screen": "latentlab.stages.shift",
    "patch_grid": "latentlab.patching",
    "PatchConfig": "latentlab.stages.patch",
    "run_patch": "latentlab.stages.patch",
    "JudgeConfig": "latentlab.stages.judge",
    "run_judge": "latentlab.stages.judge",
    "SampleConfig": "latentlab.stages.sample",
    "run_sample": "latentlab.stages.sample",
    "load_questions": "latentlab.sampling",
    "local_samples": "latentlab.sampling",
    "endpoint_samples": "latentlab.sampling",
    "SampleLog": "latentlab.sampling",
    "samples_page": "latentlab.sampling",
    "plots": "latentlab.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "plots":
        return importlib.import_module("latentlab.plots")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentlab' has no attribute {name!r}")
