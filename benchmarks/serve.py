"""Benchmark: ``latentlab serve`` under 8 concurrent clients against the same 8 requests one after another.

Workload: ``latentlab serve --model smollm2-135m-instruct --device cpu`` started as a subprocess on
127.0.0.1 (a free port chosen by the server, ``--port 0``; start bounded by --start-timeout; the server
is always stopped, even on failure). 8 chat requests (the first 8 built-in era questions), max_tokens 48,
temperature 1, top_p 1, no ``seed`` (a request with a seed runs in its own batch, so none is sent), with
the ``openai`` client:

  sequential  the 8 requests one after another from one client;
  concurrent  8 clients (threads, each its own ``openai`` client) released at once by a barrier; the
              server batches what arrives within its batch window (default 20 ms, up to 32 rows).

Tokens are the responses' ``usage.completion_tokens``; tokens/s = their sum / wall time of the round.
Best of 2 rounds each, alternating, after a warm-up request. Reported: tokens/s each way and the ratio
concurrent / sequential (target >= 2.5: batching must pay).

    python benchmarks/serve.py            # full run: ~1.5 minutes on an idle 2-core CPU
    python benchmarks/serve.py --quick --out /tmp/serve.json   # dry run: 2 requests x 8 tokens, 1 round
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _common import benchmark_args, provenance, write_results

URL = re.compile(r"(http://127\.0\.0\.1:\d+/v1)")


@contextmanager
def server(model: str, start_timeout: float, extra: list[str]) -> Iterator[tuple[str, list[str]]]:
    """``latentlab serve`` in a subprocess: yields (base URL, its output lines so far); always stopped."""
    import openai

    cmd = [sys.executable, "-m", "latentlab.cli", "serve", "--model", model, "--device", "cpu", "--host",
           "127.0.0.1", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + start_timeout
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = next((m.group(1) for ln in list(lines) if (m := URL.search(ln))), None)
            if found:
                url = found
                try:
                    openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=5).models.list()
                    break
                except openai.APIConnectionError:
                    pass
            time.sleep(0.5)
        else:
            tail = "\n".join(lines[-20:])
            why = f"exited with status {proc.returncode}" if proc.poll() is not None else \
                f"not ready within {start_timeout:.0f} s"
            raise SystemExit(f"latentlab serve {why}:\n{tail}")
        assert url is not None
        yield url, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        reader.join(timeout=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to start")
    ap.add_argument("--quick", action="store_true", help="a tiny dry run (2 requests x 8 tokens, 1 round)")
    args = benchmark_args(ap, "serve", markdown)
    if args.quick:
        args.n_requests, args.max_tokens, args.repeats = 2, 8, 1
    import openai

    from latentlab.sampling import load_questions

    questions = load_questions("era-questions")[: args.n_requests]
    if len(questions) < args.n_requests:
        raise SystemExit(f"only {len(questions)} built-in era questions; pass --n-requests {len(questions)} or fewer")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with server(args.model, args.start_timeout, []) as (url, log):
        start_s = time.perf_counter() - t0

        def ask(client: openai.OpenAI, q: Any, max_tokens: int) -> int:
            r = client.chat.completions.create(model=args.model, messages=list(q.messages), max_tokens=max_tokens,
                                               temperature=1.0, top_p=1.0)
            if r.usage is None:
                raise SystemExit("the server's response has no usage")
            return int(r.usage.completion_tokens)

        def client() -> openai.OpenAI:
            return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

        def sequential() -> tuple[float, int]:
            c = client()
            t = time.perf_counter()
            toks = sum(ask(c, q, args.max_tokens) for q in questions)
            return time.perf_counter() - t, toks

        def concurrent() -> tuple[float, int]:
            clients = [client() for _ in questions]
            gate = threading.Barrier(len(questions) + 1)
            got: list[int | BaseException] = [0] * len(questions)

            def one(i: int) -> None:
                gate.wait()
                try:
                    got[i] = ask(clients[i], questions[i], args.max_tokens)
                except BaseException as e:  # noqa: BLE001 - carried to the main thread
                    got[i] = e

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
            for th in threads:
                th.start()
            gate.wait()
            t = time.perf_counter()
            for th in threads:
                th.join()
            s = time.perf_counter() - t
            for g in got:
                if isinstance(g, BaseException):
                    raise g
            return s, sum(int(g) for g in got)  # type: ignore[arg-type]

        ask(client(), questions[0], 4)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
        for _ in range(args.repeats):
            for name, fn in (("sequential", sequential), ("concurrent", concurrent)):
                s, toks = fn()
                runs[name].append({"seconds": round(s, 3), "completion_tokens": toks, "tok_per_s": round(toks / s, 1)})
                print(name, runs[name][-1], flush=True)
        server_log = [ln for ln in log if ln.strip()][-5:]
    best = {k: max(v, key=lambda r: r["tok_per_s"]) for k, v in runs.items()}
    result = {
        "workload": {"model": args.model, "questions": "era-questions", "n_requests": len(questions),
                     "endpoint": "/v1/chat/completions", "max_tokens": args.max_tokens, "temperature": 1.0,
                     "top_p": 1.0, "seed": None, "server": "latentlab serve --device cpu --port 0 (defaults: "
                     "--max-batch 32, --batch-window-ms 20)", "repeats": args.repeats,
                     "quick": args.quick},
        "server_start_seconds": round(start_s, 2),
        "server_log_tail": server_log,
        "runs": runs,
        "best": best,
        "ratio": round(best["concurrent"]["tok_per_s"] / best["sequential"]["tok_per_s"], 3),
        **provenance("cpu", load_before),
    }
    write_results(args.out, result, markdown)


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    lines = [
        f"# latentlab serve: {w['n_requests']} concurrent clients vs the same requests one after another "
        f"({w['model']}, chat, max_tokens {w['max_tokens']}, temperature {w['temperature']}, CPU)",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']} ({m['cpu_cores']} cores). "
        f"The server is its own process ({w['server']}); server start {r['server_start_seconds']} s. Tokens: "
        f"usage.completion_tokens. Best of {w['repeats']}. Ratio = concurrent tok/s / sequential tok/s "
        "(target >= 2.5).",
        "",
        "| clients | completion tokens | seconds | tok/s |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("sequential", "1 (one after another)"), ("concurrent", f"{w['n_requests']} at once")):
        b = r["best"][name]
        lines.append(f"| {label} | {b['completion_tokens']} | {b['seconds']} | {b['tok_per_s']} |")
    lines += ["", f"Ratio: **{r['ratio']:.2f}x**" + (" (quick dry run: not a measurement)" if w.get("quick") else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
