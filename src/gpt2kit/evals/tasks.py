"""Task files: our JSON Lines format, the public LAMBADA and HellaSwag formats, few-shot prompts.

A task file holds one JSON object per line. An optional first line `{"task": {...}}` sets
the task's `description` (e.g. "Translate English to French:"), the `example_separator`
between few-shot examples (default a blank line) and the `target_delimiter` put between
a context and its answer (default a space). Every other line is an item:

- lambada:          {"context": "... he handed her the", "target": "knife"} or {"text": "... knife"}
- multiple-choice:  {"context": "...", "choices": ["a", "b", ...], "label": 1}
                    (HellaSwag's own fields ctx / ctx_a + ctx_b, endings, label also load)
- generate:         {"prompt": "Q: ...?\\nA:", "answers": ["Paris"]} (or "answer": "Paris")

An item may carry `"split": "train"`: those items are only drawn as few-shot examples and
never scored. LAMBADA's plain-text release (one passage per line, the last word is the
target) loads too. Files are UTF-8, a leading byte-order mark is skipped; a whole-file
JSON array is rejected with a hint to convert it to JSON Lines.

>>> task = load_task("lambada_sample.jsonl", kind="lambada")  # doctest: +SKIP
>>> fewshot_prefix(task, task.items[0], shots=2, seed=1234)  # doctest: +SKIP
'... examples ...\\n\\n'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2kit.data.corpora import json_object
from gpt2kit.errors import DataError

KINDS = ("lambada", "multiple-choice", "generate")
TRAIN_SPLIT = "train"
HEADER_KEYS = {"description", "example_separator", "target_delimiter", "name"}


@dataclass(frozen=True)
class Item:
    """One task item. `answer` is what a few-shot example shows after the context.

    lambada: `targets` = (last word,); multiple-choice: `choices` and `label`;
    generate: `targets` = the accepted answers. `line` is the item's line in its file.
    """

    context: str
    targets: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    label: int = -1
    split: str | None = None
    line: int = 0

    @property
    def answer(self) -> str:
        return self.choices[self.label] if self.choices else self.targets[0]

    def key(self) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        """The item's content, to recognise the same item in the few-shot pool."""
        return (self.context, self.targets, self.choices, self.label)


@dataclass(frozen=True)
class Task:
    """A loaded task: the items to score, the few-shot pool and how prompts are joined."""

    kind: str
    path: Path
    sha256: str
    items: tuple[Item, ...]
    pool: tuple[Item, ...] = ()
    description: str = ""
    example_separator: str = "\n\n"
    target_delimiter: str = " "
    name: str = ""
    fewshot_path: Path | None = None
    fewshot_sha256: str | None = None

    def limit(self, n: int | None) -> Task:
        """The task with only its first `n` items scored (the pool is unchanged)."""
        if n is None:
            return self
        if n < 1:
            raise DataError(f"--limit must be >= 1, got {n}")
        return dataclasses.replace(self, items=self.items[:n])


def builtin_task_dir() -> Path:
    """The sample task files shipped with gpt2kit (`gpt2kit/evals/samples/`)."""
    return Path(str(resources.files("gpt2kit.evals") / "samples"))


def resolve_data_path(name: str | Path) -> Path:
    """A file path, or the name of a bundled sample (e.g. `lambada_sample`)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise DataError(f"{path}: is a directory; pass a task file (JSON Lines or text)")
    bundled = builtin_task_dir()
    for candidate in (bundled / path.name, *sorted(bundled.glob(f"{path.name}.*"))):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    samples = ", ".join(sorted(p.name for p in bundled.iterdir() if p.is_file()))
    raise DataError(f"{path}: no such file; pass a task file path or a bundled sample ({samples})")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: Path) -> str:
    """The file's exact text: UTF-8, a leading byte-order mark skipped, line ends kept as they are.

    No newline conversion, so a CRLF file's text (and its byte count) is what the file holds.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: can't read ({e.strerror})") from None


