"""The training model against transformers.NemotronForCausalLM (the oracle), and packing semantics."""
from __future__ import annotations

import pytest
import torch
import transformers

from model.config import PRESETS, ModelConfig
from n4_train.modeling import TrainableNemotron
from n4_train.precision import resolve_precision

CONFIGS = {
    "tiny-340b-layout": PRESETS["tiny-340b-layout"],  # 12 query heads per KV head, head_dim 24
    "mha-full-rotary": ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                   partial_rotary_factor=1.0, torch_dtype="float32"),
}


def _pair(config: ModelConfig):
    net = TrainableNemotron(config, resolve_precision("fp32", "cpu"))
    net.init_weights(0, std=0.1)
    with torch.no_grad():  # non-trivial LayerNorm1P parameters, so the +1 convention is exercised
        for name, param in net.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    hf_config = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    reference = transformers.NemotronForCausalLM(transformers.NemotronConfig(**hf_config)).eval()
    reference.load_state_dict(net.hf_state_dict(), strict=True)  # the same names, nothing missing or extra
    return net, reference


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    net, reference = _pair(CONFIGS[name])
    ids = torch.randint(0, CONFIGS[name].vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), reference(ids).logits.float(), atol=1e-5, rtol=1e-5)


def test_packed_documents_see_only_themselves():
    net, reference = _pair(CONFIGS["tiny-340b-layout"])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 512, (7,), generator=g), torch.randint(0, 512, (10,), generator=g)
    row = torch.cat([a, b, torch.zeros(3, dtype=torch.long)])[None]                # [1, 20], 3 pad tokens
    positions = torch.cat([torch.arange(7), torch.arange(10), torch.zeros(3, dtype=torch.long)])[None]
    segments = torch.tensor([1] * 7 + [2] * 10 + [0] * 3)[None]
    with torch.no_grad():
        packed = net(row, positions, segments)[0]
        assert torch.isfinite(packed).all()  # padding rows attend to themselves: no NaN
        torch.testing.assert_close(packed[:7], reference(a[None]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[7:17], reference(b[None]).logits[0], atol=1e-5, rtol=1e-5)


def test_gradients_match_transformers():
    net, reference = _pair(CONFIGS["tiny-340b-layout"])
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.nn.functional.cross_entropy(net(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    reference(ids, labels=ids).loss.backward()
    theirs = dict(reference.named_parameters())
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reward_layout_has_a_nine_wide_head():
    config = PRESETS["tiny"].with_(num_labels=9)
    net = TrainableNemotron(config, resolve_precision("fp32", "cpu"))
    assert net.lm_head.weight.shape == (9, config.hidden_size)
    assert net(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 9)


def test_activation_checkpointing_gives_the_same_gradients():
    net, _ = _pair(CONFIGS["tiny-340b-layout"])
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    grads, saved = [], []
    for checkpointing in (False, True):
        net.zero_grad()
        net.activation_checkpointing = checkpointing
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = net(ids).logsumexp(-1).sum()
        loss.backward()
        saved.append(count[0])
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert saved[1] < saved[0] / 2, saved  # the layers' internals are not kept for the backward pass
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-6, msg=name)
