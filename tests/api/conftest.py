"""Fixtures for API tests: an in-process n4 app over a tiny checkpoint (FastAPI's TestClient runs the app's
lifespan, so the engine thread starts and stops as in `n4 serve`)."""
from __future__ import annotations

import contextlib

import pytest
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.api.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.engine import AsyncEngine, LLMEngine

MODEL_NAME = "tiny"


@contextlib.contextmanager
def serve_checkpoint(path: str, **engine_kwargs):
    engine_kwargs.setdefault("max_model_len", 256)
    engine_kwargs.setdefault("num_kv_blocks", 128)
    engine = LLMEngine.from_pretrained(path, EngineConfig(**engine_kwargs), dtype="float32")
    app = build_app(AsyncEngine(engine), Tokenizer.from_pretrained(path), MODEL_NAME)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def demo_tokenizer_vocab() -> int:
    from server.api.cli import DEMO_MODEL
    return Tokenizer.from_pretrained(DEMO_MODEL).vocab_size
