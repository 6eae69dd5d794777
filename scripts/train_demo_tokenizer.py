"""Train the demo model's SentencePiece tokenizer: ``models/demo/tokenizer.model``.

Corpus
    The Python Language Reference topics that ship inside every CPython install as
    ``pydoc_data/topics.py`` (the text behind ``help("assert")`` etc.): about 465k characters of
    English prose with code samples. Licence: Python Software Foundation License Version 2 (the
    licence CPython and its documentation are distributed under), which permits use, modification
    and redistribution. Nothing is downloaded. The text differs slightly between Python versions;
    the committed model was trained from CPython 3.11.7 (``CORPUS_SHA256`` below; the script says when
    the corpus or the result differs). With the same corpus the output file is byte-identical on every rerun.

Layout (mirrors Nemotron-4's real tokenizer where it matters: bos=2, eos=3, ``<extra_id_1>``=5)
    0 ``<pad>``, 1 ``<unk>``, 2 ``<s>``, 3 ``</s>`` (control / unknown pieces),
    4..13 ``<extra_id_0>``..``<extra_id_9>`` (user-defined symbols: matched when they appear inside
    text, which the chat template relies on), 14..269 ``<0x00>``..``<0xFF>`` (byte fallback),
    270..4095 learned pieces.

Choices
    * BPE rather than unigram: Nemotron-4's own tokenizer is, to our knowledge, a SentencePiece BPE
      model with byte fallback, so the demo exercises the same kind of vocabulary (merged pieces plus
      ``<0xNN>`` fallbacks); BPE training is also single-pass and deterministic.
    * ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False``: text (newlines,
      runs of spaces, any Unicode) round-trips exactly; the chat template relies on ``"\\n"``, which
      encodes as the byte piece ``<0x0A>`` (SentencePiece trains on lines, so no piece contains it).
    * ``add_dummy_prefix=False``: chat prompts begin with ``<extra_id_0>``; a dummy prefix would put a
      stray ``"▁"`` token in front of every prompt. (``server.api.tokenizer`` handles either setting.)
    * ``allow_whitespace_only_pieces=True`` keeps runs of spaces (code indentation) as few pieces;
      ``split_digits=True`` makes numbers one token per digit.
    * ``num_threads=1`` and the whole corpus as input (no sampling) keep training deterministic.

Run from the repository root: ``python scripts/train_demo_tokenizer.py`` (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import sys

import sentencepiece as spm

VOCAB_SIZE = 4096
NUM_EXTRA_IDS = 10
# The corpus and the model file as committed (CPython 3.11.7, sentencepiece 0.2.x).
CORPUS_SHA256 = "18d96a28c98ed2f7772dd89f606e68fa2df5d8bd22b7be0907d17befbd05c753"
MODEL_SHA256 = "97ac6d3d85b25645a855823042f0ca13871001820458f3d91e1f4879b66cb580"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "models" / "demo" / "tokenizer.model"


def corpus_lines() -> list[str]:
    """The Language Reference topics, in sorted topic order, one line per SentencePiece sentence."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    return [line for line in text.split("\n") if line.strip()]


def train(out: pathlib.Path) -> bytes:
    lines = corpus_lines()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    print(f"corpus: {len(lines)} lines, sha256 {digest}", file=sys.stderr)
    if digest != CORPUS_SHA256:
        print("note: this Python's Language Reference text differs from the committed model's corpus; "
              "the trained model will differ from the committed one", file=sys.stderr)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=[f"<extra_id_{i}>" for i in range(NUM_EXTRA_IDS)],
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    data = model.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    model_digest = hashlib.sha256(data).hexdigest()
    same = "identical to" if model_digest == MODEL_SHA256 else "differs from"
    print(f"wrote {out}: {len(data)} bytes, sha256 {model_digest} ({same} the committed model)", file=sys.stderr)
    return data


def check(path: pathlib.Path) -> None:
    """Fail loudly if the layout the server relies on is not what we asked for."""
    sp = spm.SentencePieceProcessor(model_file=str(path))
    expected = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<extra_id_0>": 4, "<extra_id_1>": 5}
    for piece, want in expected.items():
        got = sp.piece_to_id(piece)
        if got != want:
            raise SystemExit(f"{piece} has id {got}, expected {want}")
    if sp.get_piece_size() != VOCAB_SIZE:
        raise SystemExit(f"vocab size {sp.get_piece_size()}, expected {VOCAB_SIZE}")
    sample = "<extra_id_0>System\n\n<extra_id_1>User\n  two  spaces, ünïcödé, 東京, 🙂\n<extra_id_1>Assistant\n"
    if sp.decode(sp.encode(sample)) != sample:
        raise SystemExit("encode/decode does not round-trip the sample text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train(args.out)
    check(args.out)


if __name__ == "__main__":
    main()
