"""A real uvicorn server on a free loopback port, for the server and Explorer tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

from conftest import hf_model, shakespeare_plays, tiny_model, write_gpt2_tokenizer
from gpt2kit.generation.engine import DecodeStep, EagerStep
from gpt2kit.model import GPT2
from gpt2kit.model.checkpoint import load_tokenizer, save_model
from gpt2kit.server.app import create_app
from gpt2kit.tokenizer.bpe import train_bpe

MODEL_NAME = "tiny"


@dataclass
class Server:
    url: str
    app: object

    @property
    def worker(self):
        return self.app.state.worker


def make_model_dir(path: Path, *, n_positions: int = 512) -> Path:
    """A random transformers GPT-2 (biases and norms randomised too) with GPT-2's tokenizer."""
    model = hf_model(seed=7, vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)
    model.save_pretrained(path)
    write_gpt2_tokenizer(path)
    return path


def make_bpe_model_dir(path: Path, *, n_positions: int = 128, vocab_size: int = 512) -> Path:
    """A quick-start-like model: a byte-level BPE trained on Shakespeare and a small random GPT-2
    (4 layers, 4 heads) over it, saved as `gpt2kit quickstart` saves its model."""
    text = shakespeare_plays()[0].read_text(encoding="utf-8")
    tokenizer = train_bpe(text.split("\n\n"), vocab_size=vocab_size)
    eot = tokenizer.eot_token
    model = tiny_model(
        seed=3,
        vocab_size=tokenizer.n_vocab,
        n_positions=n_positions,
        n_layer=4,
        n_head=4,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    save_model(model, path, tokenizer=tokenizer)
    return path


class FaultyStep(EagerStep):
    """The eager decode step, broken for wide batches: decoding `fail_rows` rows or more at
    once raises, as a failing kernel or device would, on the engine thread. One row alone
    decodes normally."""

    def __init__(self, model: GPT2, *, fail_rows: int = 2) -> None:
        super().__init__(model)
        self.fail_rows = fail_rows

    def __call__(
        self, idx: torch.Tensor, input_pos: torch.Tensor, k_cache: list, v_cache: list
    ) -> torch.Tensor:
        if idx.shape[0] >= self.fail_rows:  # (B, 1): one token per row
            raise RuntimeError(f"injected fault: the decode step fails on {idx.shape[0]} rows")
        return super().__call__(idx, input_pos, k_cache, v_cache)


@contextlib.contextmanager
def running_server(
    model_dir: Path, *, make_step: Callable[[GPT2], DecodeStep] | None = None, **app_options
) -> Iterator[Server]:
    """Serve the model in a background thread; the port is picked by the OS. `make_step`
    builds the decode step from the loaded model (eager by default)."""
    model = GPT2.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if make_step is not None:
        app_options["step"] = make_step(model)
    app = create_app(model, tokenizer, model_name=MODEL_NAME, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"]
