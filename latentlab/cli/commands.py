"""The stage commands: models, collect, direction, probe, steer, finetune, shift, screen, patch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from latentlab.cli._common import (
    DEFAULT_BATTERY,
    AdapterOpt,
    DeviceOpt,
    DirectionOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    _command_line,
    _direction_for,
    _load,
    _pairs_source,
    app,
    console,
    out_console,
)
from latentlab.errors import LatentlabError


@app.command()
def collect(
    data: Annotated[str, typer.Option(help="JSONL file ({'text'} or chat lines) or a built-in dataset name.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    layers: Annotated[str, typer.Option(help="e.g. 0,6,12 or 4-10 or all.")] = "all",
    position: Annotated[str, typer.Option(help="last, mean, all, prompt_last or response_mean.")] = "last",
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    shard_size: Annotated[int, typer.Option(help="Examples per on-disk shard.")] = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Collect residual-stream activations into OUT/activations (safetensors + JSON)."""
    from latentlab.activations import POSITIONS
    from latentlab.activations import collect as do_collect
    from latentlab.data import dataset_hash, load_texts
    from latentlab.models import load_model
    from latentlab.runs import Run

    if position not in POSITIONS:
        raise LatentlabError(f"unknown position {position!r}", f"use one of {', '.join(POSITIONS)}")
    examples = load_texts(data)  # validate before loading a model
    run = Run.start(
        out,
        _command_line(),
        {
            "data": data,
            "model": model,
            "adapter": adapter,
            "layers": layers,
            "position": position,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
        },
    )
    m = load_model(model, adapter=adapter, device=device, dtype=dtype)
    run.add_model("model", m.info)
    layer_list = m.check_layers(layers)
    do_collect(
        m,
        examples,
        layer_list,
        position,
        batch_size=batch_size,
        out=run.out / "activations",
        shard_size=shard_size,
        meta={"dataset": str(data), "dataset_hash": dataset_hash(data)},
        load=False,
    )
    from latentlab.io import read_json

    info = read_json(run.out / "activations" / "activations.json")
    run.finish(
        results={
            "n_examples": info["n_examples"],
            "n_tokens": info["n_tokens"],
            "tokens_per_s": info["tokens_per_s"],
            "layers": layer_list,
        }
    )
    out_console.print(
        f"collected {info['n_examples']} examples x {len(layer_list)} layers ({position}) "
        f"at {info['tokens_per_s']:.0f} tok/s -> {run.out / 'activations'}"
    )


def _fit_run(
    out: Path,
    direction: str,
    model: str,
    adapter: Path | None,
    layers: str,
    position: str,
    method: str,
    device: str,
    dtype: str,
    extra_config: dict[str, Any],
) -> tuple[Any, Any, Any, Any]:
    """What `direction` and `probe` share: start the run, load the model, fit direction and probes."""
    from latentlab.directions import direction_and_probes
    from latentlab.runs import Run

    src = _pairs_source(direction)
    config = {"direction": direction, "model": model, "adapter": adapter, "layers": layers, "position": position,
              "method": method, **extra_config}
    run = Run.start(out, _command_line(), config)
    m = _load(model, adapter, device, dtype)
    run.add_model("model", m.info)
    d, report = direction_and_probes(m, src, m.check_layers(layers), position, method)  # type: ignore[arg-type]
    return run, m, d, report


