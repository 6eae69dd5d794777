"""An engine that dies mid-request: streams end with an error event and [DONE], later requests get 503, and
/health turns 503 — the HTTP server itself stays up to say so."""
from __future__ import annotations

import json

from model.config import ModelConfig
from tests.api.conftest import MODEL_NAME, serve_checkpoint
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                     torch_dtype="float32")


def test_engine_failure_is_reported_not_fatal(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), CONFIG, seed=0)
    with serve_checkpoint(path) as client:
        runner = client.app.state.engine.engine.runner
        calls = {"n": 0}
        real_execute = runner.execute

        def failing_execute(batch):
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("simulated device fault")
            return real_execute(batch)

        runner.execute = failing_execute
        r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "stream": True, "max_tokens": 20,
                                                      "ignore_eos": True,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.text.split("\n\n") if line.strip()]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "simulated device fault" in error["message"] and error["type"] == "server_error"

        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
