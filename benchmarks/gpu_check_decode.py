"""gpu_check stage "decode": decode tokens/s at batch 1 and 8, each beside a greedy check.

Three ways to run `GPT2.decode_step` on the same random model (saved once, `--model-dir`),
same prompts, same cache:

- `eager`: `model.decode_step` as the engine runs it on CUDA (no compile, no graphs);
- `graphs`: `torch.compile(model.decode_step, mode="reduce-overhead")`, which replays the
  step as one CUDA graph (the caches are marked static so the graph may write them in
  place). gpt2kit's own compiled step has no CUDA-graph mode, so this one is built here;
  whether CUDA graphs were really used is read off inductor's skip counter;
- `aoti`: gpt2kit's compiled step (`gpt2kit.model.compiled.decode_step`, AOTInductor,
  built once into the step cache and checked against eager before use), no CUDA graphs.

Each figure: rows x (new - 1) greedy decode steps over their time (after an untimed
warm-up run; best of `--repeats`), the prefill excluded. Each check, against
`gpt2kit.model.numerics.BOUNDS` for the dtype, so that a fast wrong answer counts as zero
(a FAIL):

- a compiled variant, fed eager's greedy tokens for up to `DECODE_STEPS` steps, keeps its
  logits within `compiled_logits` of eager's (and within the compiled step's own probe
  tolerance relative to the logits' scale, `gpt2kit.model.compiled.TOLERANCES`); its own
  greedy tokens equal eager's for `depth_compiled` tokens in every row, or part from them
  inside those forced steps, where the logit bound makes the parting a near-tie (a random
  model's logits are flat: near-ties are common, and 8 rows meet more of them than the one
  prompt BOUNDS' depths were set on);
- eager bf16, on eager float32's greedy path: every bf16 pick is one float32 ranks within
  twice the bf16 logit bound of its best (float32 is the reference itself).

    python benchmarks/gpu_check_decode.py --device cuda --result /tmp/decode.jsonl
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gpt2kit import GPT2
from gpt2kit.model.compiled import TOLERANCES, decode_step
from gpt2kit.model.numerics import BOUNDS, DECODE_STEPS, first_mismatch
from gpu_check_common import SIZES, Results, load_model, machine_line, make_model_dir, synchronize

Step = Callable[[Tensor, Tensor, list[Tensor], list[Tensor]], Tensor]
LABELS = {
    "eager": "eager decode_step",
    "graphs": 'torch.compile "reduce-overhead" (CUDA graphs)',
    "aoti": "gpt2kit compiled step (AOTInductor, no CUDA graphs)",
}


class Decoder:
    """One step function over caches of `rows` x `cache_len` allocated once (a CUDA graph
    writes into the same memory at every replay)."""

    def __init__(self, model: GPT2, step: Step, rows: int, cache_len: int, *, graphs: bool) -> None:
        cfg, w = model.config, model.wte.weight
        shape = (rows, cfg.n_head, cache_len, cfg.head_size)
        self.model, self.step, self.graphs = model, step, graphs
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        if graphs:
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)

    def _prefill(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """The prompts' keys and values into the caches (eagerly); logits (B, V), positions (B,)."""
        T = prompts.shape[1]
        h = self.model.prefill(prompts, [t[:, :, :T] for t in self.k], [t[:, :, :T] for t in self.v])
        return self.model.logits(h[:, -1]), torch.full((prompts.shape[0],), T, device=prompts.device)

    def _call(self, idx: Tensor, pos: Tensor) -> Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(idx, pos, self.k, self.v)

    @torch.no_grad()
    def greedy(self, prompts: Tensor, new: int) -> tuple[list[list[int]], float]:
        """`new` greedy tokens per row, and the seconds of the new - 1 decode steps."""
        logits, pos = self._prefill(prompts)
        idx = logits.argmax(-1, keepdim=True)  # (B, 1)
        out = [idx]
        synchronize(prompts.device)
        t0 = time.perf_counter()
        for _ in range(new - 1):
            idx = self._call(idx, pos).argmax(-1, keepdim=True)  # no host sync inside the loop
            out.append(idx)
            pos = pos + 1
        synchronize(prompts.device)
        seconds = time.perf_counter() - t0
        return torch.cat(out, dim=1).tolist(), seconds

    @torch.no_grad()
    def forced(self, prompts: Tensor, tokens: Tensor) -> Tensor:
        """Float32 logits (n, B, V) of decode steps fed `tokens` (B, n) whatever the logits say."""
        _, pos = self._prefill(prompts)
        out = []
        for i in range(tokens.shape[1]):
            out.append(self._call(tokens[:, i : i + 1], pos).float().clone())
            pos = pos + 1
        return torch.stack(out)


