"""Text <-> token ids for Nemotron-4: the SentencePiece tokenizer, the Instruct chat template, and an
incremental detokenizer for streaming.

Decoding is done here from a per-token byte table rather than by ``sentencepiece.decode``, so that a whole
sequence and a stream of chunks go through one state machine and always agree. It reproduces
SentencePiece's decoding rules (checked against it on random id sequences in tests/api/test_tokenizer.py):

* ``▁`` in a piece is a space; ``<0xNN>`` byte pieces are that byte; control pieces (``<s>``, ``</s>``,
  ``<pad>``) produce nothing; ``<unk>`` produces SentencePiece's unknown surface (`` ⁇ ``).
* For models trained with ``add_dummy_prefix`` (or ``remove_extra_whitespaces``) the first non-control token
  of a sequence loses one leading ``▁`` (with ``remove_extra_whitespaces``, a lone ``▁`` that thereby
  decodes to nothing passes the removal on to the next token). Whether and how a model does this is probed
  from ``sentencepiece`` itself.
* Bytes that are not valid UTF-8 become one U+FFFD per byte (SentencePiece's rule; Python's own "replace"
  would give one per maximal invalid subsequence). A control token ends a run of byte pieces, so an
  incomplete character before ``</s>`` is invalid even if its remaining bytes follow the ``</s>``.

With ``skip_special_tokens=False`` a control token is shown as its piece (``"</s>"``) and is otherwise handled
exactly as above (it does not count as the first token for the leading-space rule); SentencePiece itself
has no such mode. Ids outside [0, vocab_size) raise ValueError everywhere (a model whose embedding is padded
past the tokenizer's vocabulary must not sample them).
"""
from __future__ import annotations

import codecs
import functools
import operator
import os
import re

import sentencepiece as spm

_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CHAT_STOP_PIECE = "<extra_id_1>"
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_SYSTEM_ROLES = ("system", "developer")   # OpenAI's newer clients send the system prompt as "developer"
# apply_chat_template as a Jinja template (HF's chat_template convention), for clients that render prompts
# themselves from /tokenizer_info (lm-eval's remote tokenizer). It must give the same text as the server for the
# same request messages, so it also takes what the API accepts (content as null or text parts, joined with "\n"
# as ChatMessage.text() does; "developer" as the system role), and it refuses what the server refuses with 400,
# rather than render a silently different prompt: raise_exception is HF's global; in a plain Jinja environment
# calling it (undefined) raises UndefinedError. tests/api/test_text_edges.py renders it in plain, lm-eval's and
# HF's environments. No whitespace control ("{%-"): HF's trim_blocks/lstrip_blocks then change nothing.
CHAT_TEMPLATE = (
    "{% macro text(content) %}{% if content is string %}{{ content }}"
    "{% elif content is not none %}{{ content | map(attribute='text') | join('\\n') }}{% endif %}{% endmacro %}"
    "{% if not messages %}{{ raise_exception('messages must contain at least one message.') }}{% endif %}"
    "{% if messages[0]['role'] in ['system', 'developer'] %}{% set system = text(messages[0]['content']) %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "<extra_id_0>System\n{{ system }}\n"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}<extra_id_1>User\n{{ text(message['content']) }}\n"
    "{% elif message['role'] == 'assistant' %}<extra_id_1>Assistant\n{{ text(message['content']) }}\n"
    "{% elif message['role'] in ['system', 'developer'] %}"
    "{{ raise_exception('a system message is only allowed as the first message.') }}"
    "{% else %}{{ raise_exception('Nemotron-4 chat supports system, user and assistant roles.') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
)
_UTF8_ERRORS = "n4-replace-per-byte"


def _replace_per_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    # One U+FFFD for the first offending byte, then resume decoding at the next byte (SentencePiece's rule).
    return "\ufffd", err.start + 1


codecs.register_error(_UTF8_ERRORS, _replace_per_byte)
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

# Token kinds in Tokenizer._kinds.
_TEXT, _CONTROL = 0, 1


