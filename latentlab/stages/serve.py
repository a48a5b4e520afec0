"""``latentlab serve``: an OpenAI-compatible HTTP server over one loaded base and its LoRA finetunes.

The server itself is :mod:`latentlab.serving` (why one worker thread owns the model, how requests
are batched); this stage checks the options and adapters before the base loads, binds the port
before the base loads (a port in use is one error line, not a traceback after a minute of
loading), attaches every adapter before serving (an adapter of another base fails at startup), and
runs uvicorn until interrupted. No run folder is written: a server measures nothing itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, ModelOptions, Stage, option

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class ServeConfig(ModelOptions):
    """Serve the base model and its LoRA finetunes over an OpenAI-compatible HTTP API (GET /v1/models,
    POST /v1/chat/completions, POST /v1/completions), with per-request steering or ablation.

    The base is served under --served-name (default: the --model value), each --adapter NAME=RUN as the
    model NAME: a LoRA view on the one loaded base, as `vllm serve BASE --enable-lora --lora-modules
    old=DIR` serves it; NAME=RUN@2 serves it with its LoRA difference doubled (amplification). Requests
    take n, temperature, top_p, max_tokens, stop, seed and logprobs (chat: logprobs/top_logprobs;
    completions: logprobs=k). An intervention is an extra body field,
    "latentlab": {"steer": "era:0.5@8-17"} or {"ablate": "era@all"}, with the spec syntax of the other
    commands (a saved direction .safetensors works as the direction).

    With the openai client: client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none");
    client.chat.completions.create(model="old", messages=[{"role": "user", "content": "Name a bird."}],
    temperature=0, extra_body={"latentlab": {"ablate": "era@all"}}).

    Binds to 127.0.0.1 unless --host says otherwise; elsewhere, set --api-key-env (requests then need
    Authorization: Bearer KEY). Concurrent requests are batched (--max-batch rows within
    --batch-window-ms). Ctrl-C stops the server. See docs/serve.md for lm-eval and inspect-ai.
    """

    command = "serve"
    adapter: list[str] | None = option(
        None, help="NAME=RUN_OR_ADAPTER_DIR[@FACTOR]: serve this finetune as the model NAME, its LoRA difference "
        "times FACTOR (default 1; repeatable).",
        flags=("--adapter",),
    )
    host: str = option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).")
    port: int = option(8000, help="Port to listen on (0: any free port, printed at startup).")
    api_key_env: str | None = option(
        None, help="Name of the environment variable holding the API key (then required as Authorization: Bearer KEY)."
    )
    served_name: str | None = option(None, help="Model name of the base in the API (default: the --model value).")
    max_batch: int = option(32, help="Most rows (prompts x n) generated together.")
    batch_window_ms: float = option(20.0, help="How long the worker waits for more requests to batch (ms).")

    def __post_init__(self) -> None:
        from latentlab.adapters import format_scale
        from latentlab.arms import parse_scaled_adapter
        from latentlab.config import nonnegative_int, positive_int

        self._adapters = [parse_scaled_adapter(a) for a in self.adapter or []]  # folders exist: before any load
        self.adapter = [f"{n}={p}" + ("" if f == 1 else f"@{format_scale(f)}")
                        for n, p, f in self._adapters] or None
        self.served_name = (self.served_name or self.model).strip()
        if not self.served_name:
            raise LatentlabError("--served-name is empty", "pass a name such as --served-name base")
        names = [self.served_name] + [n for n, _, _ in self._adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LatentlabError(f"two served models are named {dup[0]!r}",
                                 "name each --adapter apart from the others and from --served-name")
        nonnegative_int("port", self.port)
        if self.port > 65535:
            raise LatentlabError(f"--port must be <= 65535, got {self.port}", "pass a port such as 8000")
        positive_int("max_batch", self.max_batch)
        if not 0 <= self.batch_window_ms < float("inf"):
            raise LatentlabError(f"--batch-window-ms must be >= 0, got {self.batch_window_ms}",
                                 "pass e.g. --batch-window-ms 20")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise LatentlabError(f"--api-key-env {self.api_key_env}: that environment variable is not set",
                                 f"export {self.api_key_env}=YOUR_KEY first")
        super().__post_init__()


@dataclass
class ServeResult:
    """Where the server listened and what it served."""

    url: str
    models: list[str]


def _bind(host: str, port: int) -> Any:
    """A listening socket on (host, port), made before the model loads: a port in use fails at once."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise LatentlabError(f"cannot resolve --host {host}: {e.strerror}",
                             "pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LatentlabError(f"cannot listen on {host}:{port}: {e.strerror}",
                             "pass another --port (or stop what uses this one)") from None
    sock.set_inheritable(True)
    return sock


def run(cfg: ServeConfig, ctx: Context) -> ServeResult:
    """Bind, load the base, attach the adapters (refused now if of another base), serve until interrupted."""
    import signal
    import threading

    import uvicorn

    from latentlab.arms import Arm
    from latentlab.serving import make_app

    assert cfg.served_name is not None
    sock = _bind(cfg.host, cfg.port)
    try:
        base = ctx.load(adapter=None)
        arms = {cfg.served_name: Arm(cfg.served_name)}
        arms.update({name: Arm(name, folder, role="finetuned", scale=f) for name, folder, f in cfg._adapters})
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        app = make_app(base, arms, api_key=key, max_batch=cfg.max_batch, batch_window_s=cfg.batch_window_ms / 1000)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/v1"
        if cfg.host not in LOOPBACK and key is None:
            ctx.log(f"warning: listening on {cfg.host} without an API key: anyone who reaches this machine can use "
                    "the model (set --api-key-env)")
        ctx.log(f"serving {', '.join(arms)} at {url} (Ctrl-C stops)")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: a no-op handler
        # for that second time makes Ctrl-C (and a plain kill) end the command with exit status 0
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            server.run(sockets=[sock])
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        sock.close()
    return ServeResult(url, list(arms))


def show(res: ServeResult, cfg: ServeConfig, console: Any) -> None:
    console.print(f"stopped serving {', '.join(res.models)} at {res.url}", highlight=False)


STAGE = Stage("serve", ServeConfig, run, show)
run_serve = STAGE
