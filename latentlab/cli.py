"""``latentlab`` command line: a thin layer over the library.

Each command parses options, calls the library function a notebook would call, and writes a run
folder. Problems the user can fix come out as one line (``error: ... Fix: ...``) with exit code 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from latentlab.errors import LatentlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="latentlab: find, measure and steer era and persona latents in language models.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
_DEBUG = {"on": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, hub id or local HF folder.")]
AdapterOpt = Annotated[Path | None, typer.Option(help="PEFT LoRA adapter folder to merge into a copy of the model.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (CUDA when present).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _DEBUG["on"] = debug
    if not debug:
        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)


def _command_line() -> str:
    return "latentlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def models() -> None:
    """List the built-in models, whether each is ready, and its size."""
    from latentlab.models import latentlab_home, list_models

    table = Table(title=f"built-in models (cache: {latentlab_home()})")
    for col in ("name", "ready", "status", "GGUF MB", "cache MB", "chat", "description"):
        table.add_column(col)
    for r in list_models():
        ready = "yes" if r["status"] == "ready" else "no"
        table.add_row(
            r["name"],
            ready,
            r["status"],
            str(r["gguf_mb"]),
            str(r["cache_mb"]),
            "yes" if r["chat"] else "no",
            r["description"],
        )
    out_console.print(table)


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


DirectionOpt = Annotated[
    str, typer.Option(help="era, persona, a contrast-pair JSONL, or a saved direction .safetensors.")
]
OutOpt = Annotated[Path, typer.Option(help="Run folder to write.")]
DEFAULT_BATTERY = {"era": "era-battery", "persona": "persona-battery"}


def _pairs_source(direction: str) -> str:
    from latentlab.data import BUILTIN_DATASETS

    if direction in BUILTIN_DATASETS or Path(direction).suffix == ".jsonl":
        return direction
    raise LatentlabError(
        f"--direction {direction!r} is neither a built-in (era, persona) nor a .jsonl contrast-pair file",
        "pass era, persona, FILE.jsonl, or a saved direction FILE.safetensors",
    )


def _load(model: str, adapter: Path | None, device: str, dtype: str):  # noqa: ANN202
    from latentlab.models import load_model

    return load_model(model, adapter=adapter, device=device, dtype=dtype)


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
    from latentlab.directions import direction_and_probes
    from latentlab.runs import Run

    src = _pairs_source(direction)
    run = Run.start(
        out,
        _command_line(),
        {
            "direction": direction,
            "model": model,
            "adapter": adapter,
            "layers": layers,
            "position": position,
            "method": method,
        },
    )
    m = _load(model, adapter, device, dtype)
    run.add_model("model", m.info)
    d, report = direction_and_probes(m, src, m.check_layers(layers), position, method)  # type: ignore[arg-type]
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
    from latentlab.directions import collect_pairs, direction_and_probes
    from latentlab.io import write_json
    from latentlab.plots import probe_accuracy_figure, save_figure
    from latentlab.runs import Run

    src = _pairs_source(direction)
    extra = load_pairs(test) if test is not None else None
    run = Run.start(
        out,
        _command_line(),
        {
            "direction": direction,
            "model": model,
            "adapter": adapter,
            "layers": layers,
            "position": position,
            "test": test,
        },
    )
    m = _load(model, adapter, device, dtype)
    run.add_model("model", m.info)
    d, report = direction_and_probes(m, src, m.check_layers(layers), position)
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
            f"screening layers {cands} on {len(dev)} dev battery items (reported scores use the other {len(eval_items)}) ..."
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


def main() -> None:
    """Entry point: run the app, turning LatentlabError into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except LatentlabError as e:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished files are kept; unfinished ones were not written")
        sys.exit(130)
    except Exception as e:  # click usage errors and friends
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
