"""Reward checkpoints (the Nemotron-4-340B-Reward layout): recognised from config.json, loaded with a [9, hidden] head,
and run by the engine so that each request finishes with the head's 9 values at its last prompt token, equal to
transformers' NemotronModel hidden state there times the head (fp32)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from model.config import ModelConfig
from model.errors import CheckpointError
from model.loader import load_model
from model.nemotron import NemotronForCausalLM, NemotronForRewardModel
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.utils import hf_model, make_tiny_checkpoint, make_tiny_reward_checkpoint

CONFIG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")
SEED = 5
PROMPTS = {f"r{i}": torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(i)).tolist()
           for i, n in enumerate((1, 7, 16, 23, 40))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_tiny_reward_checkpoint(str(tmp_path_factory.mktemp("reward")), CONFIG, seed=SEED)


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[str, list[float]]:
    """transformers' NemotronModel (the base of the same seeded model) at each prompt's last token, times the head."""
    head = load_file(os.path.join(checkpoint, "model.safetensors"))["lm_head.weight"].float()  # [9, hidden]
    base = hf_model(CONFIG, SEED).model
    out = {}
    with torch.no_grad():
        for key, prompt in PROMPTS.items():
            hidden = base(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]  # [hidden]
            out[key] = (head @ hidden.float()).tolist()                             # [9]
    return out


def _run(path: str, prompts: dict[str, list[int]], one_at_a_time: bool = False, **engine_kwargs) -> dict:
    engine_kwargs = {"max_model_len": 64, "num_kv_blocks": 64, "block_size": 4, **engine_kwargs}
    values, reasons = {}, {}
    groups = [[key] for key in prompts] if one_at_a_time else [list(prompts)]
    with LLMEngine.from_pretrained(path, EngineConfig(**engine_kwargs)) as engine:
        for group in groups:
            for key in group:
                engine.add_request(key, prompts[key], SamplingParams(max_tokens=0))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    assert not out.new_token_ids
                    if out.reward is not None:
                        assert out.request_id not in values
                        values[out.request_id] = out.reward
                    if out.finished:
                        reasons[out.request_id] = out.finish_reason
        assert not engine.scheduler.running and not engine.requests  # nothing kept beyond the prompts
    assert set(reasons.values()) == {"stop"}
    return values


def test_config_marker(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint)
    assert config.is_reward and config.num_labels == 9
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert config.to_hf()["architectures"] == ["NemotronForRewardModel"]
    # Without num_labels the 340B-Reward width (9) is assumed; without the architecture it is a causal LM.
    hf = config.to_hf()
    del hf["num_labels"]
    assert ModelConfig.from_hf(hf).num_labels == 9
    assert not ModelConfig.from_hf(CONFIG.to_hf()).is_reward
    with pytest.raises(ValueError, match="num_labels"):
        CONFIG.with_(num_labels=-1)


def test_loads_a_replicated_fp32_head(checkpoint, tmp_path):
    net, config = load_model(checkpoint, dtype="bfloat16")
    assert isinstance(net, NemotronForRewardModel) and config.torch_dtype == "bfloat16"
    assert net.lm_head.weight.shape == (9, CONFIG.hidden_size) and net.lm_head.weight.dtype == torch.float32
    hidden = torch.randn(3, CONFIG.hidden_size, dtype=torch.bfloat16)
    values = net.compute_rewards(hidden)
    assert values.dtype == torch.float32 and values.shape == (3, 9)
    base, _ = load_model(make_tiny_checkpoint(str(tmp_path), CONFIG, seed=SEED))
    assert type(base) is NemotronForCausalLM


def test_engine_values_match_transformers(checkpoint, reference):
    values = _run(checkpoint, PROMPTS)
    for key, expected in reference.items():
        torch.testing.assert_close(torch.tensor(values[key]), torch.tensor(expected), rtol=0, atol=1e-4)


def test_batched_chunked_and_cached_equal_one_at_a_time(checkpoint, reference):
    alone = _run(checkpoint, PROMPTS, one_at_a_time=True)
    # A 6-token budget splits the longer prompts over several steps, next to other requests' chunks.
    chunked = _run(checkpoint, PROMPTS, max_num_batched_tokens=6, max_num_seqs=3)
    # The same prompts twice with prefix caching: the second pass reuses cached blocks but still scores.
    repeated = {**PROMPTS, **{k + "-again": v for k, v in PROMPTS.items()}}
    cached = _run(checkpoint, repeated, one_at_a_time=True, enable_prefix_caching=True)
    for key in PROMPTS:
        for other in (chunked[key], cached[key], cached[key + "-again"]):
            torch.testing.assert_close(torch.tensor(other), torch.tensor(alone[key]), rtol=0, atol=1e-5)


def test_head_alias_and_shape_errors(checkpoint, tmp_path):
    alias = make_tiny_reward_checkpoint(str(tmp_path / "alias"), CONFIG, seed=SEED, head_name="score.weight")
    torch.testing.assert_close(load_model(alias)[0].lm_head.weight, load_model(checkpoint)[0].lm_head.weight)
    # A reward marker on a checkpoint whose lm_head is still [vocab, hidden] names the tensor and both shapes.
    wrong = make_tiny_checkpoint(str(tmp_path / "wrong"), CONFIG, seed=SEED)
    with open(os.path.join(wrong, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump({**hf, "architectures": ["NemotronForRewardModel"], "num_labels": 9}, f)
    with pytest.raises(CheckpointError, match=r"lm_head.weight.*\[512, 64\].*\[9, 64\]"):
        load_model(wrong)


def test_engine_refuses_generation_on_a_reward_model(checkpoint):
    engine = LLMEngine.from_pretrained(checkpoint, EngineConfig(max_model_len=64, num_kv_blocks=32, block_size=4))
    with pytest.raises(ValueError, match="max_tokens must be 0"):
        engine.add_request("gen", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request("lp", [1, 2, 3], SamplingParams(max_tokens=0, prompt_logprobs=1))


def test_tensor_parallel_equals_single_rank(checkpoint, reference):
    values = _run(checkpoint, PROMPTS, tensor_parallel_size=2, tp_timeout_s=60)
    for key, expected in reference.items():
        torch.testing.assert_close(torch.tensor(values[key]), torch.tensor(expected), rtol=0, atol=1e-4)
