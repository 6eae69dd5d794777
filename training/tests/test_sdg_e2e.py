"""`n4-train sdg` end to end against two live `n4 serve` processes: the trained demo model as the generator and the
demo reward model (models/demo-reward; a seeded random 9-value head on the demo body if it is absent). The demo
model (3M parameters) cannot write usable topic lists, so prompt writing falls back to the seeded material; the
files must still be complete and consistent, a rerun must change nothing, and a generator posing as the reward
model must be refused."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "models" / "demo"
DEMO_REWARD = REPO_ROOT / "models" / "demo-reward"
WEIGHTS = (0.0, 0.0, 0.0, 0.0, 0.3, 0.74, 0.46, 0.47, -0.33)
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_reward_checkpoint(path: Path) -> Path:
    """The demo checkpoint with lm_head replaced by a random [9, hidden] head, marked as a reward model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(DEMO):
        if name not in ("model.safetensors", "config.json"):
            shutil.copy(DEMO / name, path / name)
    weights = load_file(str(DEMO / "model.safetensors"))
    hidden = weights["lm_head.weight"].shape[1]
    weights["lm_head.weight"] = torch.randn(9, hidden, generator=torch.Generator().manual_seed(0)) * 0.1
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((DEMO / "config.json").read_text())
    config.update(architectures=["NemotronForRewardModel"], num_labels=9)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _start(model: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads a pipe, and a full one blocks the server
    proc = subprocess.Popen([sys.executable, "-m", "n4.cli", "serve", "--model", str(model), "--port", str(port),
                             "--served-model-name", name, "--max-model-len", "1024"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    proc.log = log
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.log.seek(0)
    pytest.fail(f"n4 serve at {base} did not become healthy:\n{proc.log.read()[-3000:]}")


@pytest.fixture(scope="module")
def sdg_servers(tmp_path_factory):
    """(generator base URL, reward base URL), both ending in /v1."""
    reward = DEMO_REWARD if (DEMO_REWARD / "config.json").is_file() else \
        _build_reward_checkpoint(tmp_path_factory.mktemp("sdg-reward"))
    servers = [_start(DEMO, "demo"), _start(reward, "demo-reward")]  # both load at once
    try:
        for proc, base in servers:
            _wait_healthy(proc, base)
        yield tuple(base + "/v1" for _, base in servers)
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _sdg(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "training"), str(REPO_ROOT)])}
    return subprocess.run([sys.executable, "-m", "n4_train.sdg.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_files(out: Path) -> None:
    prompts = {p["id"]: p for p in _read(out / "prompts.jsonl")}
    responses = {r["id"]: r for r in _read(out / "responses.jsonl")}
    scores = {s["id"]: s for s in _read(out / "scores.jsonl")}
    pairs = _read(out / "pairs.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(prompts) == 10 and {p["task"] for p in prompts.values()} == {"open_qa", "writing", "closed_qa",
                                                                            "math", "coding"}
    for p in prompts.values():
        assert {"id", "slot", "task", "kind", "messages", "source"} <= set(p)
        assert p["messages"][-1]["role"] == "user" and all(isinstance(m["content"], str) for m in p["messages"])
    assert any("answer" in p for p in prompts.values())
    assert len(responses) == 20
    for r in responses.values():
        assert r["prompt_id"] in prompts and isinstance(r["response"], str)
        assert r["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] >= 1
    assert set(scores) <= set(responses) and scores
    for s in scores.values():
        assert list(s["attributes"]) == list(ATTRIBUTES) and len(s["raw"]) == 9
        assert s["reward"] == pytest.approx(sum(w * v for w, v in zip(WEIGHTS, s["raw"])), abs=1e-6)
    for pair in pairs:
        chosen, rejected = responses[pair["chosen_id"]], responses[pair["rejected_id"]]
        assert chosen["prompt_id"] == rejected["prompt_id"] == pair["prompt_id"] and chosen != rejected
        assert pair["prompt"] == prompts[pair["prompt_id"]]["messages"]
        assert (pair["chosen"], pair["rejected"]) == (chosen["response"], rejected["response"])
        assert pair["chosen_reward"] == scores[chosen["id"]]["reward"]
        assert pair["rejected_reward"] == scores[rejected["id"]]["reward"]
        assert pair["ranked_by"] in ("reward", "ground_truth")
    assert summary["prompts"]["total"] == 10 and summary["responses"]["total"] == 20
    assert summary["scores"]["total"] == len(scores)
    assert summary["filter"]["kept"] + sum(summary["filter"]["dropped"].values()) == 20
    assert summary["pairs"]["total"] == len(pairs) > 0
    assert summary["pairs"]["total"] + sum(summary["pairs"]["skipped"].values()) == 10
    assert summary["failures_this_run"]["total"] == 0


def test_pipeline_against_live_servers(sdg_servers, tmp_path):
    generator, reward = sdg_servers
    out = tmp_path / "sdg"
    args = ["--base-url", generator, "--reward-base-url", reward, "--output", str(out), "--num-prompts", "2",
            "--responses-per-prompt", "2", "--max-tokens", "96", "--prompt-max-tokens", "16", "--concurrency", "4",
            "--seed", "1"]  # the trained demo ends its answers (<extra_id_1>) well within 96 tokens
    done = _sdg(*args)
    assert done.returncode == 0, done.stderr
    assert "10 prompts, 20 responses" in done.stderr
    _check_files(out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".jsonl")}
    again = _sdg(*args)
    assert again.returncode == 0, again.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / "summary.json").read_text())["requests"]["generator"]["sent"] == 1  # GET /models
    # The report's loop closes: the pairs train the demo model with RPO, and the result is a servable checkpoint.
    pairs = len(_read(out / "pairs.jsonl"))
    aligned = tmp_path / "rpo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "training"), str(REPO_ROOT)])}
    rpo = subprocess.run([sys.executable, "-m", "n4_train.cli", "rpo", "--model", str(DEMO), "--data",
                          str(out / "pairs.jsonl"), "--output", str(aligned), "--batch-size", str(min(pairs, 2)),
                          "--max-steps", "2"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert rpo.returncode == 0, rpo.stderr
    summary = json.loads((aligned / "training_summary.json").read_text())
    assert summary["method"] == "rpo"
    assert summary["pairs"] + summary["skipped"] + summary["skipped_reward_contradicts_preference"] == pairs
    assert json.loads((aligned / "config.json").read_text())["architectures"] == ["NemotronForCausalLM"]


def test_generator_is_not_a_reward_model(sdg_servers, tmp_path):
    generator, _ = sdg_servers
    done = _sdg("--base-url", generator, "--reward-base-url", generator, "--output", str(tmp_path / "x"))
    assert done.returncode == 1
    assert done.stderr.startswith("n4-train sdg: error: --reward-base-url") and "not a reward model" in done.stderr
    assert done.stderr.count("\n") == 1
