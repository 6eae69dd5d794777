"""The batched sampler: logits processing formulas, filters, seeded reproducibility, logprobs."""
import math

import pytest
import torch

import server.engine.sampler as sampler_module
from server.engine.request import Request
from server.engine.sampler import Sampler, SamplerOutput, TokenLogprobs, compute_prompt_logprobs, process_logits
from server.engine.sampling import SamplingParams

NEG_INF = -math.inf


def make_request(request_id="r", prompt=(1, 2), output=(), eos=None, **params) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(max_tokens=64, **params), eos_token_id=eos)
    request.output_token_ids = list(output)
    return request


def probs_to_logits(probs) -> torch.Tensor:
    return torch.as_tensor(probs, dtype=torch.float32).log()


def draw_many(logits_row: torch.Tensor, rows: int, seed=0, **params) -> torch.Tensor:
    """Sample `rows` independent draws of one distribution in a single batched call."""
    logits = logits_row.unsqueeze(0).expand(rows, -1).contiguous()                 # [rows, V]
    requests = [make_request(f"r{i}", **params) for i in range(rows)]
    return torch.tensor(Sampler(seed=seed)(logits, requests).token_ids)


# --- choosing tokens ------------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_mixed_batches_keep_greedy_rows_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    requests = [make_request(f"r{i}", temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = Sampler(seed=0)(logits, requests)
    assert isinstance(out, SamplerOutput) and out.logprobs == [None] * 6
    expected = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    all_greedy = Sampler()(logits, [make_request(f"g{i}", temperature=0.0) for i in range(6)])
    assert all_greedy.token_ids == expected


def test_empty_batch():
    assert Sampler()(torch.zeros(0, 10), []) == SamplerOutput([], [])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_temperature_sampling_matches_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5])
    draws = draw_many(logits, 20000, temperature=temperature)
    observed = torch.bincount(draws, minlength=6).double()
    expected = (logits.double() / temperature).softmax(-1) * len(draws)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0          # 5 degrees of freedom: P(chi2 > 30) is about 1.5e-5


def test_top_k_only_samples_the_k_best():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1))
    draws = draw_many(logits, 4000, top_k=3)
    assert set(draws.tolist()) == set(logits.topk(3).indices.tolist())


def test_top_k_off_values_and_k_above_vocab():
    logits = torch.zeros(5)
    assert set(draw_many(logits, 2000, top_k=-1).tolist()) == set(range(5))
    assert set(draw_many(logits, 2000, top_k=100).tolist()) == set(range(5))
    # Any int passes validation; one past int64 once overflowed the k tensor and failed the whole step.
    assert set(draw_many(logits, 2000, top_k=2 ** 63, top_p=0.9).tolist()) == set(range(5))


@pytest.mark.parametrize("temperature", [1e-6, 1e-40])
def test_temperature_below_epsilon_is_greedy(temperature):
    # Dividing logits by 1e-40 overflows to inf, and the draw from their NaN softmax was token 0 every time.
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    requests = [make_request(f"r{i}", temperature=temperature, seed=i) for i in range(8)]
    assert Sampler(seed=0)(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = probs_to_logits([0.15, 0.5, 0.05, 0.3])
    # 0.5 < 0.7 <= 0.5 + 0.3: exactly tokens 1 and 3 stay, at 0.5 : 0.3.
    draws = draw_many(logits, 8000, top_p=0.7)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() / len(draws) - 0.625) < 0.03


def test_top_p_always_keeps_the_top_token():
    logits = probs_to_logits([0.24, 0.25, 0.26, 0.25])
    assert set(draw_many(logits, 2000, top_p=1e-6).tolist()) == {2}


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = probs_to_logits([0.5, 0.3, 0.15, 0.04, 0.01])
    draws = draw_many(logits, 6000, min_p=0.2)          # bar: 0.2 * 0.5 = 0.1
    assert set(draws.tolist()) == {0, 1, 2}