def measure(decoder: Decoder, prompts: Tensor, new: int, repeats: int) -> tuple[list[list[int]], float]:
    """Greedy tokens and the best decode tokens/s over `repeats` timed runs after a warm-up run."""
    decoder.greedy(prompts, new)  # compiles, records the graph, warms caches
    best, tokens = 0.0, None
    for _ in range(repeats):
        got, seconds = decoder.greedy(prompts, new)
        tokens = tokens or got
        best = max(best, prompts.shape[0] * (new - 1) / seconds)
    return tokens, best


def depth(a: list[list[int]], b: list[list[int]]) -> int:
    """The fewest leading greedy tokens any row of `a` shares with the same row of `b`."""
    return min(first_mismatch(x, y) for x, y in zip(a, b, strict=True))


class Stage:
    """The variants, in order, each at every batch size; the eager tokens are the reference."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.results = Results(args.result)
        self.model_dir = make_model_dir(Path(args.model_dir), args.size)
        self.model = load_model(self.model_dir, args.size, device=self.device, dtype=args.dtype)
        self.dtype_name = str(self.model.wte.weight.dtype).removeprefix("torch.")
        self.bound = BOUNDS["fp32" if self.model.wte.weight.dtype == torch.float32 else "bf16"]
        self.tolerance = TOLERANCES[self.dtype_name]
        n_positions = self.model.config.n_positions
        self.cache_len = min(n_positions, -(-(args.prompt + args.new + 1) // 64) * 64)
        g = torch.Generator().manual_seed(1)
        vocab = self.model.config.vocab_size
        self.prompts = {
            b: torch.randint(0, vocab, (b, args.prompt), generator=g).to(self.device) for b in args.batches
        }
        self.eager: dict[int, list[list[int]]] = {}
        self.forced: dict[int, Tensor] = {}

    def item(self, variant: str, rows: int) -> str:
        label = LABELS[variant]
        if self.device.type != "cuda":
            label = label.replace("(CUDA graphs)", "(no CUDA graphs off CUDA)").replace(
                ", no CUDA graphs", ""
            )
        return f"{label}, {self.dtype_name}, batch {rows}"

    def run_eager(self) -> None:
        for rows in self.args.batches:
            decoder = Decoder(self.model, self.model.decode_step, rows, self.cache_len, graphs=False)
            tokens, rate = measure(decoder, self.prompts[rows], self.args.new, self.args.repeats)
            self.eager[rows] = tokens
            n = min(DECODE_STEPS, self.args.new - 1)
            self.forced[rows] = decoder.forced(
                self.prompts[rows], torch.tensor(tokens, device=self.device)[:, :n]
            )
            status, check = self.eager_check(rows, tokens)
            self.results.add(self.item("eager", rows), status, f"{rate:,.0f} tok/s", check, tok_s=rate)

    def eager_check(self, rows: int, tokens: list[list[int]]) -> tuple[str, str]:
        """bf16 eager against float32 eager, on float32's greedy path: every bf16 pick is one
        float32 ranks within `2 x BOUNDS["bf16"].compiled_logits` of its best (a near-tie)."""
        if self.model.wte.weight.dtype == torch.float32:
            return "PASS", "the reference (float32 eager)"
        fp32 = load_model(self.model_dir, self.args.size, device=self.device, dtype="float32")
        decoder = Decoder(fp32, fp32.decode_step, rows, self.cache_len, graphs=False)
        reference, _ = decoder.greedy(self.prompts[rows], self.args.new)
        path = torch.tensor(reference, device=self.device)[:, : self.forced[rows].shape[0]]
        want = decoder.forced(self.prompts[rows], path)  # (n, B, V)
        del fp32, decoder
        bf16 = Decoder(self.model, self.model.decode_step, rows, self.cache_len, graphs=False)
        got = bf16.forced(self.prompts[rows], path)
        tie = 2 * self.bound.compiled_logits
        picked = want.gather(-1, got.argmax(-1, keepdim=True))[..., 0]  # float32's logit of bf16's pick
        off = int((picked < want.amax(-1) - tie).sum())
        d = depth(tokens, reference)
        check = (
            f"on float32's greedy path ({path.shape[1]} steps x {rows} rows) {off} bf16 picks off by more "
            f"than a {tie:g} near-tie; max abs(dlogit) vs float32 {float((got - want).abs().max()):.3g}; "
            f"greedy = float32 for {d}/{self.args.new} tokens in every row"
        )
        return ("PASS" if off == 0 else "FAIL"), check

    def run_compiled(self, variant: str, step: Step, *, graphs: bool, note: str = "") -> None:
        from torch._dynamo.utils import counters

        for rows in self.args.batches:
            skips = counters["inductor"]["cudagraph_skips"]
            decoder = Decoder(self.model, step, rows, self.cache_len, graphs=graphs)
            tokens, rate = measure(decoder, self.prompts[rows], self.args.new, self.args.repeats)
            n = self.forced[rows].shape[0]
            path = torch.tensor(self.eager[rows], device=self.device)[:, :n]
            dlogit = float((decoder.forced(self.prompts[rows], path) - self.forced[rows]).abs().max())
            # Also relative to the logits' scale (compiled/check.py's TOLERANCES): a random
            # model's logits are small, and an absolute bound alone could pass garbage.
            rel = dlogit / float(self.forced[rows].abs().max().clamp_min(1e-30))
            d = depth(tokens, self.eager[rows])
            # Token d comes from forced step d - 1: where the two part inside the forced steps,
            # logits within the bound make the parting a near-tie of at most twice the bound.
            # Parting after BOUNDS' depth for the dtype is within the bounds as they stand.
            need = min(self.bound.depth_compiled, self.args.new)
            close = dlogit <= self.bound.compiled_logits and rel <= self.tolerance
            ok = close and (d >= need or d - 1 < n)
            check = (
                f"max abs(dlogit) vs eager {dlogit:.3g} over {n} steps on eager's greedy path (bound "
                f"{self.bound.compiled_logits:g}), {rel:.2g} of the logits' scale (bound {self.tolerance:g}); "
                f"greedy = eager for {d}/{self.args.new} tokens in every row"
                f" (need {need}{', or a near-tie' if d < need else ''})"
            )
            extra = {}
            if graphs:
                skipped = counters["inductor"]["cudagraph_skips"] - skips
                used = self.device.type == "cuda" and skipped == 0
                extra["cuda_graphs"] = used
                if self.device.type != "cuda":
                    check += "; CUDA graphs: none off CUDA"
                elif used:
                    check += "; CUDA graphs used"
                else:
                    ok = False  # the figure would not be what its label says
                    check += f"; CUDA graphs NOT used ({skipped} skips: the reasons are in the log)"
            check += note
            self.results.add(
                self.item(variant, rows),
                "PASS" if ok else "FAIL",
                f"{rate:,.0f} tok/s",
                check,
                tok_s=rate,
                **extra,
            )

    def run_graphs(self) -> None:
        step = torch.compile(self.model.decode_step, mode="reduce-overhead", dynamic=False, fullgraph=True)
        self.run_compiled("graphs", step, graphs=True)

    def run_aoti(self) -> None:
        warnings = _Warnings()
        t0 = time.perf_counter()
        step = decode_step(
            self.model, slots=max(self.args.batches), max_len=self.cache_len, build=True, tiered=False
        )
        seconds = time.perf_counter() - t0
        if step is None:
            for rows in self.args.batches:
                why = warnings.text() or "decode_step returned None"
                self.results.add(self.item("aoti", rows), "FAIL", "no step", f"no compiled step: {why}")
            return
        self.run_compiled("aoti", step, graphs=False, note=f"; step built or loaded in {seconds:.0f}s")


class _Warnings(logging.Handler):
    """The warnings gpt2kit.model.compiled logs (why a step can't be had)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("gpt2kit.model.compiled").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def text(self) -> str:
        return " / ".join(self.messages)[:400]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--model-dir", required=True, help="the random model, made here when missing")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=128, help="greedy tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="eager,graphs,aoti", help="in order; eager always runs first")
    p.add_argument("--result", required=True, help="JSON lines file the items are appended to")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch._logging.set_logs(perf_hints=True)  # inductor says why it skips CUDA graphs
    print(machine_line(), flush=True)
    stage = Stage(args)
    print(f"cache length {stage.cache_len}, prompt {args.prompt}, new {args.new}, batches {args.batches}")
    stage.run_eager()
    failed = False
    for variant in args.variants.split(","):
        if variant == "eager":
            continue
        try:
            getattr(stage, f"run_{variant}")()
        except Exception as e:  # one variant's failure is its rows' FAIL; the next still runs
            traceback.print_exc()
            failed = True
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            for rows in args.batches:
                stage.results.add(stage.item(variant, rows), "FAIL", "error", f"{type(e).__name__}: {first}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
