"""Every stage end to end through `n4-train`, on the CPU with tiny models: pretraining lowers held-out loss, SFT
learns its answers, the reward model reaches its correlation target, DPO raises the held-out margin, and every
exported checkpoint gives the same numbers in `n4 serve`, in transformers and in the training model."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from helpers import DEMO, WORDS, chat_records, helpsteer_records, text_corpus, write_config, write_jsonl
from n4_train.checkpoint import build_model
from n4_train.cli import main
from n4_train.data import ATTRIBUTES
from n4_train.precision import resolve_precision
from n4_train.stages import reward_values
from n4_train.tokenization import TrainTokenizer, reward_text
from tests.api.conftest import MODEL_NAME, serve_checkpoint


def _train(stage: str, *args: str) -> dict:
    assert main([stage, *args]) == 0
    output = args[list(args).index("--output") + 1]
    with open(os.path.join(output, "training_summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def pretrained(workdir):
    corpus = text_corpus(str(workdir / "corpus.txt"), 300, seed=0)
    heldout = text_corpus(str(workdir / "heldout.txt"), 30, seed=1)
    output = str(workdir / "pretrained")
    summary = _train("pretrain", "--model", write_config(str(workdir / "config.json")), "--tokenizer", DEMO,
                     "--data", corpus, "--eval-data", heldout, "--output", output, "--seq-len", "64",
                     "--batch-size", "8", "--max-steps", "60", "--lr", "3e-3", "--warmup-steps", "5",
                     "--eval-every", "30", "--export-dtype", "float32")
    return output, summary


def test_pretraining_lowers_held_out_loss_far_below_uniform(pretrained):
    output, summary = pretrained
    log = [json.loads(line) for line in open(os.path.join(output, "train_log.jsonl"))]
    evals = [r["eval"]["loss"] for r in log if "eval" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    # Uniform over 4096 tokens is 8.32 nats; this regular language is learnable to well under half of it.
    assert summary["uniform_baseline_loss"] == pytest.approx(8.3178, abs=1e-3)
    assert summary["eval"]["loss"] < 4.0


def test_exported_lm_gives_equal_prompt_logprobs_in_n4_serve_transformers_and_training(pretrained):
    output, _ = pretrained
    tokenizer = TrainTokenizer(output)
    prompt = tokenizer.encode("list tuple dict list tuple dict list")
    with serve_checkpoint(output) as client:
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "echo": True,
                                                 "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    served = torch.tensor(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    targets = torch.tensor(prompt[1:])
    positions = torch.arange(len(prompt) - 1)
    hf = transformers.NemotronForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    net = build_model(output, resolve_precision("fp32", "cpu")).eval()
    with torch.no_grad():
        hf_lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)[positions, targets]
        ours = torch.log_softmax(net(torch.tensor([prompt]))[0], -1)[positions, targets]
    torch.testing.assert_close(served, hf_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, hf_lp, atol=1e-4, rtol=0)


def test_sft_teaches_the_answers_the_server_then_gives(pretrained, workdir):
    base, _ = pretrained
    data = write_jsonl(str(workdir / "chat.jsonl"), chat_records(400, seed=0))
    output = str(workdir / "sft")
    summary = _train("sft", "--model", base, "--data", data, "--output", output, "--seq-len", "128",
                     "--batch-size", "8", "--max-steps", "200", "--lr", "1e-2", "--warmup-steps", "5",
                     "--export-dtype", "float32")
    # 4 trained tokens per answer: the word, its repetition, "\n" and <extra_id_1>.
    assert summary["skipped"] == 0 and summary["trained_tokens_per_epoch"] == 4 * 400
    assert summary["train"]["loss"] < 0.5
    with serve_checkpoint(output) as client:
        answers = {word: client.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": f"{word}: say it twice."}],
            "max_tokens": 8, "temperature": 0}).json()["choices"][0] for word in WORDS}
    # The template closes a turn with "\n<extra_id_1>": the answer ends with that newline, and the trained turn
    # end is the server's chat stop token, so every answer stops by itself.
    assert all(a["finish_reason"] == "stop" for a in answers.values())
    correct = [w for w, a in answers.items() if a["message"]["content"] == f"{w} {w}\n"]
    # Chance is 1 in 27; this 2-layer, 64-wide model measured 21 of 27 after 200 steps (23 after 400).
    assert len(correct) >= 18, answers


@pytest.fixture(scope="module")
def reward_model(workdir):
    train = write_jsonl(str(workdir / "hs_train.jsonl"), helpsteer_records(1200, seed=0))
    heldout = write_jsonl(str(workdir / "hs_heldout.jsonl"), helpsteer_records(200, seed=1))
    output = str(workdir / "rm")
    summary = _train("rm", "--model", write_config(str(workdir / "rm_config.json")), "--tokenizer", DEMO,
                     "--data", train, "--eval-data", heldout, "--output", output, "--seq-len", "64",
                     "--batch-size", "32", "--max-steps", "150", "--lr", "3e-3", "--warmup-steps", "10",
                     "--export-dtype", "float32")
    return output, summary


def test_reward_model_correlates_above_0_8_on_every_held_out_attribute(reward_model):
    _, summary = reward_model
    for name in ATTRIBUTES:
        assert summary["eval"][name]["pearson"] > 0.8, (name, summary["eval"][name])


def test_exported_reward_model_scores_the_same_in_n4_serve(reward_model):
    output, _ = reward_model
    config = json.load(open(os.path.join(output, "config.json")))
    assert config["architectures"] == ["NemotronForRewardModel"] and config["num_labels"] == 9
    messages = [{"role": "user", "content": "Tell me about sets."},
                {"role": "assistant", "content": "yes sure the module of true then"}]
    with serve_checkpoint(output) as client:
        r = client.post("/v1/rewards", json={"model": MODEL_NAME, "messages": messages})
    assert r.status_code == 200, r.text
    served = torch.tensor(r.json()["raw"])
    tokenizer = TrainTokenizer(output)
    ids = torch.tensor([tokenizer.encode(reward_text(messages))])
    net = build_model(output, resolve_precision("fp32", "cpu"), reward=True).eval()
    backbone = transformers.NemotronModel.from_pretrained(output, dtype=torch.float32).eval()  # the HF oracle
    head = net.lm_head.weight
    with torch.no_grad():
        ours = reward_values(net, ids, torch.tensor([ids.shape[1] - 1]))[0]
        oracle = backbone(ids).last_hidden_state[0, -1] @ head.T
    torch.testing.assert_close(served, oracle, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=0)


def _pairs(count: int, seed: int, rewards: tuple[float, float] = (3.0, 1.0)) -> list[dict]:
    """The chosen answer opens with "yes", the rejected one with "no"; the rest is the same random words."""
    import random
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = " ".join(rng.choices(WORDS, k=3))
        pairs.append({"prompt": f"{rng.choice(WORDS)}: tell me.", "chosen": f"yes {words}",
                      "rejected": f"no {words}", "chosen_reward": rewards[0], "rejected_reward": rewards[1]})
    return pairs


@pytest.mark.parametrize("method", ["dpo", "rpo"])
def test_preference_steps_raise_the_held_out_margin(pretrained, workdir, method):
    base, _ = pretrained
    train = write_jsonl(str(workdir / "pairs.jsonl"), _pairs(64, seed=0))
    heldout = write_jsonl(str(workdir / "pairs_heldout.jsonl"), _pairs(32, seed=1))
    summary = _train(method, "--model", base, "--data", train, "--eval-data", heldout,
                     "--output", str(workdir / method), "--batch-size", "8", "--max-steps", "16", "--lr", "3e-3",
                     "--beta", "0.1", "--export-dtype", "float32")
    assert summary["eval_before"]["margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert summary["eval"]["margin"] > 1.0 and summary["eval"]["accuracy"] > 0.9


def test_rpo_fits_the_reward_gap_where_dpo_keeps_pushing(pretrained, workdir):
    """With a reward gap of 0.5, η = 1 and β = 0.1, RPO's optimum is Δ = η·gap/β = 5 nats: RPO settles near it,
    while DPO on the same pairs drives Δ past it (its loss only falls as Δ grows)."""
    base, _ = pretrained
    train = write_jsonl(str(workdir / "close_pairs.jsonl"), _pairs(64, seed=2, rewards=(1.5, 1.0)))
    heldout = write_jsonl(str(workdir / "close_pairs_heldout.jsonl"), _pairs(32, seed=3, rewards=(1.5, 1.0)))
    margins = {}
    for method in ("dpo", "rpo"):
        margins[method] = _train(method, "--model", base, "--data", train, "--eval-data", heldout,
                                 "--output", str(workdir / f"close_{method}"), "--batch-size", "8",
                                 "--max-steps", "40", "--lr", "3e-3", "--beta", "0.1", "--eta", "1.0",
                                 "--export-dtype", "float32")["eval"]["margin"]
    # Measured: RPO 5.01, DPO 45.1 after 40 steps.
    assert 4.0 < margins["rpo"] < 6.0, margins
    assert margins["dpo"] > 2 * margins["rpo"], margins


def test_rpo_leaves_out_pairs_whose_rewards_contradict_the_ranking(pretrained, workdir):
    base, _ = pretrained
    pairs = _pairs(16, seed=4)
    for pair in pairs[:5]:  # ground-truth pairs on which the reward model preferred the wrong answer
        pair["chosen_reward"], pair["rejected_reward"] = 0.5, 2.0
    data = write_jsonl(str(workdir / "contradicted.jsonl"), pairs)
    for method, expected_pairs, skipped in (("rpo", 11, 5), ("dpo", 16, None)):
        summary = _train(method, "--model", base, "--data", data, "--output",
                         str(workdir / f"contradicted_{method}"), "--batch-size", "4", "--max-steps", "1")
        assert summary["pairs"] == expected_pairs
        assert summary["skipped_reward_contradicts_preference"] == (skipped or 0)


def test_bad_input_is_one_line_and_exit_2(workdir, capsys):
    code = main(["sft", "--model", DEMO, "--data", str(workdir / "absent.jsonl"), "--output", str(workdir / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "absent.jsonl: no such file" in err
    assert main(["pretrain", "--model", DEMO, "--data", str(workdir / "corpus.txt"), "--output",
                 str(workdir / "y"), "--precision", "fp8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    bad = workdir / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["sft", "--model", DEMO, "--data", str(bad), "--output", str(workdir / "z")]) == 2
    assert "bad.jsonl:1: a training conversation must end with an assistant message" in capsys.readouterr().err