def reference_keep_set(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Top-k, min-p, top-p by the book, in float64 with a full sort."""
    probs = row.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    kept = [t for t in kept if probs[t] >= min_p * probs[order[0]]]
    total = sum(probs[t].item() for t in kept)
    prefix, mass = [], 0.0
    for t in kept:
        if mass >= top_p:
            break
        prefix.append(t)
        mass += probs[t].item() / total
    return set(prefix)


@pytest.mark.parametrize("vocab, scale", [(40, 1.0), (3000, 4.0), (3000, 0.3)])
def test_kept_sets_match_the_textbook_definition(vocab, scale):
    """(3000, 4.0): peaked rows, the top-p prefix fits in the first 256 candidates (topk path);
    (3000, 0.3): flat rows, it does not (full-sort fallback); (40, 1.0): vocab under the candidate count."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 24
    logits = torch.randn(rows, vocab, generator=gen) * scale
    choices = dict(top_k=[0, 0, 1, 5, 300], top_p=[1.0, 0.3, 0.75, 0.95], min_p=[0.0, 0.0, 0.05])
    params = [SamplingParams(**{name: values[(i * (j + 2)) % len(values)] for j, (name, values)
                                in enumerate(choices.items())}) for i in range(rows)]
    filtered = [i for i, p in enumerate(params) if p.top_k_enabled or p.top_p < 1.0]
    x = sampler_module._apply_min_p(logits[filtered], [params[i] for i in filtered])
    top_k = [params[i].top_k for i in filtered]
    top_p = [params[i].top_p for i in filtered]
    candidates, token_idx, log_total = sampler_module._top_k_candidates(x, top_k, top_p)
    candidates = sampler_module._mask_top_p(candidates, top_p, log_total)
    for r, i in enumerate(filtered):
        kept = set(token_idx[r][candidates[r].isfinite()].tolist())
        assert kept == reference_keep_set(logits[i], params[i].top_k, params[i].top_p, params[i].min_p), params[i]


def test_top_p_on_the_topk_path_normalizes_by_the_whole_vocabulary():
    """2000 tokens: 0.5, 0.3 and 1998 sharing 0.2. Only the first 256 are candidates, yet the mass before token
    1 is 0.5 of the whole, under top_p = 0.55, so token 1 stays."""
    probs = torch.full((2000,), 0.2 / 1998)
    probs[0], probs[1] = 0.5, 0.3
    draws = draw_many(probs_to_logits(probs), 4000, top_p=0.55)
    counts = torch.bincount(draws, minlength=2000)
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() / len(draws) - 0.625) < 0.03


def test_filters_compose_in_a_mixed_batch():
    """Rows with different filters in one batch (full-sort path), and all rows with top-k (topk path)."""
    logits_row = probs_to_logits([0.4, 0.25, 0.2, 0.1, 0.05])
    kinds = [dict(top_k=2), dict(top_p=0.6), dict(min_p=0.4), dict(top_k=4, top_p=0.8), dict()]
    requests = [make_request(f"r{i}", **kinds[i % len(kinds)]) for i in range(2500)]
    tokens = torch.tensor(Sampler(seed=3)(logits_row.expand(2500, -1).contiguous(), requests).token_ids)
    allowed = [{0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3, 4}]
    for kind, allowed_set in enumerate(allowed):
        assert set(tokens[kind::len(kinds)].tolist()) == allowed_set
    only_top_k = [make_request(f"k{i}", top_k=1 + i % 3, top_p=0.7) for i in range(900)]
    tokens = torch.tensor(Sampler(seed=4)(logits_row.expand(900, -1).contiguous(), only_top_k).token_ids)
    assert set(tokens[0::3].tolist()) == {0} and set(tokens[1::3].tolist()) == {0, 1}
    assert set(tokens[2::3].tolist()) == {0, 1}


# --- logits processing ----------------------------------------------------------------------------------------

