"""`gpt2kit serve`: an OpenAI-compatible completions server and the GPT-2 Explorer page."""

from __future__ import annotations

import argparse
import os
import sys

from gpt2kit.cli._compiled import SERVE_COMPILE_HELP

EXAMPLE = """examples:
  gpt2kit serve --model gpt2                       # http://127.0.0.1:8000/ is the Explorer
  gpt2kit serve --model runs/shakespeare/final --port 8080 --api-key secret
  gpt2kit serve --model gpt2 --compile             # build the compiled step in the background (any size)
  curl -s localhost:8000/health                    # "decode_step": {"in_use": "eager", "state": "building"}
  gpt2kit serve --model gpt2 --exit-on-engine-failure   # under systemd/k8s: exit 1, get restarted
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "gpt2", "prompt": "Hello", "max_tokens": 8, "seed": 1}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
             print(c.completions.create(model='gpt2', prompt='Hello').choices[0].text)"
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.cli._common import add_flags, add_model_flag

    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI completions API + the Explorer page)",
        description=(
            "Serve a model: POST /v1/completions (OpenAI-compatible, streaming, logprobs, scoring "
            "with echo + max_tokens 0), GET /v1/models, GET /health, the GPT-2 Explorer at / and "
            "the API docs at /docs. Concurrent requests are decoded together in one batch. "
            "Binds to loopback unless --host says otherwise."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    add_model_flag(p)
    p.add_argument("--model-name", default=None, help="name clients use; None: --model's last part")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 and /api; None: env GPT2KIT_API_KEY if set",
    )
    add_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; None: torch's choice. 1 keeps a busy CPU responsive for small models",
    )
    p.add_argument("--no-batching", action="store_true", help="serve one request at a time (a baseline)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="rows decoded together at most: the engine's KV-cache slots (each holds a whole context)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=SERVE_COMPILE_HELP,
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="a request's tokens are the same bits however many others run beside it (the same as "
        "gpt2kit generate --deterministic gives); decoding is slower (docs/serving.md)",
    )
    p.add_argument("--max-pending", type=int, default=64, help="requests queued or running (429 beyond)")
    p.add_argument("--max-n", type=int, default=16, help="cap on a request's n")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on max_tokens; None: the context")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body cap (413 beyond)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (504 beyond)")
    p.add_argument(
        "--exit-on-engine-failure",
        action="store_true",
        help="if the engine thread fails, answer the requests in flight (500), then exit with status 1 "
        "so a supervisor (systemd Restart=on-failure, a k8s pod) restarts the server; without it the "
        "server stays up and /health and every model request answer 503 naming the failure",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gpt2kit.cli._common import load, pick
    from gpt2kit.errors import ConfigError
    from gpt2kit.model.checkpoint import load_tokenizer
    from gpt2kit.server import stepbuild
    from gpt2kit.server.app import create_app
    from gpt2kit.server.openai_completions import Limits

    for flag in ("max_batch_size", "max_pending", "max_n", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.request_timeout <= 0:
        raise ConfigError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    # Read here, not as the flag's default, so --help never prints the key.
    api_key = args.api_key or os.environ.get("GPT2KIT_API_KEY") or None
    picks = pick(args)
    model, device = load(args, picks)
    tokenizer = load_tokenizer(args.model)
    plan = stepbuild.plan(
        model, compile=args.compile, rows=args.max_batch_size, deterministic=args.deterministic
    )
    step = plan.step
    name = args.model_name or os.path.basename(os.path.normpath(str(args.model)))
    server: uvicorn.Server | None = None
    failures: list[str] = []

    def on_engine_failure(reason: str) -> None:  # on the engine thread
        failures.append(reason)
        if args.exit_on_engine_failure and server is not None:
            server.should_exit = True  # uvicorn's loop polls it: finish the responses, then stop

    app = create_app(
        model,
        tokenizer,
        model_name=name,
        api_key=api_key,
        limits=Limits(max_n=args.max_n, max_tokens=args.max_tokens, request_timeout=args.request_timeout),
        batching=not args.no_batching,
        max_batch_size=args.max_batch_size,
        max_pending=args.max_pending,
        max_body_bytes=args.max_body_bytes,
        step=step,
        on_engine_failure=on_engine_failure,
        deterministic=args.deterministic,
        step_status=plan.status,
    )
    build = None
    if plan.build:
        import torch

        spec = stepbuild.Spec(
            model=_model_source(args.model),
            device=str(picks.device),
            dtype=str(picks.dtype).removeprefix("torch."),
            quantize=picks.quantize,
            threads=torch.get_num_threads(),
            rows=args.max_batch_size,
            deterministic=args.deterministic,
            parent=os.getpid(),
        )
        build = stepbuild.BackgroundBuild(model, spec, status=plan.status, use_step=app.state.worker.use_step)
        app.state.on_shutdown.append(build.stop)  # no orphan: the child and its compilers end with the server
    print(
        f"serving {name!r} on {device} ({plan.status.info().in_use} decode step) "
        f"at http://{args.host}:{args.port}/ "
        f"(Explorer at /, API docs at /docs{', API key required' if api_key else ''})"
    )
    # Bounded: streams still open when the engine failed have had their error event by then.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    server.should_exit = bool(failures) and args.exit_on_engine_failure  # it failed already
    if build is not None:
        build.start()
    try:
        server.run()
    finally:
        if build is not None:
            build.stop()  # again, if uvicorn ended before its shutdown (a failed start)
    if failures and args.exit_on_engine_failure:
        print(f"gpt2kit serve: {failures[0]}; exiting (--exit-on-engine-failure)", file=sys.stderr)
        return 1
    return 0


def _model_source(model: str) -> str:
    """--model as the build process (another working directory one day) finds it: a local
    path made absolute, a hub id as it is."""
    return os.path.abspath(model) if os.path.exists(model) else model
