"""The exceptions gpt2kit raises for problems a user can fix.

Every message says what was expected, what was found, and how to fix it, on one line,
so the CLI can print it as-is and exit with code 2. Internal invariants use `assert`.
"""

from __future__ import annotations


class Gpt2kitError(Exception):
    """Base class: a problem with the user's input, files or settings."""


class ConfigError(Gpt2kitError, ValueError):
    """A model, training or sampling setting is invalid."""


class TokenizerError(Gpt2kitError, ValueError):
    """Text or token ids the tokenizer can't handle, or bad vocabulary files."""


class CheckpointError(Gpt2kitError):
    """A checkpoint directory or weights file is missing, corrupt or incompatible."""


class DataError(Gpt2kitError):
    """Training or evaluation data is missing, empty or inconsistent."""