def test_process_logits_returns_input_untouched_when_nothing_applies():
    logits = torch.randn(3, 10)
    assert process_logits(logits, [make_request(f"r{i}") for i in range(3)]) is logits


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[1.0, 2.0, -1.0, 3.0, -2.0, 0.5],
                           [1.0, 2.0, -1.0, 3.0, -2.0, 0.5]])
    raw = logits.clone()
    requests = [make_request("a", prompt=[1, 2], output=[2, 3], repetition_penalty=2.0),
                make_request("b", prompt=[1, 2], output=[2, 3])]
    out = process_logits(logits, requests)
    assert torch.equal(out[0], torch.tensor([1.0, 1.0, -2.0, 1.5, -2.0, 0.5]))
    assert torch.equal(out[1], raw[1])
    assert torch.equal(logits, raw)            # the raw logits stay raw (logprobs read them)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 6)
    request = make_request(prompt=[1, 1, 5], output=[3, 3, 4], frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(logits, [request])
    expected = torch.tensor([[0.0, 0.0, 0.0, -(0.5 * 2 + 0.25), -(0.5 + 0.25), 0.0]])
    assert torch.allclose(out, expected)
    negative = make_request(output=[2], frequency_penalty=-1.0, presence_penalty=-2.0)
    assert process_logits(torch.zeros(1, 4), [negative])[0, 2].item() == 3.0


def test_penalty_order_repetition_then_frequency():
    logits = torch.tensor([[4.0, -4.0]])
    request = make_request(prompt=[], output=[0, 1], repetition_penalty=2.0, frequency_penalty=1.0)
    assert torch.equal(process_logits(logits, [request]), torch.tensor([[2.0 - 1.0, -8.0 - 1.0]]))


def test_logit_bias_adds_and_forces_a_token():
    logits = torch.zeros(2, 8)
    requests = [make_request("a", logit_bias={7: 100.0, 2: -3.5}), make_request("b")]
    out = process_logits(logits, requests)
    assert out[0, 7].item() == 100.0 and out[0, 2].item() == -3.5 and out[1].abs().sum().item() == 0
    draws = draw_many(torch.randn(8), 500, logit_bias={7: 100.0})
    assert set(draws.tolist()) == {7}


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 9.0, 8.0, 0.0]]).expand(4, -1)
    requests = [make_request("young", output=[1], eos=5, min_tokens=2, stop_token_ids=(6,)),
                make_request("grown", output=[1, 1], eos=5, min_tokens=2, stop_token_ids=(6,)),
                make_request("ignore", output=[1], eos=5, min_tokens=2, stop_token_ids=(6,), ignore_eos=True),
                make_request("no_eos", output=[], eos=None, min_tokens=2)]
    out = process_logits(logits, requests)
    assert out[0, 5] == NEG_INF and out[0, 6] == NEG_INF
    assert torch.equal(out[1], logits[1])
    assert out[2, 5] == 9.0 and out[2, 6] == NEG_INF     # with ignore_eos EOS is an ordinary token
    assert torch.equal(out[3], logits[3])
    greedy = [make_request("g", output=[1], eos=5, min_tokens=2, stop_token_ids=(6,), temperature=0.0)]
    assert Sampler()(logits[:1], greedy).token_ids == [1]


# --- seeds ----------------------------------------------------------------------------------------------------

def seeded_run(batch_builder, steps=6, vocab=500, **params):
    """Tokens the seeded request 'target' gets over `steps` steps in batches built around it."""
    logits_gen = torch.Generator().manual_seed(11)
    target_logits = [torch.randn(vocab, generator=logits_gen) for _ in range(steps)]
    sampler = Sampler()                 # unseeded rows: nondeterministic, must not matter
    target = make_request("target", seed=1234, **params)
    tokens = []
    for step in range(steps):
        requests, position = batch_builder(target)
        logits = torch.randn(len(requests), vocab)
        logits[position] = target_logits[step]
        token = sampler(logits, requests).token_ids[position]
        tokens.append(token)
        target.output_token_ids.append(token)
    return tokens


def alone(target):
    return [target], 0


def crowded(target):
    others = [make_request("u1", temperature=0.8, top_k=50), make_request("s2", seed=7, top_p=0.5),
              make_request("g3", temperature=0.0, logprobs=2)]
    return others + [target], 3