class Tokenizer:
    """A SentencePiece model with Nemotron-4's conventions. Ids are plain ints in [0, vocab_size)."""

    def __init__(self, path_to_tokenizer_model: str | os.PathLike):
        path = os.fspath(path_to_tokenizer_model)
        if not os.path.isfile(path):
            raise ValueError(f"Tokenizer model file not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        n = self._sp.get_piece_size()
        self._pieces: list[str] = self._sp.id_to_piece(list(range(n)))
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        self._build_tables(n)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load ``model_dir/tokenizer.model`` (a path to the ``.model`` file itself also works)."""
        model_dir = os.fspath(model_dir)
        path = model_dir if os.path.isfile(model_dir) else os.path.join(model_dir, "tokenizer.model")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir} has no tokenizer.model (a SentencePiece model is required)")
        return cls(path)

    def _build_tables(self, n: int) -> None:
        """Per id: its kind and its bytes (``_bytes``), and its bytes as the first token (``_first_bytes``)."""
        sp = self._sp
        ids = list(range(n))
        control, unknown, byte = sp.is_control(ids), sp.is_unknown(ids), sp.is_byte(ids)
        unk_surface = sp.decode([sp.unk_id()]).encode("utf-8") if sp.unk_id() >= 0 else b""
        self._kinds = bytearray(n)
        self._bytes: list[bytes] = []
        spaced = []   # normal and user-defined pieces that start with "▁"
        for i, piece in enumerate(self._pieces):
            if control[i]:
                self._kinds[i] = _CONTROL
                self._bytes.append(b"")
            elif unknown[i]:
                self._bytes.append(unk_surface)
            elif byte[i]:
                self._bytes.append(bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)]))
            else:
                self._bytes.append(piece.replace(_SPACE, " ").encode("utf-8"))
                if piece.startswith(_SPACE):
                    spaced.append(i)
        self._first_bytes = self._bytes
        # Ask sentencepiece whether it drops the leading space of a sequence's first piece (add_dummy_prefix or
        # remove_extra_whitespaces), probing with a piece like "▁the", else with a lone "▁". With
        # remove_extra_whitespaces a lone "▁" emptied this way passes the removal on to the next piece.
        probe = next((i for i in spaced if self._pieces[i][1:2] not in ("", _SPACE)), None)
        lone = self._piece_to_id.get(_SPACE)
        lone = lone if lone in spaced else None
        if probe is not None:
            self._strips_first_space = not sp.decode([probe]).startswith(" ")
        else:
            self._strips_first_space = lone is not None and sp.decode([lone]) == ""
        self._strip_repeats = self._strips_first_space and lone is not None and sp.decode([lone, lone]) == ""
        if self._strips_first_space:
            self._first_bytes = list(self._bytes)
            for i in spaced:
                self._first_bytes[i] = self._bytes[i][1:]

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_token_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_token_id(self) -> int | None:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    @property
    def eos_token(self) -> str | None:
        eos = self.eos_token_id
        return None if eos is None else self._pieces[eos]

    @property
    def pad_token_id(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    @property
    def unk_token_id(self) -> int | None:
        return self._sp.unk_id() if self._sp.unk_id() >= 0 else None

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece (``"<extra_id_1>"``, ``"▁the"``), or None if there is no such piece."""
        return self._piece_to_id.get(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """Control tokens (bos, eos, pad). ``<extra_id_N>`` symbols are not special: they are text the chat
        template writes, and decoding keeps them."""
        return self._kinds[self._check_id(token_id)] == _CONTROL

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to text in the middle of a sequence (b"" for control tokens)."""
        return self._bytes[self._check_id(token_id)]

    def token_text(self, token_id: int) -> str:
        """A readable string for one token, as OpenAI logprobs entries show tokens.

        The piece with ``▁`` shown as a space (no leading-space removal: this is the token on its own).
        A byte-fallback piece is its character when the byte is ASCII (``<0x0A>`` -> ``"\\n"``), else
        ``"bytes:\\xe2"`` (ten ASCII characters, stable and unambiguous), because a lone non-ASCII byte is not
        text; use ``token_bytes`` for a logprobs entry's ``bytes`` field. Control tokens and ``<unk>`` are shown
        as their pieces (``"</s>"``, ``"<unk>"``).
        """
        token_id = self._check_id(token_id)
        piece = self._pieces[token_id]
        if self._kinds[token_id] == _CONTROL or token_id == self._sp.unk_id():
            return piece
        if self._sp.is_byte(token_id):
            value = self._bytes[token_id][0]
            return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
        return piece.replace(_SPACE, " ")

    def _check_id(self, token_id: int) -> int:
        try:
            index = operator.index(token_id)   # ints, numpy integers
        except TypeError:
            raise ValueError(f"Token ids must be integers, got {type(token_id).__name__}.") from None
        if not 0 <= index < len(self._pieces):
            raise ValueError(f"Token id {index} is outside the vocabulary [0, {len(self._pieces)}).")
        return index

    # ---- text ----

    def encode(self, text: str, add_bos: bool = False, control_tokens: bool = False) -> list[int]:
        """Token ids for ``text``. ``<extra_id_N>`` written in the text become their single tokens. With
        ``control_tokens``, so do control pieces (``<s>``, ``</s>``, ``<pad>``), as in HF tokenizers: the text
        between them is encoded piece by piece, each piece as if it started a text. Clients that find the EOS
        id by tokenizing the EOS string (lm-eval's remote tokenizer) rely on this."""
        if add_bos and self.bos_token_id is None:
            raise ValueError("This tokenizer has no BOS token.")
        prefix = [self.bos_token_id] if add_bos else []
        if not control_tokens or self._control_pattern is None:
            return prefix + self._sp.encode(text)
        ids = prefix
        for i, part in enumerate(self._control_pattern.split(text)):
            if i % 2:
                ids.append(self._piece_to_id[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    @functools.cached_property
    def _control_pattern(self) -> re.Pattern | None:
        pieces = sorted((self._pieces[i] for i in range(len(self._pieces)) if self._kinds[i] == _CONTROL),
                        key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; equal to sentencepiece's decode when ``skip_special_tokens`` (see module doc)."""
        stream = _TextStream(self, skip_special_tokens)
        return stream.feed(ids) + stream.finish()

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The Nemotron-4 Instruct prompt (no BOS; an empty system prompt when none is given)::

            <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n{assistant}\\n...

        followed by ``<extra_id_1>Assistant\\n`` when ``add_generation_prompt``. With
        ``add_generation_prompt=False`` and a final assistant message the text ends with that message's content
        and ``"\\n"``: the form a reward model scores. Roles must be system (first message only), user or
        assistant ("developer" is taken as system, as the API does); contents must be strings.
        """
        if not messages:
            raise ValueError("messages must contain at least one message.")
        system = ""
        turns = []
        for index, message in enumerate(messages):
            role, content = self._check_message(index, message)
            if role in _SYSTEM_ROLES:
                if index != 0:
                    raise ValueError(f"messages[{index}]: a system message is only allowed as the first message.")
                system = content
            else:
                turns.append(f"<extra_id_1>{_ROLE_NAMES[role]}\n{content}\n")
        prompt = f"<extra_id_0>System\n{system}\n" + "".join(turns)
        if add_generation_prompt:
            prompt += "<extra_id_1>Assistant\n"
        return prompt

    @staticmethod
    def _check_message(index: int, message: dict) -> tuple[str, str]:
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in _ROLE_NAMES:
            raise ValueError(f"messages[{index}]: unsupported role {str(role)[:40]!r}; "
                             f"Nemotron-4 chat supports 'system' (or 'developer'), 'user' and 'assistant'.")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}]: 'content' must be a string.")
        return role, content

    @property
    def chat_stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn: ``<extra_id_1>`` when the vocabulary has it. EOS is not listed
        here; the engine stops on ``eos_token_id`` anyway."""
        stop = self.token_to_id(_CHAT_STOP_PIECE)
        return [] if stop is None else [stop]


class _TextStream:
    """Token ids -> text, chunk by chunk, with SentencePiece's rules (see the module doc). Bytes of an
    incomplete UTF-8 character are held until the character completes, a control token arrives or
    ``finish``. O(number of ids fed) per call."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._at_start = True   # no non-control token seen yet
        self._utf8 = _Utf8Decoder(errors=_UTF8_ERRORS)

    def feed(self, ids) -> str:
        tok = self._tok
        kinds, table = tok._kinds, tok._bytes
        out: list[str] = []
        run: list[bytes] = []     # bytes of consecutive non-control tokens
        for token_id in ids:
            token_id = tok._check_id(token_id)
            if kinds[token_id] == _CONTROL:
                # A control token ends a byte run: flush it, invalid tail included.
                out.append(self._utf8.decode(b"".join(run), True))
                run.clear()
                if not self._skip:
                    out.append(tok._pieces[token_id])
            elif self._at_start:
                first = tok._first_bytes[token_id]
                self._at_start = not first and tok._strip_repeats
                run.append(first)
            else:
                run.append(table[token_id])
        if run:
            out.append(self._utf8.decode(b"".join(run), False))
        return "".join(out)

    def finish(self) -> str:
        """Everything held back, incomplete characters as U+FFFD."""
        return self._utf8.decode(b"", True)

    def pending_bytes(self) -> int:
        return len(self._utf8.getstate()[0])


class IncrementalDetokenizer:
    """Streams the text of generated tokens, decoded in the context of the prompt.

    Invariant: the concatenation of every ``add`` result and ``flush`` equals
    ``tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)):]``, whatever the chunking; e.g. a
    first output token ``▁Paris`` after a non-empty prompt streams as ``" Paris"``. Bytes of a character split
    over tokens are held back until it completes. (One corner: if the prompt itself ends inside a UTF-8
    character, its incomplete bytes are carried into the output, where they complete or become U+FFFD; the
    output text is then ``decode(prompt + output)`` minus the prompt's text up to its last whole character.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = _TextStream(tokenizer, skip_special_tokens)
        self._stream.feed(prompt_token_ids)   # sets the leading-space state and any held-back bytes
        self._parts: list[str] = []

    def add(self, token_ids: list[int]) -> str:
        """The new text that ``token_ids`` (the next generated tokens) complete; may be ""."""
        delta = self._stream.feed(token_ids)
        if delta:
            self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """The held-back tail at the end of generation (incomplete characters as U+FFFD)."""
        delta = self._stream.finish()
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