def load_task(path: str | Path, *, kind: str, fewshot_path: str | Path | None = None) -> Task:
    """Load a task file of `kind`; items marked `"split": "train"` form the few-shot pool.

    With `fewshot_path`, the pool is that file's items instead (its train split when it
    has one). Raises DataError naming the file, line and fix for anything malformed.
    """
    if kind not in KINDS:
        raise DataError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    path = resolve_data_path(path)
    header, items = _read_items(path, kind)
    scored = tuple(it for it in items if it.split != TRAIN_SPLIT)
    pool = tuple(it for it in items if it.split == TRAIN_SPLIT)
    if not scored:
        raise DataError(f'{path}: every item has "split": "train"; leave some items to evaluate')
    fs_path = fs_sha = None
    if fewshot_path is not None:
        fs_path = resolve_data_path(fewshot_path)
        _, fs_items = _read_items(fs_path, kind)
        train = tuple(it for it in fs_items if it.split == TRAIN_SPLIT)
        pool = train or tuple(fs_items)
        fs_sha = file_sha256(fs_path)
    return Task(
        kind=kind,
        path=path,
        sha256=file_sha256(path),
        items=scored,
        pool=pool,
        description=header.get("description", ""),
        example_separator=header.get("example_separator", "\n\n"),
        target_delimiter=header.get("target_delimiter", " "),
        name=header.get("name", path.stem),
        fewshot_path=fs_path,
        fewshot_sha256=fs_sha,
    )


# --- few-shot prompts -------------------------------------------------------------------


def check_shots(task: Task, shots: int) -> None:
    """Fail before any scoring if some item can't get `shots` examples from the pool.

    An example equal to the query is never drawn, so an item's pool is the task's pool
    minus its copies of that item; the smallest such pool must hold `shots` examples.
    """
    if shots < 0:
        raise DataError(f"--shots must be >= 0, got {shots}")
    if not shots or not task.items:
        return
    copies = Counter(ex.key() for ex in task.pool)
    smallest = min(len(task.pool) - copies[item.key()] for item in task.items)
    if smallest < shots:
        raise DataError(_too_few_examples(task, shots, smallest))


def _too_few_examples(task: Task, shots: int, available: int) -> str:
    where = task.fewshot_path or task.path
    return (
        f"{where}: --shots {shots} needs {shots} example items but the pool has {available}; add items "
        f'with "split": "train", pass --fewshot-data FILE or lower --shots'
    )


def fewshot_prefix(task: Task, item: Item, *, shots: int, seed: int) -> str:
    """The text before `item`'s context: description, then `shots` solved examples.

    Examples are drawn from the task's pool with a generator seeded by (`seed`, the item's
    line), so a prompt doesn't depend on --limit or on which other items are evaluated,
    and an example equal to the query item is never drawn.
    """
    if shots < 0:
        raise DataError(f"--shots must be >= 0, got {shots}")
    parts = [task.description] if task.description else []
    if shots:
        query = item.key()
        pool = [ex for ex in task.pool if ex.key() != query]
        if len(pool) < shots:
            raise DataError(_too_few_examples(task, shots, len(pool)))
        rng = random.Random(f"{seed}:{item.line}")
        parts += [ex.context + task.target_delimiter + ex.answer for ex in rng.sample(pool, shots)]
    return "".join(p + task.example_separator for p in parts)


# --- reading files -----------------------------------------------------------------------


