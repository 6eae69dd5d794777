"""benchmarks/side_by_side.py without its engines: the table, the cross-check, the README section, the flow of
main() with the servers and transformers mocked (vLLM missing included), and the HF tokenizer it ships for the
demo model (encoding like sentencepiece)."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import side_by_side as sbs

DEMO = os.path.join(sbs.REPO, "models", "demo")


def _metrics(out_tps=500.0, req_s=2.5, ttft=(40.0, 90.0), tpot=12.5, completed=32, failed=0, input_tokens=3200):
    return {"completed": completed, "failed": failed, "output_throughput": out_tps, "request_throughput": req_s,
            "total_input_tokens": input_tokens,
            "ttft_ms": {"mean": None, "p50": ttft[0], "p90": None, "p99": ttft[1]},
            "tpot_ms": {"mean": None, "p50": tpot, "p90": None, "p99": None}}


def test_rows_and_table():
    ran = sbs.result_row("n4", {"metrics": _metrics(), "version": "0.1.0"})
    assert ran == {"engine": "n4", "version": "0.1.0", "output_tok_s": 500.0, "req_s": 2.5, "ttft_p50_ms": 40.0,
                   "ttft_p99_ms": 90.0, "tpot_p50_ms": 12.5, "note": ""}
    failed = sbs.result_row("vllm", {"metrics": _metrics(completed=30, failed=2), "version": "0.32.0"})
    assert failed["note"] == "2 of 32 requests failed"
    skipped = sbs.result_row("vllm", {"skipped": "no vLLM at --vllm-python /x"})
    assert skipped["output_tok_s"] is None and skipped["note"] == "not run: no vLLM at --vllm-python /x"
    table = sbs.format_table([ran, skipped]).splitlines()
    assert table[0].startswith("| engine | version | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 (ms)")
    assert table[2] == "| n4 | 0.1.0 | 500.0 | 2.50 | 40 / 90 | 12.5 |  |"
    assert table[3] == "| vllm | — | — | — | — / — | — | not run: no vLLM at --vllm-python /x |"


def test_median_run_and_its_note():
    runs = [_metrics(out_tps=v, tpot=v / 100) for v in (300.0, 900.0, 500.0)]
    assert sbs.median_run(runs)["tpot_ms"]["p50"] == 5.0          # the whole middle run, not per-column medians
    assert sbs.median_run(runs[:2])["output_throughput"] == 300.0  # even count: the lower middle
    row = sbs.result_row("n4", {"metrics": sbs.median_run(runs), "runs_output_tok_s": [300.0, 900.0, 500.0]})
    assert row["note"] == "median of 3 runs: 300 / 900 / 500 tok/s"


def test_cross_check_by_ids_then_text():
    a = [{"text": "abc", "ids": [1, 2, 3]}, {"text": "same", "ids": None}, {"text": "x\ufffd", "ids": [7, 250]},
         None, {"text": "xyz", "ids": None}]
    b = [{"text": "abd", "ids": [1, 2, 4]}, {"text": "same", "ids": [9]}, {"text": "x", "ids": [7, 250]},
         {"text": "q", "ids": [5]}, {"text": "xyw", "ids": None}]
    c = sbs.cross_check(a, b)
    assert (c["compared"], c["equal"], c["same_ids_other_text"]) == (5, 2, 1)
    assert [(d["prompt"], d["by"], d["at"]) for d in c["differences"]] == [(0, "ids", 2), (3, "missing", None),
                                                                        (4, "text", 2)]
    line = sbs.describe_check("vllm", c, 32)
    assert "the same 32 tokens for 2 of 5 prompts; the others: from token 2, no output, from character 2" in line
    assert "1 with the same tokens differ in text only" in line


def test_token_ids_from_logprobs():
    assert sbs._token_ids(["token_id:5", "token_id:0"]) == [5, 0]
    assert sbs._token_ids(["token_id:5", "hello"]) is None
    assert sbs._token_ids(None) is None and sbs._token_ids([]) is None


def test_readme_section_appended_then_replaced_keeping_the_rest():
    original = "# Benchmarks\n\nintro\n\n## Other\n\nkept\n"
    first = sbs.update_readme(original, f"{sbs.SECTION_START}\nv1\n{sbs.SECTION_END}\n")
    assert first.startswith(original.rstrip("\n")) and first.endswith(f"{sbs.SECTION_START}\nv1\n{sbs.SECTION_END}\n")
    again = sbs.update_readme(first + "\n## After\n\nalso kept\n", f"{sbs.SECTION_START}\nv2\n{sbs.SECTION_END}\n")
    assert "v1" not in again and again.count(sbs.SECTION_START) == 1
    assert "kept\n" in again and again.endswith("## After\n\nalso kept\n") and "\nv2\n" in again


def test_main_with_engines_mocked_and_vllm_missing(monkeypatch, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nexisting text\n")
    monkeypatch.setattr(sbs, "README", str(readme))
    seen = {}

    def fake_bench_servers(servers, prompts, args, start_timeout):
        assert [server.name for server in servers] == ["n4"]  # vLLM is missing: not started
        server = servers[0]
        seen["server"] = (server.name, server.cmd, len(prompts), args.output_len)
        return {"n4": {"metrics": _metrics(input_tokens=32 * 100), "startup_s": 1.0, "server_version": "0.1.0",
                       "greedy": [{"text": "a b c", "ids": [1, 2]}, {"text": "d e f", "ids": [3, 4]}],
                       "command": "n4 serve"}}

    def fake_transformers(model, prompts, output_len, batch_size, dtype, check_prompts, check_len, repeat):
        seen["transformers"] = (len(prompts), output_len, batch_size, dtype, len(check_prompts), check_len, repeat)
        return {"metrics": _metrics(out_tps=100.0, req_s=1.0), "version": "5.x", "greedy": [{"text": "a b c", "ids": [1, 2]},
                                                                                       {"text": "d e g", "ids": [3, 5]}]}

    monkeypatch.setattr(sbs, "bench_servers", fake_bench_servers)
    monkeypatch.setattr(sbs, "bench_transformers", fake_transformers)
    monkeypatch.setattr(sbs, "n4_version", lambda: "0.1.0 (abc)")
    report = sbs.main(["--num-prompts", "4", "--input-len", "8", "--output-len", "16", "--max-concurrency", "2",
                       "--vllm-python", str(tmp_path / "no-python"), "--cross-check", "2", "--write-readme",
                       "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "no vLLM at --vllm-python" in out and "skipped" in out
    assert seen["server"][0] == "n4" and "--dtype" in seen["server"][1] and seen["server"][2:] == (4, 16)
    assert seen["transformers"] == (4, 16, 2, "float32", 2, 32, 3)
    assert [r["engine"] for r in report["rows"]] == ["n4", "vllm", "transformers"]
    assert report["rows"][1]["note"].startswith("not run: no vLLM")
    assert report["cross_check"]["transformers"]["equal"] == 1
    assert report["workload"]["prompt_tokens_mean"] == 100
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nexisting text\n") and sbs.SECTION_START in text
    assert "| n4 | 0.1.0 (abc) | 500.0 |" in text and "benchmarks/side_by_side.py --num-prompts 4" in text
    assert json.loads((tmp_path / "out.json").read_text())["workload"]["output_len"] == 16


class _FakeServer:
    def __init__(self, name, fail_start=False):
        self.name, self.cmd, self.base_url, self.fail_start = name, [name, "serve"], f"http://{name}", fail_start
        self.events = []

    def start(self, timeout_s):
        self.events.append("start")
        if self.fail_start:
            raise RuntimeError(f"{self.name} exited (1) before it was healthy")
        return 2.0

    def version(self):
        return f"{self.name}-1.0"

    def pause(self):
        self.events.append("pause")

    def resume(self):
        self.events.append("resume")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.events.append("stop")


def test_bench_servers_take_turns_and_keep_one_failure_to_its_server(monkeypatch):
    order = []
    throughput = iter([100.0, 200.0, 210.0, 110.0, 120.0, 190.0])

    async def fake_run_benchmark(base_url, **kwargs):
        order.append(base_url.removeprefix("http://"))
        if base_url == "http://bad-run":
            raise ConnectionError("connection refused")
        return {"output_throughput": next(throughput), "requests": ["dropped"]}

    async def fake_greedy(base_url, prompts, output_len):
        return [{"text": base_url, "ids": [1]}]

    import benchmarks.serve
    monkeypatch.setattr(benchmarks.serve, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(sbs, "greedy_outputs", fake_greedy)
    args = sbs.parse_args(["--repeat", "3", "--cross-check", "1"])
    n4, vllm = _FakeServer("n4"), _FakeServer("vllm")
    results = sbs.bench_servers([n4, vllm], ["p"], args)
    assert order == ["n4", "vllm", "vllm", "n4", "n4", "vllm"] == sbs._turn_order(["n4", "vllm"], 3)
    assert results["n4"]["runs_output_tok_s"] == [100.0, 110.0, 120.0]
    assert results["vllm"]["runs_output_tok_s"] == [200.0, 210.0, 190.0]
    assert results["n4"]["metrics"]["output_throughput"] == 110.0 and "requests" not in results["n4"]["metrics"]
    assert results["vllm"]["server_version"] == "vllm-1.0" and results["vllm"]["greedy"][0]["text"] == "http://vllm"
    # Each server runs only in its own turns (and for its cross-check at the end), frozen otherwise.
    assert n4.events == ["start", "pause"] + ["resume", "pause"] * 3 + ["resume", "stop"]
    assert vllm.events == n4.events

    # A server that does not start, and one whose run fails: each is reported as its error; the other still runs.
    order.clear()
    throughput = iter([100.0, 110.0, 120.0])
    dead, bad, good = _FakeServer("dead", fail_start=True), _FakeServer("bad-run"), _FakeServer("good")
    results = sbs.bench_servers([dead, bad, good], ["p"], args)
    assert isinstance(results["dead"], RuntimeError) and isinstance(results["bad-run"], ConnectionError)
    assert order == ["bad-run", "good", "good", "good"]  # the failed one gets no later turn
    assert results["good"]["runs_output_tok_s"] == [100.0, 110.0, 120.0]
    assert all(server.events[-1] == "stop" for server in (dead, bad, good))
    assert dead.events == ["start", "stop"] and bad.events == ["start", "pause", "resume", "pause", "stop"]


def test_machine_info_names_the_cpu():
    m = sbs.machine_info()
    assert m["logical_cpus"] >= 1 and m["cpu"]
    assert "no GPU" in sbs.describe_machine(m)


def test_vllm_command_and_env():
    cmd = sbs.vllm_command("/v/bin/python", "/m", 1234, "float32")
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--port") + 1] == "1234"
    assert sbs.vllm_env("0-1", 2) == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert sbs.vllm_version("/definitely/not/here/python") is None


TEXTS = ["Hello world", "  two  spaces   three ", "naïve café 日本語 🙂", "<extra_id_1>User\nhi\n", "x = 3.14159",
         "tab\tand\nnewline", "a" * 50, "▁ escaped"]


def test_shipped_hf_tokenizer_encodes_and_decodes_like_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(DEMO, "tokenizer.model"))
    shipped = tokenizers.Tokenizer.from_file(os.path.join(DEMO, "tokenizer.json"))
    built, _ = sbs.build_hf_tokenizer(os.path.join(DEMO, "tokenizer.model"))
    for text in TEXTS:
        ids = sp.encode(text)
        assert shipped.encode(text, add_special_tokens=True).ids == ids, text
        assert built.encode(text).ids == ids, text
        assert shipped.decode(ids) == sp.decode(ids)
        assert "▁" in text or sp.decode(ids) == text  # a literal "▁" decodes to a space in both
    # Control pieces in text become their ids (as n4's server encodes prompts); none is added around the text.
    assert shipped.encode("a</s>b").ids == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
    unk_and_bytes = [sp.unk_id(), sp.piece_to_id("<0xD1>"), sp.piece_to_id("<0x48>")]
    assert shipped.decode(unk_and_bytes) == sp.decode(unk_and_bytes)
    with open(os.path.join(DEMO, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["add_bos_token"] is False and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_shipped_hf_tokenizer_builds_the_chat_prompts_n4_runs():
    # vLLM and transformers read the chat template from tokenizer_config.json; without one they had none.
    transformers = pytest.importorskip("transformers")
    from server.api.tokenizer import Tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(DEMO)
    ours = Tokenizer.from_pretrained(DEMO)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A sequence."}, {"role": "user", "content": "And a tuple?"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(messages)
    assert hf.encode(rendered, add_special_tokens=False) == ours.encode(rendered)
