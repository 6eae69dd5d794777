"""/metrics: vLLM's metric names under `n4:`, a `model_name` label on every sample, gauges and engine counters
read at scrape time, request histograms observed per request, and one registry per app."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.config import ModelConfig
from tests.api.conftest import MODEL_NAME, make_app, metric_value, serve_checkpoint
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                     torch_dtype="float32")
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
COUNTERS = ["prompt_tokens", "generation_tokens", "num_preemptions", "request_success", "prefix_cache_queries",
            "prefix_cache_hits"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("metrics")), CONFIG, seed=9)


@pytest.fixture(scope="module")
def client(checkpoint):
    with serve_checkpoint(checkpoint, enable_prefix_caching=True) as c:
        yield c


def _scrape(client) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_every_metric_is_exposed_with_the_model_label(client):
    text = _scrape(client)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in GAUGES:
        assert families[f"n4:{name}"].type == "gauge"
    for name in COUNTERS:
        assert families[f"n4:{name}"].type == "counter"
    for name in HISTOGRAMS:
        assert families[f"n4:{name}"].type == "histogram"
    for family in families.values():
        if family.name.startswith("n4:"):
            assert family.samples and all(s.labels.get("model_name") == MODEL_NAME for s in family.samples)
    assert "_created" not in text
    for reason in ("stop", "length", "abort"):   # present from the start
        assert metric_value(text, "n4:request_success_total", finished_reason=reason) == 0


def test_requests_move_the_counters_and_histograms(client):
    before = _scrape(client)
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7, 8], "max_tokens": 5,
                                             "ignore_eos": True})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # Forced to token 700, which is also a stop token: finishes "stop" at its first token.
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [9, 10], "max_tokens": 5,
                                             "logit_bias": {"700": 100}, "stop_token_ids": [700]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    after = _scrape(client)

    def delta(name: str, **labels) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("n4:prompt_tokens_total") == 6
    assert delta("n4:generation_tokens_total") == 6
    assert delta("n4:request_success_total", finished_reason="length") == 1
    assert delta("n4:request_success_total", finished_reason="stop") == 1
    assert delta("n4:time_to_first_token_seconds_count") == 2
    assert delta("n4:inter_token_latency_seconds_count") == 4
    assert delta("n4:e2e_request_latency_seconds_count") == 2
    assert delta("n4:e2e_request_latency_seconds_sum") > 0
    # Both requests are timed, the one that finished in its first step too (its output carries the scheduling time).
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"n4:{name}_count") == 2
    assert delta("n4:prefix_cache_queries_total") == 6
    assert metric_value(after, "n4:num_requests_running") == 0
    assert metric_value(after, "n4:num_requests_waiting") == 0
    assert metric_value(after, "n4:kv_cache_usage_perc") == 0


def test_a_prompt_scored_in_one_step_is_timed(client):
    before = _scrape(client)
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 0,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    after = _scrape(client)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "e2e_request_latency_seconds"):
        assert metric_value(after, f"n4:{name}_count") == metric_value(before, f"n4:{name}_count") + 1, name


def test_streamed_requests_are_measured_too(client):
    before = _scrape(client)
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "stream": True, "max_tokens": 3,
                                                  "ignore_eos": True, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and "[DONE]" in r.text
    after = _scrape(client)
    assert metric_value(after, "n4:e2e_request_latency_seconds_count") == \
        metric_value(before, "n4:e2e_request_latency_seconds_count") + 1


def test_each_app_has_its_own_registry(checkpoint, client):
    other = make_app(checkpoint)   # a second app in the same process: no duplicate-registration error
    text = other.state.metrics.render().decode()
    assert metric_value(text, "n4:e2e_request_latency_seconds_count") == 0
    assert metric_value(_scrape(client), "n4:e2e_request_latency_seconds_count") > 0