@app.command()
def direction(
    direction: DirectionOpt = "era",
    out: OutOpt = Path("runs/direction"),
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    layers: Annotated[str, typer.Option(help="e.g. 0,6,12 or all.")] = "all",
    position: Annotated[str, typer.Option(help="last or mean (pairs with a prompt use the response mean).")] = "last",
    method: Annotated[str, typer.Option(help="mean_diff or pca.")] = "mean_diff",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Fit a direction (difference of means per layer) from contrast pairs; writes OUT/direction.safetensors."""
    run, _, d, report = _fit_run(out, direction, model, adapter, layers, position, method, device, dtype, {})
    d.save(run.out / "direction")
    run.finish(
        results={"layers": d.layers, "norms": d.vectors.norm(dim=-1).tolist(), "best_probe_layer": report.best_layer}
    )
    out_console.print(
        f"{d.name} direction over {len(d.layers)} layers -> {run.out / 'direction.safetensors'}"
        f" (best held-out probe layer {report.best_layer})"
    )


def _print_probe_table(report) -> None:  # noqa: ANN001
    table = Table(title="probe accuracy by layer (95% Wilson CI)")
    for col in ("layer", "k-fold CV", "held-out test"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(report.layers):
        cv = f"{report.cv_acc[i]:.2f} [{report.cv_ci[i][0]:.2f}, {report.cv_ci[i][1]:.2f}]"
        t = report.test_acc[i]
        ts = f"{t:.2f} [{report.test_ci[i][0]:.2f}, {report.test_ci[i][1]:.2f}]" if t is not None else "-"
        table.add_row(str(layer), cv, ts)
    out_console.print(table)


@app.command()
def probe(
    direction: DirectionOpt = "era",
    out: OutOpt = Path("runs/probe"),
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    layers: Annotated[str, typer.Option(help="e.g. 0,6,12 or all.")] = "all",
    position: Annotated[str, typer.Option(help="last or mean.")] = "last",
    test: Annotated[Path | None, typer.Option(help="Extra contrast-pair JSONL to score the fitted probes on.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Fit a logistic-regression probe per layer; k-fold and held-out accuracy, plot by layer."""
    from latentlab.data import load_pairs
    from latentlab.directions import collect_pairs
    from latentlab.io import write_json
    from latentlab.plots import probe_accuracy_figure, save_figure

    extra = load_pairs(test) if test is not None else None
    run, m, d, report = _fit_run(
        out, direction, model, adapter, layers, position, "mean_diff", device, dtype, {"test": test}
    )
    results = report.to_dict()
    if extra is not None:
        ep, en = collect_pairs(m, extra, d.layers, position)
        results["user_test"] = [
            {"layer": layer, "acc": a, "ci": ci} for layer, (a, ci) in zip(d.layers, report.score(ep, en))
        ]
    report.save(run.out / "probes")
    write_json(run.out / "results.json", results)
    save_figure(
        probe_accuracy_figure(report, f"{d.name} probe accuracy by layer ({m.info.name})"), run.out, "probe_accuracy"
    )
    run.finish(results={"best_layer": report.best_layer})
    _print_probe_table(report)
    out_console.print(f"best held-out layer: {report.best_layer}; results, probes and plot in {run.out}")


@app.command()
def steer(
    direction: DirectionOpt = "era",
    out: OutOpt = Path("runs/steer"),
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    layer: Annotated[
        str | None, typer.Option(help="Layer(s) to steer at, e.g. 12 or 10,12. Default: chosen by a layer screen.")
    ] = None,
    coeffs: Annotated[
        str, typer.Option(help="Comma-separated alphas (x typical residual norm).")
    ] = "-1,-0.5,-0.25,0,0.25,0.5,1",
    battery: Annotated[
        str | None, typer.Option(help="A/B battery JSONL (default: the direction's built-in battery).")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt for sample generations (repeatable).")] = None,
    positions: Annotated[str, typer.Option(help="all or generated: where the vector is added.")] = "all",
    n_random: Annotated[int, typer.Option(help="Norm-matched random directions as control.")] = 1,
    gen_alpha: Annotated[float, typer.Option(help="|alpha| for the sample generations.")] = 0.25,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per sample generation.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed for random controls and sampling.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Steer with a direction: battery score per coefficient vs a random control, and sample generations."""
    from latentlab.data import load_battery, render_prompt
    from latentlab.directions import Direction, direction_and_probes
    from latentlab.io import write_json
    from latentlab.plots import layer_screen_figure, probe_accuracy_figure, save_figure, steering_figure
    from latentlab.steering import Steer, candidate_layers, generate, screen_layers, sweep

    try:
        alphas = [float(c) for c in coeffs.split(",") if c.strip()]
    except ValueError:
        raise LatentlabError(f"cannot read --coeffs {coeffs!r}", "use e.g. --coeffs -1,-0.5,0,0.5,1") from None
    if positions not in ("all", "generated"):
        raise LatentlabError(f"--positions {positions!r} is not all or generated", "use --positions all or generated")
    saved = Path(direction).suffix == ".safetensors"
    src = None if saved else _pairs_source(direction)
    battery = battery or DEFAULT_BATTERY.get(direction)
    if battery is None:
        raise LatentlabError(f"no default battery for --direction {direction}", "pass --battery FILE.jsonl")
    items = load_battery(battery)
    from latentlab.runs import Run

    run = Run.start(
        out,
        _command_line(),
        {
            "direction": direction,
            "model": model,
            "adapter": adapter,
            "layer": layer,
            "coeffs": alphas,
            "battery": battery,
            "positions": positions,
            "n_random": n_random,
            "seed": seed,
        },
        seed=seed,
    )
    m = _load(model, adapter, device, dtype)
    run.add_model("model", m.info)
    report = None
    if saved:
        d = Direction.load(direction)
    else:
        console.print(f"fitting the {direction} direction and probes on {m.info.name} ...")
        d, report = direction_and_probes(m, src, "all")
        d.save(run.out / "direction")
        report.save(run.out / "probes")
        save_figure(
            probe_accuracy_figure(report, f"{d.name} probe accuracy by layer ({m.info.name})"),
            run.out,
            "probe_accuracy",
        )
    eval_items, screen = items, None
    if layer is None:
        dev = items[::4]
        eval_items = [it for i, it in enumerate(items) if i % 4 != 0]
        probe_acc = None
        if report is not None:
            probe_acc = [t if t is not None else c for t, c in zip(report.test_acc, report.cv_acc)]
        cands = [c for c in candidate_layers(m.n_layers, probe_acc) if c in d.layers]
        console.print(
            f"screening layers {cands} on {len(dev)} dev battery items "
            f"(reported scores use the other {len(eval_items)}) ..."
        )
        screen = screen_layers(m, d, dev, cands)
        chosen = [max(screen, key=screen.get)]
        save_figure(
            layer_screen_figure(
                list(screen), list(screen.values()), [probe_acc[c] for c in screen] if probe_acc else None, chosen[0]
            ),
            run.out,
            "layer_screen",
        )
        console.print(
            f"chosen layer {chosen[0]} (largest score(+0.5) - score(-0.5) on dev items: {screen[chosen[0]]:+.3f})"
        )
    else:
        from latentlab.models import parse_layers

        chosen = m.check_layers(parse_layers(layer, m.n_layers))
    result = sweep(m, d, eval_items, chosen, alphas, n_random=n_random, mode=positions, seed=seed)  # type: ignore[arg-type]
    # Sample generations, side by side.
    gen_prompts = prompt or [
        "How would you send an urgent message to a relative who lives far away?",
        "What invention has changed daily life the most?",
        "Describe a typical evening at home.",
    ]
    steer_obj = Steer.from_direction(d, chosen, positions)  # type: ignore[arg-type]
    gconds = [(steer_obj, -gen_alpha), (None, 0.0), (steer_obj, gen_alpha)]
    gens = generate(
        m, [render_prompt(p, m.tokenizer) for p in gen_prompts], gconds, max_new_tokens=max_new_tokens, seed=seed
    )
    results = {
        **result.to_dict(),
        "model": m.info.to_dict(),
        "battery": str(battery),
        "n_eval_items": len(eval_items),
        "layer_screen": screen,
        "chosen_layers": chosen,
        "direction_meta": d.meta,
        "probes": report.to_dict() if report else None,
        "generations": [
            {"prompt": p, **{f"alpha={a:+g}": gens[c][i] for c, (_, a) in enumerate(gconds)}}
            for i, p in enumerate(gen_prompts)
        ],
    }
    write_json(run.out / "results.json", results)
    save_figure(
        steering_figure(result, f"Steering {d.name} at layer {','.join(map(str, chosen))} ({m.info.name})"),
        run.out,
        "steering",
    )
    run.finish(results={"chosen_layers": chosen, "table": result.table()})
    # Console report.
    table = Table(
        title=f"{d.name} steering at layer {','.join(map(str, chosen))} on {m.info.name}: "
        f"battery score (mean over {len(eval_items)} items, bootstrap 95% CI)"
    )
    for col in ("alpha", f"{d.name} direction", "random direction"):
        table.add_column(col, justify="right")
    for row in result.table():
        r = f"{row['random']:.3f} [{row['random_ci'][0]:.2f}, {row['random_ci'][1]:.2f}]" if "random" in row else "-"
        table.add_row(f"{row['alpha']:+g}", f"{row['score']:.3f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]", r)
    out_console.print(table)
    gt = Table(title="sample generations (greedy)", show_lines=True)
    gt.add_column("prompt", max_width=28)
    for _, a in gconds:
        gt.add_column(f"alpha {a:+g}", max_width=36)
    for i, p in enumerate(gen_prompts):
        gt.add_row(p, *[gens[c][i].strip() for c in range(len(gconds))])
    out_console.print(gt)
    out_console.print(f"results.json, direction, probes and plots (HTML/PNG) in {run.out}")



@app.command()
def finetune(
    data: Annotated[str, typer.Option(help="old-birds, modern-birds, persona-facts, year-trigger, or a chat JSONL.")],
    out: OutOpt,
    model: ModelOpt = "gemma-3-270m",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-4,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 8,
    target_modules: Annotated[str, typer.Option(help="all-linear or e.g. q_proj,v_proj.")] = "all-linear",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 20,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (a quick run).")] = None,
    seed: Annotated[int, typer.Option(help="Seed (LoRA init and data order).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint in OUT.")] = False,
    monitor: Annotated[str | None, typer.Option(help="Directions to record at checkpoints, e.g. era,persona.")] = None,
    monitor_prompts: Annotated[str, typer.Option(help="Prompts for --monitor.")] = "unrelated",
    n_monitor: Annotated[int, typer.Option(help="How many monitor prompts.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Train a LoRA adapter (peft) with checkpoints, --resume, loss curve and optional latent monitoring."""
    from latentlab.data import load_chats, load_prompts
    from latentlab.finetune import FinetuneConfig
    from latentlab.finetune import finetune as do_finetune
    from latentlab.io import write_json
    from latentlab.plots import loss_figure, monitor_figure, save_figure
    from latentlab.runs import Run

    chats = load_chats(data)
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    cfg = FinetuneConfig(
        rank=rank,
        alpha=alpha,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        target_modules=targets,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
    )
    run = Run.start(
        out,
        _command_line(),
        {"data": data, "model": model, "finetune": cfg.__dict__, "resume": resume, "monitor": monitor},
        seed=seed,
    )
    dirs, prompts = None, None
    if monitor:
        cache: dict[str, object] = {}

        def get_model():  # noqa: ANN202
            if "m" not in cache:
                cache["m"] = _load(model, None, device, "float32")
            return cache["m"]

        found = [_direction_for(get_model, name.strip(), run.out) for name in monitor.split(",")]
        dirs = {d.name: d for d in found}
        prompts = load_prompts(monitor_prompts)[:n_monitor]
        cache.clear()
    try:
        res = do_finetune(
            model,
            chats,
            run.out,
            cfg,
            resume=resume,
            monitor=dirs,
            monitor_prompts=prompts,
            device=None if device == "auto" else device,
        )
    except KeyboardInterrupt:
        console.print(
            f"interrupted: complete checkpoints are in {run.out / 'checkpoints'}; "
            "continue with the same command plus --resume"
        )
        sys.exit(130)
    spe = -(-len(chats) // batch_size)
    save_figure(loss_figure(res.losses, spe, f"LoRA loss on {data} ({model})"), run.out, "loss")
    if dirs:
        for name, d in dirs.items():
            save_figure(
                monitor_figure(res.monitor["steps"], res.monitor["projections"][name], d.layers, name),
                run.out,
                f"monitor-{name}",
            )
    write_json(run.out / "results.json", {"losses": res.losses, "monitor": res.monitor, "seconds": res.seconds})
    run.finish(results={"final_loss": res.losses[-1], "steps": len(res.losses), "adapter": str(res.adapter)})
    out_console.print(
        f"adapter -> {res.adapter} ({len(res.losses)} steps, final loss {res.losses[-1]:.3f}, {res.seconds:.0f} s)"
    )


@app.command()
def shift(
    finetuned: Annotated[list[Path], typer.Option(help="Finetune run folder(s) or adapter folder(s) (repeatable).")],
    out: OutOpt = Path("runs/shift"),
    base: Annotated[str, typer.Option(help="Base model the adapters were trained on.")] = "gemma-3-270m",
    control: Annotated[list[Path] | None, typer.Option(help="Control finetune folder(s) (repeatable).")] = None,
    direction: DirectionOpt = "era",
    prompts: Annotated[str, typer.Option(help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")] = "unrelated",
    battery: Annotated[str | None, typer.Option(help="A/B battery (default: the direction's).")] = None,
    checkpoints: Annotated[bool, typer.Option(help="Analyse every checkpoint of the (single) finetune run.")] = False,
    n_random: Annotated[int, typer.Option(help="Random unit directions for the percentile.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed for random directions and bootstrap.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Per-layer shift of finetuned (and control) models along a direction on unrelated prompts."""
    from latentlab.data import load_battery, load_prompts
    from latentlab.io import write_json
    from latentlab.plots import battery_figure, cosine_figure, save_figure, shift_figure
    from latentlab.runs import Run
    from latentlab.shift import analyze_shift, checkpoint_adapters, resolve_adapter

    plist = load_prompts(prompts)
    bname = battery or DEFAULT_BATTERY.get(direction)
    items = load_battery(bname) if bname else None
    models: dict[str, Path] = {}
    if checkpoints:
        if len(finetuned) != 1:
            raise LatentlabError("--checkpoints takes exactly one --finetuned run", "pass one finetune run folder")
        models = checkpoint_adapters(finetuned[0])
    else:
        for f in finetuned:
            models[f"finetuned:{f.name}" if len(finetuned) > 1 else "finetuned"] = resolve_adapter(f)
    ctrls: dict[str, Path] = {}
    for c in control or []:
        ctrls[f"control:{c.name}" if len(control or []) > 1 else "control"] = resolve_adapter(c)
    if len(models) + len(ctrls) != len(finetuned if not checkpoints else models) + len(control or []):
        raise LatentlabError(
            "two --finetuned or --control folders share a name, so their results would overwrite each other",
            "give each run folder its own name",
        )
    run = Run.start(
        out,
        _command_line(),
        {
            "base": base,
            "finetuned": finetuned,
            "control": control,
            "direction": direction,
            "prompts": prompts,
            "battery": bname,
            "n_random": n_random,
        },
        seed=seed,
    )
    m = _load(base, None, device, "float32")
    run.add_model("base", m.info)
    d = _direction_for(m, direction, run.out)
    res = analyze_shift(m, models, d, plist, items, controls=ctrls, n_random=n_random, seed=seed)
    write_json(run.out / "results.json", res.to_dict())
    save_figure(shift_figure(res), run.out, "shift")
    save_figure(cosine_figure(res), run.out, "cosine")
    if res.battery:
        save_figure(battery_figure(res.battery, f"{d.name} battery score by model"), run.out, "battery")
    run.finish(results={"labels": [*models, *ctrls]})
    table = Table(title=f"shift along {d.name} (mean projection [95% CI], z vs {n_random} random directions)")
    table.add_column("layer", justify="right")
    for label in res.stats:
        table.add_column(label, justify="right")
        table.add_column("cos", justify="right")
    for i, layer in enumerate(res.layers):
        cells = []
        for st in res.stats.values():
            lo, hi = st["projection_ci"][i]
            cells += [
                f"{st['projection'][i]:+.1f} [{lo:+.1f}, {hi:+.1f}] z={st['z'][i]:+.1f}",
                f"{st['cosine'][i]:+.2f}",
            ]
        table.add_row(str(layer), *cells)
    out_console.print(table)
    if res.battery:
        out_console.print(
            "battery: "
            + ", ".join(f"{k} {v['score']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for k, v in res.battery.items())
        )
    out_console.print(f"results.json and plots in {run.out}")


@app.command()
def screen(
    data: Annotated[str, typer.Option(help="Finetuning data (built-in name or chat JSONL).")],
    out: OutOpt = Path("runs/screen"),
    model: ModelOpt = "gemma-3-270m",
    direction: DirectionOpt = "era",
    layer: Annotated[int | None, typer.Option(help="Layer to rank examples at (default: middle layer).")] = None,
    top: Annotated[int, typer.Option(help="How many top/bottom examples to print.")] = 8,
    device: DeviceOpt = "auto",
) -> None:
    """Score training examples by how far they push along a direction, before any training."""
    from latentlab.data import load_chats
    from latentlab.io import write_json
    from latentlab.runs import Run
    from latentlab.shift import screen_dataset

    chats = load_chats(data)
    run = Run.start(out, _command_line(), {"data": data, "model": model, "direction": direction, "layer": layer})
    m = _load(model, None, device, "float32")
    run.add_model("model", m.info)
    d = _direction_for(m, direction, run.out)
    res = screen_dataset(m, chats, d)
    li = layer if layer is not None else m.n_layers // 2
    li = m.check_layers([li])[0]
    col = d.layers.index(li)
    scores = [row[col] for row in res["per_example"]]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    res["ranked_at_layer"] = li
    res["ranking"] = [
        {
            "score": scores[i],
            "prompt": res["prompts"][i],
            "response": res["responses"][i],
            "own_response": res["own_responses"][i],
        }
        for i in order
    ]
    write_json(run.out / "results.json", res)
    from latentlab.plots import save_figure, screen_figure

    save_figure(
        screen_figure({data: res}, f"{data}: push along {d.name} before training ({m.info.name})"), run.out, "screen"
    )
    run.finish(results={"layer": li, "dataset_mean": res["mean"][col], "ci": res["ci"][col]})
    lo, hi = res["ci"][col]
    out_console.print(
        f"{data}: mean projection difference at layer {li}: {res['mean'][col]:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    )
    t = Table(title=f"examples pushing most (+) and least (-) along {d.name} at layer {li}")
    for c in ("score", "response", "model's own"):
        t.add_column(c)
    for i in order[:top] + order[-top:]:
        t.add_row(f"{scores[i]:+.1f}", res["responses"][i][:40], res["own_responses"][i][:40])
    out_console.print(t)


@app.command()
def patch(
    out: OutOpt = Path("runs/patch"),
    base: Annotated[str, typer.Option("--base", "--model", help="Base model (target run).")] = "gemma-3-270m",
    finetuned: Annotated[Path | None, typer.Option(help="Finetune run or adapter folder (source run).")] = None,
    battery: Annotated[str, typer.Option(help="era, persona or an A/B battery JSONL.")] = "era",
    direction: Annotated[
        str | None, typer.Option(help="Also patch only along this direction (era, persona, FILE).")
    ] = None,
    reverse: Annotated[bool, typer.Option(help="Patch base activations into the finetuned run instead.")] = False,
    clean_prefix: Annotated[
        str | None, typer.Option(help="Prompt-pair mode: prefix of the clean (source) prompts.")
    ] = None,
    corrupt_prefix: Annotated[
        str | None, typer.Option(help="Prompt-pair mode: prefix of the corrupted (target) prompts.")
    ] = None,
    layers: Annotated[str, typer.Option(help="e.g. all or 0-10.")] = "all",
    positions: Annotated[
        str, typer.Option(help="Position classes: all, prompt, -1, -2, ...")
    ] = "all,prompt,-1,-2,-3,-4",
    component: Annotated[str, typer.Option(help="resid, attn or mlp output.")] = "resid",
    n_items: Annotated[int, typer.Option(help="Battery items to use (the first N).")] = 24,
    seed: Annotated[int, typer.Option(help="Seed for the random-direction control.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Activation patching, layer x position: finetuned -> base (or clean -> corrupted prompts)."""
    from latentlab.data import load_battery
    from latentlab.io import write_json
    from latentlab.patching import patch_grid, prefixed
    from latentlab.plots import patch_heatmap_figure, patch_modes_figure, save_figure
    from latentlab.runs import Run

    items = load_battery(DEFAULT_BATTERY.get(battery, battery))[:n_items]
    pos = [p.strip() for p in positions.split(",") if p.strip()]
    pair_mode = clean_prefix is not None or corrupt_prefix is not None
    if pair_mode and (clean_prefix is None or corrupt_prefix is None):
        raise LatentlabError("prompt-pair patching needs both --clean-prefix and --corrupt-prefix", "pass both")
    if not pair_mode and finetuned is None:
        raise LatentlabError("nothing to patch from", "pass --finetuned DIR, or --clean-prefix and --corrupt-prefix")
    run = Run.start(
        out,
        _command_line(),
        {
            "base": base,
            "finetuned": finetuned,
            "battery": battery,
            "reverse": reverse,
            "direction": direction,
            "clean_prefix": clean_prefix,
            "corrupt_prefix": corrupt_prefix,
            "layers": layers,
            "positions": pos,
            "component": component,
            "n_items": len(items),
        },
        seed=seed,
    )
    m = _load(base, None, device, "float32")
    run.add_model("base", m.info)
    src, tgt, src_items, tgt_items = None, m, None, items
    if pair_mode:
        src_items, tgt_items = prefixed(items, clean_prefix or ""), prefixed(items, corrupt_prefix or "")
        labels = ("clean prompt", "corrupted prompt")
    else:
        ft = m.with_adapter(finetuned)  # type: ignore[arg-type]  # one base in memory, LoRA switched on
        run.add_model("finetuned", ft.info)
        src, tgt = (m, ft) if reverse else (ft, m)
        labels = ("base", "finetuned") if reverse else ("finetuned", "base")
    layer_list = m.check_layers(layers)
    full = patch_grid(
        tgt,
        tgt_items,
        source=src,
        source_items=src_items,
        layers=layer_list,
        positions=pos,
        component=component,
        seed=seed,
    )  # type: ignore[arg-type]
    results = {"full": full.to_dict(), "source": labels[0], "target": labels[1]}
    save_figure(
        patch_heatmap_figure(
            full, "full", f"Patching {labels[0]} -> {labels[1]} ({component}): 0 = {labels[1]}, 1 = {labels[0]}"
        ),
        run.out,
        "heatmap",
    )
    parts = [full]
    if direction is not None:
        d = _direction_for(m, direction, run.out)
        along = patch_grid(
            tgt,
            tgt_items,
            source=src,
            source_items=src_items,
            layers=layer_list,
            positions=[p for p in ("all", "prompt") if p in pos] or pos[:1],
            modes=("direction", "random"),
            direction=d,
            component=component,
            seed=seed,
        )
        results["direction_only"] = along.to_dict()
        parts.append(along)
    save_figure(patch_modes_figure(parts, "all" if "all" in pos else pos[0]), run.out, "by_layer")
    write_json(run.out / "results.json", results)
    run.finish(results={"target_score": full.target_score, "source_score": full.source_score})
    out_console.print(
        f"battery score: {labels[1]} (target) {full.target_score:.3f}, {labels[0]} (source) "
        f"{full.source_score:.3f}" + ("  [gap < 0.02: normalised effects are noise]" if full.meta["small_gap"] else "")
    )
    table = Table(title=f"normalised effect by layer (0 = {labels[1]}, 1 = {labels[0]})")
    table.add_column("layer", justify="right")
    for p in pos:
        table.add_column(f"full@{p}", justify="right")
    if len(parts) > 1:
        for p in parts[1].positions:
            table.add_column(f"dir@{p}", justify="right")
            table.add_column(f"rand@{p}", justify="right")
    for li, layer in enumerate(layer_list):
        cells = [f"{float(full.effect[0, li, pi]):+.2f}" for pi in range(len(pos))]
        if len(parts) > 1:
            a = parts[1]
            for pi in range(len(a.positions)):
                cells += [f"{float(a.effect[0, li, pi]):+.2f}", f"{float(a.effect[1, li, pi]):+.2f}"]
        table.add_row(str(layer), *cells)
    out_console.print(table)
    out_console.print(f"results.json, heatmap and by-layer plots in {run.out}")


