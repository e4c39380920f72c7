"""The layout is the architecture (docs/architecture.md): checked on the source, not trusted.

Every `import` in src/gpt2kit is read with `ast`, including the ones inside functions (the
CLI imports lazily to start fast; a lazy import must not hide a circle), and checked:
- no module imports itself back through any chain (no import circles);
- a package imports only the packages below it in `LAYERS`, so imports flow one way;
- at most seven loose modules sit at the top of the package;
- no function is over 100 lines;
- the files that docstrings and comments cite exist, and nothing cites a file that is not in
  the repository;
- one detokenizer: only generation/textstream.py turns token bytes into text incrementally
  and maps the engine's finish reasons;
- one validator: only SamplingConfig raises on a sampling rule, and the server and the CLI
  compare no sampling field with a constant before raising;
- one list of dtype names.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "gpt2kit"

# Each entry may import the ones above it, never the ones below: tokenizer/model <- generation
# <- evals <- training <- server/cli. The top-level `gpt2kit` re-exports the public names.
LAYERS: list[set[str]] = [
    {"errors", "atomic", "_version", "dtypes"},
    {"device", "openmp", "faults"},
    {"tokenizer"},
    {"data"},
    {"model"},
    {"generation"},
    {"evals"},
    {"training"},
    {"server"},
    {"cli"},
    {"gpt2kit", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Same-layer neighbours that may still depend one way.
ALSO = {("gpt2kit", "errors"), ("__main__", "cli")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(module, line) for every gpt2kit module that `name` imports, anywhere in its body."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import gpt2kit.x.y` as an attribute path
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


GRAPH = {name: sorted({t for t, _ in imported(name, path)}) for name, path in MODULES.items()}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "gpt2kit"


def test_the_package_is_found() -> None:
    assert {"gpt2kit", "gpt2kit.model.gpt2", "gpt2kit.generation.engine", "gpt2kit.cli"} <= set(MODULES)
    assert set(map(top, MODULES)) <= set(LEVEL), "a new package needs its place in LAYERS"


def test_no_import_circles() -> None:
    # Depth-first search; a back edge is a circle, reported as the chain of modules.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in GRAPH[name]:
            if state.get(target) == 1:
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_imports_flow_one_way() -> None:
    wrong = [
        f"{name} imports {target} (line {line})"
        for name, path in MODULES.items()
        for target, line in imported(name, path)
        if top(name) != top(target)
        and LEVEL[top(target)] >= LEVEL[top(name)]
        and (top(name), top(target)) not in ALSO
    ]
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_at_most_seven_loose_modules() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(loose) <= 7, loose


def test_no_function_over_100_lines() -> None:
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 100
    ]
    assert not long, long


CITED = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|tests|scripts|examples|src)/[\w./-]*\w)")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_cited_files_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    missing = sorted({m for m in CITED.findall(text) if not (ROOT / m).exists()})
    assert not missing, f"{path.relative_to(ROOT)} cites files that are not in the repository: {missing}"
    # Files of the project's private notes, which users don't have.
    assert not re.search(r"GPT2\.md|\bseed 0\d\d\b", text), f"{path.relative_to(ROOT)} cites a private note"


def test_the_top_package_exports_the_public_names() -> None:
    import gpt2kit
    from gpt2kit.generation.complete import complete
    from gpt2kit.model.gpt2 import GPT2
    from gpt2kit.training.loop import train

    public = {"GPT2", "GPT2Config", "Tokenizer", "SamplingConfig", "generate", "complete", "beam_search"}
    assert public | {"train", "TrainConfig", "__version__"} <= set(gpt2kit.__all__)
    assert (gpt2kit.GPT2, gpt2kit.complete, gpt2kit.train) == (GPT2, complete, train)
    assert all(getattr(gpt2kit, name) is not None for name in gpt2kit.__all__)


# --- one place for each rule (docs/architecture.md, "One place for each rule") -----------

DETOKENIZER = "gpt2kit.generation.textstream"


def calls(path: Path, name: str) -> list[int]:
    """Lines where `path` calls a function or method called `name`."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)
    ]


def test_one_detokenizer() -> None:
    # Token bytes become text in one module: the tokenizer itself, the detokenizer, and
    # split_loss (which counts bytes per token, never makes text).
    allowed = {DETOKENIZER, "gpt2kit.evals.split_loss"}
    wrong = [
        f"{name}:{line} calls {fn}"
        for name, path in MODULES.items()
        if not name.startswith("gpt2kit.tokenizer") and name not in allowed
        for fn in ("decode_bytes", "getincrementaldecoder")
        for line in calls(path, fn)
    ]
    assert not wrong, "token -> text outside generation/textstream.py:\n" + "\n".join(wrong)
    # The engine's finish reason ("cancelled" included) becomes the user's in one function.
    readers = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        if name not in {DETOKENIZER, "gpt2kit.generation.engine"}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "reason"
    ]
    assert not readers, "a FinishEvent's reason read outside textstream.finish_reason: " + ", ".join(readers)


def sampling_names() -> set[str]:
    import dataclasses

    from gpt2kit.generation.config import SamplingConfig
    from gpt2kit.server.protocol import WIRE

    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    return names | {WIRE.get(n, n) for n in names}


def test_one_validator() -> None:
    # Only SamplingConfig's module makes a SamplingError.
    makers = [
        f"{name}:{line}"
        for name, path in MODULES.items()
        if name != "gpt2kit.generation.config"
        for line in calls(path, "SamplingError")
    ]
    assert not makers, "SamplingError raised outside generation/config.py: " + ", ".join(makers)
    # The server and the CLI check no sampling range of their own: no `if <field> <op> <constant>:
    # raise`. (Their own limits, --max-n or the context, compare with settings, not constants.)
    names = sampling_names()
    own = []
    for name, path in MODULES.items():
        if top(name) not in {"server", "cli"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.If) or not any(isinstance(n, ast.Raise) for n in node.body):
                continue
            for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
                sides = [cmp.left, *cmp.comparators]
                field = any(getattr(n, "attr", getattr(n, "id", None)) in names for n in sides)
                if field and any(isinstance(n, ast.Constant) for n in sides):
                    own.append(f"{name}:{node.lineno}")
    assert not own, "sampling rules checked outside SamplingConfig: " + ", ".join(own)


def test_one_list_of_dtype_names() -> None:
    literals = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict)
        and {"bfloat16", "float16"}
        <= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    ]
    assert literals == ["gpt2kit.dtypes:10"], literals