def _read_items(path: Path, kind: str) -> tuple[dict[str, str], list[Item]]:
    text = read_text(path)
    # Only \n (and \r\n) end a line: JSON strings may hold U+2028 and the like, which
    # str.splitlines() would also break at.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    first_n, first = next(((n, ln) for n, ln in enumerate(lines, 1) if ln.strip()), (0, ""))
    if _is_json_array(text, plain_text_ok=kind == "lambada"):
        raise DataError(
            f"{path}:{first_n}: expected a JSON object per line, found a JSON array; convert the file "
            "to JSON Lines, one object per line (e.g. jq -c '.[]' FILE > FILE.jsonl)"
        )
    if kind == "lambada" and not first.lstrip().startswith("{"):
        items = [_lambada_from_text(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
        if not items:
            raise DataError(f"{path}: no passages; expected one passage per line")
        return {}, items
    header: dict[str, str] = {}
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = json_object(line, where=f"{path}:{n}")
        if "task" in obj and len(obj) == 1:
            header = _header(obj["task"], path, n)
            continue
        items.append(_PARSERS[kind](obj, path, n))
    if not items:
        raise DataError(f"{path}: no items; expected JSON Lines with one {kind} item per line")
    return header, items


def _is_json_array(text: str, *, plain_text_ok: bool) -> bool:
    """Whether the file is one JSON array (a common export) rather than JSON Lines.

    Where plain text is also valid (LAMBADA's release), a passage may start with "[", so
    only an array of objects or a file that parses as a JSON array counts.
    """
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return False
    if not plain_text_ok or stripped[1:].lstrip().startswith("{"):
        return True
    try:
        return isinstance(json.loads(stripped), list)
    except json.JSONDecodeError:
        return False


def _header(obj: Any, path: Path, n: int) -> dict[str, str]:
    if not isinstance(obj, dict) or not set(obj) <= HEADER_KEYS:
        raise DataError(f'{path}:{n}: "task" must be an object with keys among {sorted(HEADER_KEYS)}')
    for k, v in obj.items():
        if not isinstance(v, str):
            raise DataError(f'{path}:{n}: task "{k}" must be a string, got {v!r}')
    return obj


def _split(obj: dict[str, Any], path: Path, n: int) -> str | None:
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise DataError(f'{path}:{n}: "split" must be a string like "train" or "test", got {split!r}')
    return split


def _string(obj: dict[str, Any], key: str, path: Path, n: int, *, empty_ok: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise DataError(f'{path}:{n}: "{key}" must be a non-empty string, got {value!r}')
    return value


def _split_last_word(text: str, path: Path, n: int) -> tuple[str, str]:
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0 or not text[cut + 1 :]:
        raise DataError(f"{path}:{n}: a LAMBADA passage needs a context and a last word separated by a space")
    return text[:cut], text[cut + 1 :]


def _lambada_from_text(line: str, path: Path, n: int) -> Item:
    context, word = _split_last_word(line, path, n)
    return Item(context=context, targets=(word,), line=n)


def _lambada(obj: dict[str, Any], path: Path, n: int) -> Item:
    if "text" in obj and "context" not in obj:  # OpenAI's lambada_test.jsonl
        context, word = _split_last_word(_string(obj, "text", path, n), path, n)
    elif "context" in obj:
        context, word = _string(obj, "context", path, n), _string(obj, "target", path, n)
    else:
        raise DataError(
            f'{path}:{n}: a lambada item needs "context" + "target" or "text", found {sorted(obj)}'
        )
    return Item(context=context, targets=(word,), split=_split(obj, path, n), line=n)


def _hellaswag_text(text: str) -> str:
    """lm-eval-harness's HellaSwag clean-up: WikiHow's [title]/[step] markers, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _multiple_choice(obj: dict[str, Any], path: Path, n: int) -> Item:
    if "endings" in obj:  # HellaSwag's fields
        if "ctx_a" in obj:
            ctx = (
                _string(obj, "ctx_a", path, n)
                + " "
                + _string(obj, "ctx_b", path, n, empty_ok=True).capitalize()
            )
        else:
            ctx = _string(obj, "ctx", path, n)
        activity = obj.get("activity_label")
        context = _hellaswag_text(f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx)
        raw_choices = obj["endings"]
        choices_key = "endings"
    elif "choices" in obj:
        context = _string(obj, "context", path, n)
        raw_choices = obj["choices"]
        choices_key = "choices"
    else:
        raise DataError(
            f'{path}:{n}: a multiple-choice item needs "context" + "choices" + "label" '
            f'(or HellaSwag\'s "ctx" + "endings" + "label"), found {sorted(obj)}'
        )
    if not isinstance(raw_choices, list) or len(raw_choices) < 2:
        raise DataError(f'{path}:{n}: "{choices_key}" must be a list of at least 2 strings')
    if not all(isinstance(c, str) and c.strip() for c in raw_choices):
        raise DataError(f'{path}:{n}: every entry of "{choices_key}" must be a non-empty string')
    choices = [_hellaswag_text(c) for c in raw_choices] if choices_key == "endings" else raw_choices
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # HellaSwag stores "0".."3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(
            f'{path}:{n}: "label" must be the index of the right choice (0..{len(choices) - 1}), got {label!r}'
        )
    return Item(context=context, choices=tuple(choices), label=label, split=_split(obj, path, n), line=n)


def _generate(obj: dict[str, Any], path: Path, n: int) -> Item:
    key = "prompt" if "prompt" in obj else "context"
    prompt = _string(obj, key, path, n)
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise DataError(f'{path}:{n}: "answers" must be a non-empty list of non-empty strings')
    elif "answer" in obj:
        answers = [_string(obj, "answer", path, n)]
    else:
        raise DataError(
            f'{path}:{n}: a generate item needs "prompt" and "answers" (or "answer"), found {sorted(obj)}'
        )
    return Item(context=prompt, targets=tuple(answers), split=_split(obj, path, n), line=n)


_PARSERS = {"lambada": _lambada, "multiple-choice": _multiple_choice, "generate": _generate}
