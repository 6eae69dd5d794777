"""Tokenizer, chat template and incremental detokenizer (server/api/tokenizer.py), on the committed demo
tokenizer and on a tiny model trained here with add_dummy_prefix=True (the other SentencePiece decoding
mode: the first token's leading space is dropped)."""
from __future__ import annotations

import io
import pathlib
import random

import pytest
import sentencepiece as spm

from server.api.tokenizer import IncrementalDetokenizer, Tokenizer, _TextStream

DEMO_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "demo"

TEXTS = [
    "Hello, world!",
    "line one\nline two\n\n  indented   with   spaces\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines",
    "emoji 🙂👍🏽 and CJK 東京都 日本語, accents ünïcödé, Ελληνικά, русский",
    "digits 1234567890 and 3.14159",
    "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_DIR)


def _train_tiny(directory: pathlib.Path, **options) -> Tokenizer:
    from pydoc_data.topics import topics
    lines = [line for name in sorted(topics) for line in topics[name].split("\n") if line.strip()][:2000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=500,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["<extra_id_0>", "<extra_id_1>"],
        byte_fallback=True, num_threads=1, minloglevel=2, **options)
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


@pytest.fixture(scope="module")
def dummy_prefix_tok(tmp_path_factory) -> Tokenizer:
    return _train_tiny(tmp_path_factory.mktemp("spm"), normalization_rule_name="identity",
                       remove_extra_whitespaces=False, add_dummy_prefix=True)


@pytest.fixture(scope="module")
def default_normalizer_tok(tmp_path_factory) -> Tokenizer:
    """SentencePiece's defaults (NFKC, remove_extra_whitespaces): text does not round-trip, but decode must
    still agree with sentencepiece, whose leading-space removal then also eats a lone "▁" piece's successor."""
    return _train_tiny(tmp_path_factory.mktemp("spm"))


@pytest.fixture(params=["demo", "dummy_prefix"])
def any_tok(request, tok, dummy_prefix_tok) -> Tokenizer:
    return tok if request.param == "demo" else dummy_prefix_tok


@pytest.fixture(params=["demo", "dummy_prefix", "default_normalizer"])
def every_tok(request, tok, dummy_prefix_tok, default_normalizer_tok) -> Tokenizer:
    return {"demo": tok, "dummy_prefix": dummy_prefix_tok, "default_normalizer": default_normalizer_tok}[request.param]


# ---- vocabulary ----

def test_demo_layout(tok):
    assert tok.vocab_size == 4096
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.eos_token == "</s>"
    assert [tok.token_to_id(f"<extra_id_{i}>") for i in range(10)] == list(range(4, 14))
    assert tok.token_to_id("<0x00>") == 14 and tok.token_to_id("<0xFF>") == 269
    assert tok.token_to_id("no such piece") is None
    assert tok.id_to_piece(5) == "<extra_id_1>"
    assert DEMO_DIR.joinpath("tokenizer.model").stat().st_size < 1_000_000


def test_special_tokens(tok):
    assert all(tok.is_special(i) for i in (0, 2, 3))
    assert not tok.is_special(1)                     # <unk> decodes as " ⁇ ", like sentencepiece
    assert not any(tok.is_special(i) for i in range(4, 14))   # extra_ids are text
    assert not tok.is_special(tok.token_to_id("<0x0A>"))


def test_from_pretrained_needs_a_tokenizer_model(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_ids_are_value_errors(tok):
    for bad in (-1, tok.vocab_size, "5", 2.0):
        with pytest.raises(ValueError):
            tok.decode([bad])
        with pytest.raises(ValueError):
            tok.token_text(bad)


# ---- encode / decode ----

def test_extra_id_1_is_one_token_and_the_chat_stop(tok):
    assert tok.encode("<extra_id_1>") == [5]
    assert tok.chat_stop_token_ids == [5]
    ids = tok.encode("a\n<extra_id_1>User\n")
    assert ids.count(5) == 1
    assert tok.encode("<s></s>") != [2, 3]           # control pieces are not matched inside text


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(any_tok, text):
    ids = any_tok.encode(text)
    assert any_tok.decode(ids) == text
    assert any_tok.decode(ids) == any_tok._sp.decode(ids)


def test_add_bos(tok):
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_token_id
    assert tok.decode(tok.encode("hi", add_bos=True)) == "hi"
    assert tok.decode([2, *tok.encode("hi"), 3], skip_special_tokens=False) == "<s>hi</s>"


def test_first_token_space(any_tok):
    """sentencepiece drops the first token's leading space only in add_dummy_prefix models."""
    paris = any_tok.encode("x Paris")[len(any_tok.encode("x")):]     # pieces of "▁Paris"
    assert any_tok.id_to_piece(paris[0]).startswith("▁")
    strips = any_tok._strips_first_space
    assert any_tok.decode(paris) == ("Paris" if strips else " Paris")
    assert any_tok.decode(paris) == any_tok._sp.decode(paris)
    prompt = any_tok.encode("The capital of France is")
    assert IncrementalDetokenizer(any_tok, prompt).add(paris) == " Paris"


def test_all_decoding_modes_are_covered(tok, dummy_prefix_tok, default_normalizer_tok):
    assert not tok._strips_first_space
    assert dummy_prefix_tok._strips_first_space and not dummy_prefix_tok._strip_repeats
    assert default_normalizer_tok._strips_first_space and default_normalizer_tok._strip_repeats


def test_round_trip_long_text(any_tok):
    from pydoc_data.topics import topics
    for name in ("assert", "with", "strings"):
        ids = any_tok.encode(topics[name])
        assert any_tok.decode(ids) == any_tok._sp.decode(ids) == topics[name]


def _random_id_source(tok: Tokenizer, rng: random.Random):
    """Ids biased towards the interesting ones: byte pieces, the first few (control, <unk>, extra_ids), "▁"."""
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    lone_space = tok.token_to_id("▁")
    lone_space = [lone_space] if lone_space is not None else byte_ids

    def random_id() -> int:
        r = rng.random()
        if r < 0.4:
            return rng.choice(byte_ids)
        if r < 0.5:
            return rng.randint(0, 8)
        if r < 0.55:
            return rng.choice(lone_space)
        return rng.randrange(tok.vocab_size)
    return random_id


def test_decode_matches_sentencepiece_on_random_ids(every_tok):
    rng = random.Random(0)
    random_id = _random_id_source(every_tok, rng)
    for _ in range(2000):
        ids = [random_id() for _ in range(rng.randint(0, 10))]
        assert every_tok.decode(ids) == every_tok._sp.decode(ids), ids
    for text in TEXTS:
        ids = every_tok.encode(text)
        assert every_tok.decode(ids) == every_tok._sp.decode(ids)


def test_invalid_utf8_matches_sentencepiece(tok):
    """One U+FFFD per invalid byte; a control token ends a byte run (both as sentencepiece does)."""
    b = {x: tok.token_to_id(f"<0x{x:02X}>") for x in range(256)}
    cases = [[0xE2, 0x82, 0xAC], [0xE2, 0x82, 0x41], [0xF0, 0x9F, 0x99], [0xC0, 0x80], [0xED, 0xA0, 0x80],
             [0x82], [0xF4, 0x90, 0x80, 0x80], [0xE0, 0x80, 0x80]]
    for case in cases:
        ids = [b[x] for x in case]
        assert tok.decode(ids) == tok._sp.decode(ids) == bytes(case).decode("utf-8", "n4-replace-per-byte")
    assert tok.decode([b[0xE2], b[0x82], b[0x41]]) == "\ufffd\ufffdA"
    split = [b[0xE2], 3, b[0x82], b[0xAC]]
    assert tok.decode(split) == tok._sp.decode(split) == "\ufffd" * 3


# ---- token_text ----

def test_token_text(tok):
    assert tok.token_text(tok.token_to_id("▁the")) == " the"
    assert tok.token_text(tok.token_to_id("<0x0A>")) == "\n"
    assert tok.token_text(tok.token_to_id("<0x41>")) == "A"
    assert tok.token_text(tok.token_to_id("<0xE2>")) == "bytes:\\xe2"
    assert tok.token_text(3) == "</s>"
    assert tok.token_text(5) == "<extra_id_1>"
    assert tok.token_bytes(tok.token_to_id("<0xE2>")) == b"\xe2"
    assert tok.token_bytes(tok.token_to_id("▁the")) == b" the"
    assert tok.token_bytes(3) == b""


# ---- chat template ----

def test_chat_single_turn(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text == "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text)[0] == tok.token_to_id("<extra_id_0>")   # no BOS, no stray dummy-prefix token


def test_chat_with_system_and_multi_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert tok.apply_chat_template(messages) == (
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n"
        "<extra_id_1>User\nCapital of France?\n<extra_id_1>Assistant\n")


def test_chat_ending_in_assistant_for_reward_models(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n")
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n")


@pytest.mark.parametrize("messages, match", [
    ([], "at least one"),
    ([{"role": "tool", "content": "x"}], "unsupported role 'tool'"),
    ([{"content": "x"}], "unsupported role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "system message is only allowed"),
    ([{"role": "user", "content": None}], "must be a string"),
    (["hello"], "must be an object"),
])
def test_chat_rejects_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


# ---- incremental detokenizer ----

def _stream(tok, prompt, output, rng, skip=True) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, skip)
    pieces, i = [], 0
    while i < len(output):
        step = rng.randint(0, 4)
        pieces.append(detok.add(output[i:i + step]))
        i += step
    pieces.append(detok.flush())
    return "".join(pieces), detok


def test_incremental_invariant_random_ids(every_tok):
    rng = random.Random(1234)
    random_id = _random_id_source(every_tok, rng)
    checked = 0
    while checked < 400:
        skip = rng.random() < 0.7
        prompt = [random_id() for _ in range(rng.randint(0, 6))]
        probe = _TextStream(every_tok, skip)
        probe.feed(prompt)
        if probe.pending_bytes():      # prompt ends inside a character: see test_prompt_ending_mid_character
            continue
        output = [random_id() for _ in range(rng.randint(0, 24))]
        streamed, detok = _stream(every_tok, prompt, output, rng, skip)
        full = every_tok.decode(prompt + output, skip)
        base = every_tok.decode(prompt, skip)
        assert full.startswith(base)
        assert streamed == full[len(base):] == detok.text, (prompt, output)
        checked += 1


def test_incremental_real_text(any_tok):
    rng = random.Random(7)
    for text in TEXTS:
        for prompt_text in ("", "Q: ", "<extra_id_1>Assistant\n"):
            prompt = any_tok.encode(prompt_text)
            output = any_tok.encode(prompt_text + text)[len(prompt):]
            streamed, _ = _stream(any_tok, prompt, output, rng)
            assert streamed == any_tok.decode(prompt + output)[len(any_tok.decode(prompt)):]


def test_character_split_over_byte_tokens_is_held_back(tok):
    ids = tok.encode("a🙂b")      # the emoji is not in the demo vocabulary: four byte-fallback tokens
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[1:5] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    deltas = [detok.add([i]) for i in ids]
    assert deltas == ["a", "", "", "", "🙂", "b"]
    assert detok.flush() == ""
    assert "\ufffd" not in "".join(deltas)


def test_incomplete_character_at_the_end_becomes_replacement(tok):
    b = {x: tok.token_to_id(f"<0x{x:02X}>") for x in range(256)}
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add([b[0xF0], b[0x9F]]) == ""
    assert detok.flush() == "\ufffd\ufffd" == tok.decode([b[0xF0], b[0x9F]])
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add([b[0xE2]]) == ""
    assert detok.add([3]) == "\ufffd"          # a control token ends the byte run, as in decode
    assert detok.add([b[0x82], b[0xAC]]) == "\ufffd\ufffd"


def test_prompt_ending_mid_character(tok):
    """The prompt's incomplete bytes are carried into the output and complete there."""
    b = {x: tok.token_to_id(f"<0x{x:02X}>") for x in range(256)}
    prompt = tok.encode("price: ") + [b[0xE2]]
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.add([b[0x82]]) == ""
    assert detok.add([b[0xAC], *tok.encode("5")]) == "€5"
    assert tok.decode(prompt + [b[0x82], b[0xAC]]) == "price: €"


def test_streaming_cost_does_not_grow_with_length(tok):
    """O(new tokens) per call: 20k single-token adds after a long prompt stay fast."""
    import time
    rng = random.Random(3)
    ids = [rng.randrange(tok.vocab_size) for _ in range(20_000)]
    detok = IncrementalDetokenizer(tok, tok.encode("x " * 2000))
    start = time.perf_counter()
    for i in ids:
        detok.add([i])
    detok.flush()
    elapsed = time.perf_counter() - start
    assert detok.text == tok.decode(ids)
    assert elapsed < 1.0, elapsed     # ~0.02 s measured; re-decoding each step would take minutes
