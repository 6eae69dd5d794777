"""/tokenize, /detokenize and /tokenizer_info (vLLM's shapes): what lm-eval's remote tokenizer and token-counting
clients read. Tokenization here is exactly the serving path's: a text prompt as /v1/completions encodes it
(control pieces such as "</s>" written in the text become their ids), messages through the chat template."""
from __future__ import annotations

from server.api.protocol import APIError, DetokenizeRequest, TokenizeRequest
from server.api.tokenizer import CHAT_TEMPLATE, Tokenizer


def tokenize(tokenizer: Tokenizer, request: TokenizeRequest, max_model_len: int) -> dict:
    if request.add_special_tokens and tokenizer.bos_token_id is None:
        raise APIError("This tokenizer has no BOS token to add.", param="add_special_tokens")
    if request.messages is not None:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, request.add_generation_prompt)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        tokens = tokenizer.encode(text, add_bos=request.add_special_tokens)
    else:
        tokens = tokenizer.encode(request.prompt, add_bos=request.add_special_tokens, control_tokens=True)
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
            "token_strs": [tokenizer.id_to_piece(t) for t in tokens] if request.return_token_strs else None}


def detokenize(tokenizer: Tokenizer, request: DetokenizeRequest) -> dict:
    try:
        return {"prompt": tokenizer.decode(request.tokens)}
    except ValueError as e:
        raise APIError(str(e), param="tokens") from None


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    def piece(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.id_to_piece(token_id)

    return {
        "tokenizer_class": "SentencePiece",
        "vocab_size": tokenizer.vocab_size,
        "model_max_length": max_model_len,
        "bos_token": piece(tokenizer.bos_token_id), "bos_token_id": tokenizer.bos_token_id,
        "eos_token": piece(tokenizer.eos_token_id), "eos_token_id": tokenizer.eos_token_id,
        "pad_token": piece(tokenizer.pad_token_id), "pad_token_id": tokenizer.pad_token_id,
        "unk_token": piece(tokenizer.unk_token_id), "unk_token_id": tokenizer.unk_token_id,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        # Generation for chat stops on these as well as EOS.
        "chat_stop_tokens": [tokenizer.id_to_piece(t) for t in tokenizer.chat_stop_token_ids],
    }
