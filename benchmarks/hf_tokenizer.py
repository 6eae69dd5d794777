"""An HF tokenizer (tokenizer.json + tokenizer_config.json) that reproduces a SentencePiece `tokenizer.model`
exactly, so that vLLM and transformers read the same ids as n4 (`side_by_side.py --make-hf-tokenizer DIR` /
`--check-hf-tokenizer DIR`)."""

from __future__ import annotations

import json
import os
import random

from server.api.tokenizer import CHAT_TEMPLATE



def build_hf_tokenizer(spm_path: str):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece BPE model at `spm_path`.

    Built from the model's own settings rather than transformers' Llama converter, which assumes Llama's
    dummy prefix (the demo model has none):

    * BPE over SentencePiece's pieces; a merge for every split of a normal piece into two normal pieces,
      ranked by the merged piece's score (SentencePiece merges the highest-scoring adjacent pair first);
      byte fallback for characters outside the vocabulary.
    * The normalizer spec: only whitespace escaping (" " -> "▁") and a dummy prefix where the model has one;
      models with a character map or extra-whitespace removal are refused rather than approximated.
    * User-defined pieces (`<extra_id_N>`) are added tokens, never merged, as in SentencePiece; control
      pieces (`<pad>`, `<s>`, `</s>`) are special added tokens, so written in text they become their ids, as
      n4's server does (`Tokenizer.encode(control_tokens=True)`); `<unk>` is left to the model (written in
      text it is ordinary characters, as in SentencePiece).
    * No BOS/EOS added (Nemotron-4 prompts carry none; n4 adds none).
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = model_pb2.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{spm_path}: only SentencePiece BPE models are supported")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ValueError(f"{spm_path}: normalization ({norm.name}, remove_extra_whitespaces="
                         f"{norm.remove_extra_whitespaces}) is not reproduced here")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{spm_path}: treat_whitespace_as_suffix is not supported")

    piece_type = model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == piece_type.NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    unk = proto.pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=trainer.byte_fallback, ignore_merges=False))
    # SentencePiece escapes spaces, then prepends the dummy prefix ("▁", or " " without escaping).
    steps = [normalizers.Replace(" ", "▁")] if norm.escape_whitespaces else []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁" if norm.escape_whitespaces else " "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = []
    if unk is not None:
        # SentencePiece decodes the unknown piece to its "unk surface" (" ⁇ " by default), not to "<unk>".
        dec.append(decoders.Replace(unk, trainer.unk_surface))
    if norm.escape_whitespaces:
        dec.append(decoders.Replace("▁", " "))
    if trainer.byte_fallback:
        # ByteFallback turns a whole run of byte pieces into one U+FFFD per piece when the run is not valid
        # UTF-8, where SentencePiece replaces only the offending bytes. An ASCII byte is valid on its own, so
        # decoding its piece to its character first (ending the run there) matches SentencePiece for runs
        # broken by ASCII bytes; an invalid run of non-ASCII bytes alone can still differ (see README).
        for i, p in enumerate(proto.pieces):
            if p.type == piece_type.BYTE and p.piece.startswith("<0x") and int(p.piece[3:5], 16) < 0x80:
                dec.insert(0, decoders.Replace(p.piece, chr(int(p.piece[3:5], 16))))
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    added = []
    for i, p in enumerate(proto.pieces):
        if p.type == piece_type.CONTROL:
            added.append(AddedToken(p.piece, special=True, normalized=False))
        elif p.type == piece_type.USER_DEFINED:
            added.append(AddedToken(p.piece, special=False, normalized=False))
    tok.add_tokens(added)
    return tok, proto