def in_front_with_top_k_neighbour(target):
    return [target, make_request("k", top_k=3)], 0


def behind_a_flat_top_p_row(target):
    """A top-p row whose prefix cannot fit the candidate window sends the whole batch down the full sort."""
    return [make_request("p", top_p=0.999), target], 1


@pytest.mark.parametrize("params", [dict(), dict(top_p=0.9), dict(top_k=20), dict(top_k=20, top_p=0.8, min_p=0.05),
                                    dict(temperature=0.5, frequency_penalty=0.3), dict(temperature=0.3, top_p=0.6)])
def test_seeded_request_reproduces_across_batch_compositions(params):
    reference = seeded_run(alone, **params)
    assert seeded_run(crowded, **params) == reference
    assert seeded_run(in_front_with_top_k_neighbour, **params) == reference
    assert seeded_run(behind_a_flat_top_p_row, **params) == reference


def test_free_restarts_a_seeded_stream_and_seeds_differ():
    sampler = Sampler()
    logits = torch.zeros(1, 1000)

    def stream(request_id, seed):
        return [sampler(logits, [make_request(request_id, seed=seed)]).token_ids[0] for _ in range(5)]

    first = stream("a", 1)
    sampler.free("a")
    assert stream("a", 1) == first
    assert stream("b", 2) != first
    sampler.free("never-seen")          # a no-op


# --- logprobs -------------------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_rank_and_sorted_top():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    requests = [make_request("a", logprobs=5, temperature=0.3, repetition_penalty=1.8, prompt=list(range(10))),
                make_request("b"),
                make_request("c", logprobs=0, logit_bias={4: 50.0})]
    out = Sampler(seed=0)(logits, requests)
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        entry = out.logprobs[row]
        assert isinstance(entry, TokenLogprobs) and entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(raw[row, entry.token_id].item(), abs=1e-6)
        assert entry.rank == int((raw[row] > raw[row, entry.token_id]).sum()) + 1
    assert out.token_ids[2] == 4 and out.logprobs[2].top == []
    top = out.logprobs[0].top
    assert [t for t, _ in top] == raw[0].topk(5).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert all(lp == pytest.approx(raw[0, t].item(), abs=1e-6) for t, lp in top)


def test_compute_prompt_logprobs_in_chunks(monkeypatch):
    monkeypatch.setattr(sampler_module, "_LOGPROB_CHUNK_ELEMENTS", 3 * 17)       # three rows per chunk
    logits = torch.randn(7, 17, generator=torch.Generator().manual_seed(9))
    targets = [3, 0, 16, 5, 5, 1, 2]
    entries = compute_prompt_logprobs(logits, targets, k=2)
    raw = logits.log_softmax(dim=-1)
    assert len(entries) == 7
    for i, (target, entry) in enumerate(zip(targets, entries)):
        assert entry.token_id == target
        assert entry.logprob == pytest.approx(raw[i, target].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[i] > raw[i, target]).sum())
        assert [t for t, _ in entry.top] == raw[i].topk(2).indices.tolist()
    assert compute_prompt_logprobs(logits, torch.tensor(targets), k=0)[0].top == []


def test_single_finite_logit_gives_no_nan():
    logits = torch.full((4, 12), NEG_INF)
    logits[:, 9] = 3.0
    requests = [make_request("greedy", temperature=0.0, logprobs=3),
                make_request("plain", logprobs=3),
                make_request("filters", top_k=5, top_p=0.3, min_p=0.5, logprobs=3, seed=1),
                make_request("penalties", output=[9, 9], repetition_penalty=1.3, frequency_penalty=2.0,
                             presence_penalty=1.0, logprobs=3)]
    for _ in range(20):
        out = Sampler()(logits, requests)
        assert out.token_ids == [9, 9, 9, 9]
        for entry in out.logprobs:
            assert entry.logprob == 0.0 and entry.rank == 1 and entry.top[0] == (9, 0.0)
            assert not any(math.isnan(lp) for _, lp in entry.top)


# --- cost -----------------------------------------------------------------------------------------------------
