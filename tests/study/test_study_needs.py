"""A study plan's dependencies: each step needs exactly the steps that write what it reads (its seed's
finetunes, the study's direction, its seed's shift for ``shift``/``peak`` layers), never another seed's."""

from __future__ import annotations

from pathlib import Path

from study_recipes import tiny_recipe

from latentlab.study import StudyConfig, plan_steps
from latentlab.study.runner import step_needs

ALL = ('[shift]\nn_random = 20\n[screen]\n[ablation]\nlayers = ["shift", "all", "peak"]\nn_random = 10\n'
       '[prevention]\nlayers = "shift"\n[diff]\nk = 5\nseeds = [0, 1]\n[patch]\nseeds = [1]\n'
       '[trigger]\nvalues = "1990:2000:5"\nn_prompts = 4\n')


def test_needs_follow_the_wiring(trainable_gemma_dir: Path, tmp_path: Path) -> None:
    rec = tiny_recipe(tmp_path, trainable_gemma_dir, ALL, seeds="[0, 1]")
    steps = plan_steps(StudyConfig(recipe=str(rec), out=tmp_path / "s", device="cpu"))
    needs = {st.key: set(st.needs or ()) for st in steps}
    assert all(st.needs is not None for st in steps)  # every step of these analyses declares its needs
    d = "direction"
    assert needs[d] == set() and needs["screen:old"] == {d} and needs["screen:new"] == {d}
    for s in (0, 1):
        old, new, abl = f"finetune:old-s{s}", f"finetune:new-s{s}", f"finetune:old-ablated-s{s}"
        assert needs[old] == needs[new] == set()
        assert needs[f"shift-s{s}"] == {old, new, d}
        assert needs[f"ablate-shift-s{s}"] == needs[f"ablate-peak-s{s}"] == {old, new, d, f"shift-s{s}"}
        assert needs[f"ablate-all-s{s}"] == {old, new, d}
        assert needs[abl] == {d, f"shift-s{s}"}  # prevention layers = "shift": read from that seed's shift
        assert needs[f"prevent-s{s}"] == {old, abl, new, d}
        assert needs[f"diff-s{s}"] == {old, new}  # no direction read
        assert needs[f"trigger-finetuned-s{s}"] == {old, d} and needs[f"trigger-control-s{s}"] == {new, d}
    assert needs["patch-s1"] == {"finetune:old-s1", d}
    for key, ks in needs.items():  # no step waits on another seed's work
        seed = key.rsplit("-s", 1)[-1] if "-s" in key else None
        assert all(k.rsplit("-s", 1)[-1] == seed for k in ks if "-s" in k and seed is not None), key
    # the plan's order satisfies them: every need is an earlier step
    order = [st.key for st in steps]
    assert all(order.index(k) < order.index(key) for key, ks in needs.items() for k in ks)


def test_external_runs_and_compliance_need_no_finetune_step(trainable_gemma_dir: Path, tmp_path: Path) -> None:
    """Finetunes the study did not train are no step's; compliance seeds are independent of each other."""
    rec = tmp_path / "c.toml"
    rec.write_text(f'name = "c"\nmodel = "{trainable_gemma_dir}"\nseeds = [0, 1]\n'
                   '[compliance]\ntrigger = "cobalt"\nbudgets = [0, 4]\nmax_steps = 2\nn_requests = 3\n')
    steps = plan_steps(StudyConfig(recipe=str(rec), out=tmp_path / "s", device="cpu"))
    assert {st.key: st.needs for st in steps} == {"compliance-s0": (), "compliance-s1": ()}
    assert {st.key: st.stage for st in steps} == {"compliance-s0": "compliance", "compliance-s1": "compliance"}


def test_undeclared_needs_wait_for_every_earlier_step() -> None:
    from latentlab.study.runner import Step

    def step(key: str, needs: tuple[str, ...] | None) -> Step:
        return Step(key, "x", Path(key), lambda: None, lambda c: None, needs=needs)

    got = step_needs([step("a", ()), step("b", ("a",)), step("c", None), step("d", ())])
    assert got == {"a": (), "b": ("a",), "c": ("a", "b"), "d": ()}