def write_hf_tokenizer(model_dir: str) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `model_dir/tokenizer.model`."""
    spm_path = os.path.join(model_dir, "tokenizer.model")
    tok, proto = build_hf_tokenizer(spm_path)
    t = proto.trainer_spec
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    specials = {"bos_token": piece.get(t.bos_id), "eos_token": piece.get(t.eos_id), "pad_token": piece.get(t.pad_id)}
    specials = {k: v for k, v in specials.items() if v is not None}
    added_decoder = {}
    for i, p in enumerate(proto.pieces):
        if p.type in (3, 4):  # CONTROL, USER_DEFINED
            added_decoder[str(i)] = {"content": p.piece, "lstrip": False, "rstrip": False, "normalized": False,
                                     "single_word": False, "special": p.type == 3}
    config = {
        # The generic fast class: it takes tokenizer.json as it is (LlamaTokenizer would re-add Llama's dummy
        # prefix and BOS), in transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": _max_positions(model_dir),
        "added_tokens_decoder": added_decoder,
        # The Nemotron-4 chat format as n4 serves it, so vLLM or transformers reading this folder build the same
        # chat prompts (without it they have no chat template at all).
        "chat_template": CHAT_TEMPLATE,
        **specials,
    }
    paths = [os.path.join(model_dir, n) for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    tok.save(paths[0], pretty=False)
    with open(paths[1], "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(paths[2], "w") as f:
        json.dump(specials, f, indent=2)
        f.write("\n")
    return paths


def _max_positions(model_dir: str) -> int:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings", 2048))
    except (OSError, ValueError):
        return 2048


def tokenizer_check_texts(seed: int = 0) -> list[str]:
    """Varied text for comparing tokenizers: prose, code, spacing, digits, accents, CJK, emoji, control pieces."""
    fixed = [
        "Hello world", " leading space", "trailing space ", "  two  spaces   three", "\ttab\tand\nnewlines\n\n",
        "The quick brown fox jumps over the lazy dog. 3.14159 and 2,718,281!",
        "def f(x):\n    return x ** 2  # square\n", "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文",
        "emoji 🙂👍🏽 and symbols ©®™ ∑∫√ ≤≥", "<extra_id_0>System\n\n<extra_id_1>User\nHi<extra_id_1>Assistant\n",
        "before</s>after<s>x<pad>", "<unk> literal", "a" * 200, "▁ already escaped ▁▁", "", " ", "\u00a0nbsp\u2003em",
        "1234567890 0x1F 1e-9", "ﬁ ligature Ａ fullwidth", "mixed\r\nCRLF", "\x00\x01 control chars",
    ]
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 .,;:!?'\"()-_\n\t  éüß中文🙂<>/"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(300)]
    from benchmarks.datasets import make_random_prompts
    return fixed + randoms + make_random_prompts(20, 64, seed=seed)


def check_hf_tokenizer(model_dir: str, texts: list[str] | None = None) -> dict:
    """Compare the HF tokenizer saved in `model_dir` with sentencepiece and with n4's tokenizer, both ways."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from server.api.tokenizer import Tokenizer

    texts = tokenizer_check_texts() if texts is None else texts
    hf = AutoTokenizer.from_pretrained(model_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    n4 = Tokenizer.from_pretrained(model_dir)
    report = {"texts": len(texts), "encode_vs_sentencepiece": [], "encode_vs_n4": [], "decode_vs_sentencepiece": [],
              "decode_vs_n4": []}
    has_control = ("<s>", "</s>", "<pad>")  # sentencepiece itself encodes these as text
    for text in texts:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        if not any(c in text for c in has_control) and ids != sp.encode(text):
            report["encode_vs_sentencepiece"].append(text)
        if ids != n4.encode(text, control_tokens=True):
            report["encode_vs_n4"].append(text)
    rng = random.Random(1)
    vocab = sp.get_piece_size()
    id_lists = [sp.encode(t) for t in texts] + [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
                                                for _ in range(300)]
    for ids in id_lists:
        out = hf.decode(ids, skip_special_tokens=True)
        if out != sp.decode(ids):
            report["decode_vs_sentencepiece"].append(ids)
        if out != n4.decode(ids):
            report["decode_vs_n4"].append(ids)
    report["decoded_id_lists"] = len(id_lists)
    report["equal"] = not any(report[k] for k in ("encode_vs_sentencepiece", "encode_vs_n4",
                                                 "decode_vs_sentencepiece", "decode_vs_n4"))
    return report


