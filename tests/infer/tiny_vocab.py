"""Tiny GPT-2-style and SentencePiece-style vocabularies as GGUF tokenizer.ggml.* metadata."""
from nt.tokenizer import bytes_to_unicode

GPT2_MERGES = ["h e", "l l", "he ll", "\u0120 w"]   # ids 256..259
ENDOFTEXT_ID = 260


def gpt2_metadata() -> dict:
    enc = bytes_to_unicode()
    tokens = [enc[b] for b in range(256)] + ["he", "ll", "hell", "\u0120w", "<|endoftext|>"]
    types = [1] * 260 + [3]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": GPT2_MERGES,
            "tokenizer.ggml.bos_token_id": ENDOFTEXT_ID, "tokenizer.ggml.eos_token_id": ENDOFTEXT_ID}


# (piece, score) after <unk>, <s>, </s> and the 256 byte tokens: ids 259..
SP_PIECES = [("\u2581", -1.0), ("h", -2.0), ("e", -3.0), ("l", -4.0), ("o", -5.0), ("w", -6.0), ("r", -7.0),
             ("d", -8.0), ("ll", -1.5), ("he", -2.5), ("hell", -0.5), ("\u2581w", -3.5), ("or", -4.5),
             ("<|im_start|>", 0.0), ("<|im_end|>", 0.0)]


def sp_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in SP_PIECES]
    scores = [0.0] * 259 + [s for _, s in SP_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SP_PIECES) - 2) + [4, 4]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}...{% endfor %}"}
