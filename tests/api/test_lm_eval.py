"""lm-eval against `n4 serve`: `local-completions` with token-id prompts must score every request as lm-eval's own
`hf` backend scores it on the same fp32 checkpoint (|Δ log-likelihood| <= 1e-3), and greedy generations must
give the same text up to the decoders' known differences (a leading space, a trailing incomplete UTF-8
character). The tasks read small local JSONL files written here; nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is in the `test` extra")

from model.config import PRESETS  # noqa: E402
from tests.api.conftest import REPO_ROOT, start_n4_serve, stop_n4_serve  # noqa: E402
from tests.utils import make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

DEMO_DIR = os.path.join(REPO_ROOT, "models", "demo")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOLERANCE = 1e-3

MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " a small town by the sea"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "Water boils at", "choices": [" 100 degrees", " 0 degrees", " room temperature", " 42"],
     "answer": 0},
    {"question": "Q: Which animal barks?\nA:", "choices": [" a dog", " a cat", " a fish"], "answer": 0},
    {"question": "The sun rises in the", "choices": [" east", " west"], "answer": 0},
    {"question": "ünïcødé and 日本語 then", "choices": [" 🙂", " ok", " <extra_id_1>User"], "answer": 1},
    {"question": "Once upon a time, there was", "choices": [" a princess", " a dragon", " nothing at all"],
     "answer": 0},
    {"question": "1, 2, 3, 4,", "choices": [" 5", " 6", " 7, 8, 9, 10"], "answer": 0},
    {"question": "Red, green and", "choices": [" blue", " yellow"], "answer": 0},
    {"question": "She said:  \"hello\"\tand", "choices": [" left", " stayed\nhome"], "answer": 0},
]
GEN_DOCS = [
    {"prompt": "The capital of France is", "target": " Paris"},
    {"prompt": "Once upon a time", "target": ","},
    {"prompt": "Q: What is 2+2?\nA:", "target": " 4"},
    {"prompt": "日本語 and ünïcødé:", "target": ""},
]


GREEDY_CONTEXT = "The capital of France is"


def _greedy_text(ckpt: str, context: str, max_new: int = 3) -> str:
    """The greedy continuation of `context` (up to max_new tokens) as text that re-encodes to the same ids after
    the context, so lm-eval scores exactly those tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tok(context, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):].tolist()
    for n in range(len(out), 0, -1):
        text = tok.decode(out[:n])
        if tok(context + text, add_special_tokens=False).input_ids == ids + out[:n]:
            return text
    pytest.skip("no greedy continuation of the tiny model re-encodes to itself")


def _task_yaml(name: str, data_file: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(data_file)}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny fp32 checkpoint with the demo tokenizer in both formats, and the two tasks."""
    missing = [f for f in HF_TOKENIZER_FILES if not os.path.isfile(os.path.join(DEMO_DIR, f))]
    if missing:
        pytest.skip(f"models/demo lacks the HF tokenizer files {missing}")
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = make_tiny_checkpoint(root / "ckpt", PRESETS["tiny"].with_(vocab_size=4096), seed=1)
    for name in HF_TOKENIZER_FILES:
        shutil.copy(os.path.join(DEMO_DIR, name), os.path.join(ckpt, name))
    tasks = root / "tasks"
    tasks.mkdir()
    # One choice is the model's own greedy continuation, so lm-eval's `is_greedy` is checked being True as well.
    mc_docs = MC_DOCS + [{"question": GREEDY_CONTEXT, "choices": [" Paris", _greedy_text(ckpt, GREEDY_CONTEXT)],
                          "answer": 1}]
    for name, docs in (("mc", mc_docs), ("gen", GEN_DOCS)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    (tasks / "n4_tiny_mc.yaml").write_text(_task_yaml("n4_tiny_mc", str(root / "mc.jsonl"), (
        "output_type: multiple_choice\ntarget_delimiter: \"\"\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")), encoding="utf-8")
    (tasks / "n4_tiny_gen.yaml").write_text(_task_yaml("n4_tiny_gen", str(root / "gen.jsonl"), (
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 24\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")), encoding="utf-8")
    return ckpt, str(tasks), root


@pytest.fixture(scope="module")
def results(setup):
    """Per-backend samples of both tasks: {backend: {task: [sample, ...] sorted by doc_id}}."""
    ckpt, task_dir, root = setup
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))
        import huggingface_hub.constants
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        import datasets.config
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        import lm_eval
        from lm_eval.tasks import TaskManager

        def run(model: str, model_args: dict) -> dict:
            out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["n4_tiny_mc", "n4_tiny_gen"],
                                          task_manager=TaskManager(include_path=task_dir), log_samples=True,
                                          batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
            return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}

        proc, base = start_n4_serve("--model", ckpt, "--dtype", "float32", "--max-model-len", "512",
                                    "--served-model-name", "tiny")
        try:
            api = run("local-completions", {"base_url": f"{base}/v1/completions", "model": "tiny",
                                            "tokenizer_backend": "huggingface", "tokenizer": ckpt,
                                            "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1})
        finally:
            assert stop_n4_serve(proc) == 0
        hf = run("hf", {"pretrained": ckpt, "dtype": "float32", "device": "cpu"})
    return {"api": api, "hf": hf}


def test_loglikelihoods_match_hf_backend(results):
    api, hf = results["api"]["n4_tiny_mc"], results["hf"]["n4_tiny_mc"]
    assert len(api) == len(hf) == len(MC_DOCS) + 1
    deltas, greedy = [], []
    for a, h in zip(api, hf):
        assert a["doc_id"] == h["doc_id"]
        assert len(a["resps"]) == len(h["resps"]) == len(a["doc"]["choices"])
        for (ra,), (rh,) in zip(a["resps"], h["resps"]):
            (ll_a, greedy_a), (ll_h, greedy_h) = ra, rh
            assert ll_a < 0
            deltas.append(abs(float(ll_a) - float(ll_h)))
            assert bool(greedy_a) == bool(greedy_h), (a["doc_id"], ll_a, ll_h)
            greedy.append(bool(greedy_a))
    assert greedy[-1] and not all(greedy)   # the last choice is the model's greedy continuation
    print(f"max |Δ loglikelihood| over {len(deltas)} requests: {max(deltas):.3g}")
    assert max(deltas) <= TOLERANCE, deltas


def _normalize(text: str) -> str:
    # The hf backend decodes the continuation's ids alone: SentencePiece drops the first token's leading space
    # and a split multi-byte character ends as U+FFFD; the server decodes in context.
    return text.lstrip(" ").rstrip("\ufffd")


def test_greedy_generations_match_hf_backend(results):
    api, hf = results["api"]["n4_tiny_gen"], results["hf"]["n4_tiny_gen"]
    assert len(api) == len(hf) == len(GEN_DOCS)
    for a, h in zip(api, hf):
        text_a, text_h = a["resps"][0][0], h["resps"][0][0]
        assert isinstance(text_a, str) and text_a, a
        assert _normalize(text_a) == _normalize(text_h), (a["doc_id"], text_a, text_h)
