"""Text-handling edges: /tokenizer_info's Jinja chat template renders exactly what /tokenize (and so
/v1/chat/completions) runs for the same messages, in the Jinja environments clients use, and refuses what the
server refuses; streamed detokenization equals decoding the whole sequence on long random id sequences."""
from __future__ import annotations

import pathlib
import random

import jinja2
import jinja2.sandbox
import pytest

from server.api import tokenization
from server.api.protocol import APIError, TokenizeRequest
from server.api.tokenizer import Tokenizer, _TextStream
from tests.api.test_tokenizer import _stream

DEMO_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "demo"

# lm-eval's RemoteTokenizer renders /tokenizer_info's template with this environment (lm_eval/utils.py); HF's
# apply_chat_template with a sandboxed one with trim_blocks and lstrip_blocks, and a raise_exception global.
ENVIRONMENTS = {
    "plain": lambda: jinja2.Environment(),
    "lm_eval": lambda: jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True),
    "hf": lambda: jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True),
}


def _hf_raise(message):
    raise jinja2.TemplateError(message)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(params=sorted(ENVIRONMENTS))
def template(request, tok) -> jinja2.Template:
    env = ENVIRONMENTS[request.param]()
    if request.param == "hf":
        env.globals["raise_exception"] = _hf_raise
    return env.from_string(tokenization.tokenizer_info(tok, 256)["chat_template"])


def _served_ids(tok, messages, add_generation_prompt) -> list[int]:
    request = TokenizeRequest(messages=messages, add_generation_prompt=add_generation_prompt)
    return tokenization.tokenize(tok, request, 256)["tokens"]


ACCEPTED = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    # OpenAI's "developer" is the system message of newer clients; the server uses it as the system prompt.
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Answer:"}],    # lm-eval's gen_prefix
    [{"role": "assistant", "content": "x"}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "user", "content": "  spaced \n\n"}, {"role": "assistant", "content": "\n"}],
    # Content as text parts (joined with "\n", as the server joins them) or null (an empty turn).
    [{"role": "system", "content": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]},
     {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}],
]

REFUSED = [
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
    [{"role": "system", "content": "S"}, {"role": "system", "content": "T"}, {"role": "user", "content": "a"}],
    [{"role": "system", "content": "S"}, {"role": "developer", "content": "T"}, {"role": "user", "content": "a"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", ACCEPTED)
def test_template_renders_what_the_server_runs(tok, template, messages, add_generation_prompt):
    rendered = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert tok.encode(rendered) == _served_ids(tok, messages, add_generation_prompt)


@pytest.mark.parametrize("messages", REFUSED)
def test_template_refuses_what_the_server_refuses(tok, template, messages):
    """A silently different prompt would be worse than an error: the server answers these with a 400."""
    with pytest.raises(APIError):
        _served_ids(tok, messages, True)
    with pytest.raises(jinja2.TemplateError):
        template.render(messages=messages, add_generation_prompt=True)


def test_developer_role_is_the_system_prompt(tok):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
    assert tok.apply_chat_template(messages) == expected
    assert _served_ids(tok, messages, True) == tok.encode(expected)


# ---- streaming vs whole-sequence decoding, longer sequences than tests/api/test_tokenizer.py ----

def test_stream_equals_whole_decode_on_long_random_sequences(tok):
    rng = random.Random(2024)
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    multibyte = [tok.encode(c) for c in "€🙂東ü"]   # byte-fallback runs that form one character

    def chunk() -> list[int]:
        r = rng.random()
        if r < 0.3:
            return list(rng.choice(multibyte))
        if r < 0.5:
            return [rng.choice(byte_ids)]
        if r < 0.6:
            return [rng.randint(0, 8)]          # control tokens, <unk>, <extra_id_N>
        return [rng.randrange(tok.vocab_size)]

    for _ in range(300):
        skip = rng.random() < 0.5
        prompt = [t for _ in range(rng.randint(0, 5)) for t in chunk()]
        probe = _TextStream(tok, skip)
        probe.feed(prompt)
        if probe.pending_bytes():      # the documented corner: the prompt ends inside a character
            continue
        output = [t for _ in range(rng.randint(0, 40)) for t in chunk()]
        streamed, _ = _stream(tok, prompt, output, rng, skip)
        base, full = tok.decode(prompt, skip), tok.decode(prompt + output, skip)
        assert full.startswith(base)
        assert streamed == full[len(base):], (prompt, output)
