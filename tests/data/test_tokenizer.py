"""nt.tokenizer against independent implementations: the `regex` package running GPT-2's
real pattern (pre-tokenizer), HF `tokenizers` and `tiktoken` loading the files nt writes
(encoder), a plain-Python GPT-2 bpe() written here (encoder), and round-trip properties."""
import json
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nt.io import FormatError
from nt.tokenizer import BPE, ENDOFTEXT, PRE_TOKENIZERS, bytes_to_unicode, pretokenize

regex = pytest.importorskip("regex")

GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# the later models' patterns as their tokenizer files write them (contractions in either
# case, as llama.cpp spells them)
LLAMA3_PATTERN = regex.compile(r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"""
                               r"""|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = regex.compile(LLAMA3_PATTERN.pattern.replace(r"\p{N}{1,3}", r"\p{N}"))


def reference_pretokenize(text, pre):
    """The `regex` package's split: one pattern, or (digits) each digit alone and GPT-2's
    pattern on each run of text between digits."""
    if pre == "digits":
        return [t for piece in regex.split(r"(\p{N})", text) if piece
                for t in ([piece] if regex.fullmatch(r"\p{N}", piece) else GPT2_PATTERN.findall(piece))]
    return {"gpt2": GPT2_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}[pre].findall(text)

SAMPLES = [
    "Hello world! It's a test: we've got 12345 numbers, they'll do 3.14159 and 1,000,000.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n  trailing   ",
    "Emoji 😀👍🏽 mixed with CJK 漢字かなカナ and Ελληνικά, русский, العربية, हिन्दी.",
    "I'M SHOUTING, don't 'quote' me; 'S 'T 're've'm'll'd''s",
    "x\u00a0y\u2003z\u3000w\u200bq \u0085 end\u2028line\x1c\x1d\x1e\x1fsep",
    "numbers: ²³ ½ Ⅻ ٣٤ ० mixed1a2b3 __init__ a+b==c; (foo)[bar]{baz} -> 'ok'",
    "    def f(x):\n        return x ** 2  # comment\n\n\n",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def corpus():
    from nt.data import builtin_corpus_text
    return builtin_corpus_text()[:200_000] + "".join(SAMPLES)


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPE.train(corpus, 700, special_tokens=[ENDOFTEXT, "<|im_start|>", "<|im_end|>"])


def assigned(ch: str) -> bool:
    # Python's unicodedata (e.g. Unicode 14) is older than `regex`'s tables: characters
    # assigned since then are classified differently by the two; leave them out.
    return unicodedata.category(ch) not in ("Cn", "Cs")


unicode_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(assigned), max_size=60)
spacey_text = st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\u00a0\u2003'sStdl1é😀!.,")), max_size=40)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_pretokenize_matches_regex(text, pre):
    assert pretokenize(text, pre) == reference_pretokenize(text, pre)


@settings(max_examples=200, deadline=None)
@given(st.one_of(unicode_text, spacey_text), st.sampled_from(PRE_TOKENIZERS))
def test_pretokenize_matches_regex_random(text, pre):
    assert pretokenize(text, pre) == reference_pretokenize(text, pre)


def test_pretokenizers_differ_where_the_models_do():
    text = "I'M 2024ish\n\nok.\n"
    assert pretokenize(text) == ["I", "'", "M", " 2024", "ish", "\n", "\n", "ok", ".", "\n"]
    assert pretokenize(text, "llama3") == ["I", "'M", " ", "202", "4", "ish", "\n\n", "ok", ".\n"]
    assert pretokenize(text, "qwen2") == ["I", "'M", " ", "2", "0", "2", "4", "ish", "\n\n", "ok", ".\n"]
    assert pretokenize(text, "digits") == ["I", "'", "M", " ", "2", "0", "2", "4", "ish", "\n", "\n", "ok", ".", "\n"]
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'gpt4'"):
        pretokenize(text, "gpt4")


@pytest.mark.parametrize("pre", ["llama3", "digits"])
def test_bpe_keeps_its_pre_tokenizer(corpus, pre, tmp_path):
    bpe = BPE.train(corpus[:50_000], 400, pre=pre)
    assert bpe.pre == pre
    text = "In 2024, I'M here:\n\n  x = 12345.\n"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) == sum(len(bpe.encode(w)) for w in pretokenize(text, pre))  # merges stay inside pre-tokens
    bpe.save(tmp_path)
    again = BPE.load(tmp_path)
    assert again.pre == pre and again.encode(text) == ids
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        BPE.train("abc", 300, pre="nope")


def test_pretokenize_attaches_space_to_next_word():
    assert pretokenize("Hello  world") == ["Hello", " ", " world"]
    assert pretokenize("a\n\nb") == ["a", "\n", "\n", "b"]  # the lookahead leaves the last \\s
    assert pretokenize("it's 42") == ["it", "'s", " 42"]


def reference_bpe_encode(bpe_ranks: dict, byte_encoder: dict, vocab: dict, text: str) -> list[int]:
    """GPT-2's encoder.py algorithm, written plainly: regex pre-tokens, then per pre-token
    repeatedly merge the lowest-ranked adjacent pair everywhere, left to right."""
    ids = []
    for token in GPT2_PATTERN.findall(text):
        word = [byte_encoder[b] for b in token.encode("utf-8")]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: bpe_ranks.get(p, float("inf")))
            if best not in bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids


@pytest.fixture(scope="module")
def saved(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe.save(path)
    return path


def test_train_learns_requested_vocab(bpe):
    assert bpe.vocab_size == 700
    assert len(bpe.merges) == 700 - 256 - 3
    assert bpe.special_tokens == {ENDOFTEXT: 697, "<|im_start|>": 698, "<|im_end|>": 699}
    assert bpe.encode(" the")  # common words become single tokens
    assert len(bpe.encode(" the")) == 1


def test_encode_matches_reference_algorithm(bpe, saved, corpus):
    vocab = json.loads((saved / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (saved / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    ranks = {m: r for r, m in enumerate(merges)}
    for text in SAMPLES + [corpus[-5000:]]:
        assert bpe.encode(text) == reference_bpe_encode(ranks, bytes_to_unicode(), vocab, text)


def test_encode_matches_hf_tokenizers(bpe, saved, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(saved / "vocab.json"), str(saved / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for text in SAMPLES + [corpus[:20000]]:
        assert bpe.encode(text) == tok.encode(text).ids


def test_encode_matches_tiktoken(bpe, corpus):
    tiktoken = pytest.importorskip("tiktoken")
    # our ids are merge order (bytes 0-255 first), which is exactly tiktoken's rank order
    ranks = {bpe.vocab[i]: i for i in range(bpe.vocab_size) if i not in bpe.special_ids}
    enc = tiktoken.Encoding("nt-test", pat_str=GPT2_PATTERN.pattern, mergeable_ranks=ranks,
                            special_tokens=bpe.special_tokens)
    for text in SAMPLES + [corpus[:20000]]:
        assert bpe.encode(text) == enc.encode_ordinary(text)
    text = f"a{ENDOFTEXT}b<|im_start|>user\nhi<|im_end|>"
    assert bpe.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_save_load_and_gpt2_files_roundtrip(bpe, saved):
    again = BPE.load(saved)
    same = BPE.from_gpt2_files(saved / "vocab.json", saved / "merges.txt")
    for other in (again, same):
        assert other.vocab == bpe.vocab and other.merges == bpe.merges
        assert other.special_tokens == bpe.special_tokens
        for text in SAMPLES:
            assert other.encode(text) == bpe.encode(text)


def test_special_tokens(bpe):
    text = f"one{ENDOFTEXT}<|im_start|>two<|im_end|>"
    ids = bpe.encode(text, allowed_special="all")
    assert ids.count(bpe.special_tokens[ENDOFTEXT]) == 1
    assert bpe.special_tokens["<|im_start|>"] in ids and bpe.special_tokens["<|im_end|>"] in ids
    assert bpe.decode(ids) == text
    plain = bpe.encode(text)  # not allowed: encoded as ordinary text
    assert not set(plain) & set(bpe.special_ids) and bpe.decode(plain) == text
    only_eot = bpe.encode(text, allowed_special={ENDOFTEXT})
    assert bpe.special_tokens[ENDOFTEXT] in only_eot and bpe.special_tokens["<|im_end|>"] not in only_eot
    with pytest.raises(ValueError, match="not special tokens"):
        bpe.encode(text, allowed_special={"<|nope|>"})


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_decode_encode_roundtrip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bad_inputs(bpe, tmp_path):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="smaller than 256"):
        BPE.train("abc", 200)
    (tmp_path / "vocab.json").write_text(json.dumps({bytes_to_unicode()[b]: b for b in range(256)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="merges.txt:2: bad merge line"):
        BPE.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_gpt2_files_with_any_id_order(bpe, saved, tmp_path):
    # OpenAI's vocab.json does not number single bytes by byte value: permute every id
    vocab = json.loads((saved / "vocab.json").read_text(encoding="utf-8"))
    perm = np.random.default_rng(0).permutation(len(vocab))
    shuffled = {token: int(perm[i]) for token, i in vocab.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled), encoding="utf-8")
    merges_text = (saved / "merges.txt").read_text(encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    other = BPE.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    ranks = {tuple(line.split(" ")): r for r, line in enumerate(merges_text.splitlines()[1:])}
    for text in SAMPLES:
        ids = other.encode(text)
        assert ids == reference_bpe_encode(ranks, bytes_to_unicode(), shuffled, text)
        assert ids == [int(perm[i]) for i in bpe.encode(text)]
        assert other.decode(ids) == text
    assert other.special_tokens == {s: int(perm[i]) for s, i in bpe.special_tokens.items()}


def test_decode_refuses_non_integer_and_out_of_range_ids(bpe):
    assert bpe.decode([np.int64(72), np.uint16(105), 33]) == bpe.decode([72, 105, 33])
    for bad in (1.7, np.float32(1.0), "1", True, None):
        with pytest.raises(TypeError, match="token ids must be integers"):
            bpe.decode([bad])
    for i in (-1, bpe.vocab_size, 10 ** 20):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            bpe.token_bytes(i)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            bpe.decode([i])
    with pytest.raises(TypeError):
        bpe.token_bytes(2.0)


@pytest.fixture
def folder(saved, tmp_path):
    """A copy of a saved tokenizer folder to break."""
    for p in saved.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path


def edit_vocab(folder, edit):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    (folder / "vocab.json").write_text(json.dumps(edit(vocab)), encoding="utf-8")


@pytest.mark.parametrize("edit,message", [
    (lambda v: {**v, "zzz": 10 ** 12}, "must be an integer in \\[0, "),   # was list(range(10**12)): MemoryError
    (lambda v: {**v, "zzz": -1}, "must be an integer in"),
    (lambda v: {**v, "zzz": 3.0}, "must be an integer in"),
    (lambda v: {**v, "zzz": "3"}, "must be an integer in"),
    (lambda v: {**v, "zzz": True}, "must be an integer in"),
    (lambda v: {**v, "zzz": 3}, "an id repeats"),
    (lambda v: list(v), "top level must be dict"),
])
def test_hostile_vocab_json(folder, edit, message):
    edit_vocab(folder, edit)
    with pytest.raises(FormatError, match=message) as info:
        BPE.load(folder)
    assert "vocab.json" in str(info.value)


@pytest.mark.parametrize("name,content,message", [
    ("vocab.json", b'{"a": 0, "\xff": 1}', "vocab.json: not valid UTF-8"),
    ("vocab.json", b'{"a": 0,', "vocab.json: not valid JSON"),
    ("vocab.json", b'{"a": 0, "a": 0}', "duplicate key"),
    ("merges.txt", b"#version: 0.2\nh e\n\xc3\n", "merges.txt:3: not valid UTF-8"),
    ("special_tokens.json", b'["<|endoftext|>"]', "special_tokens.json: the top level must be dict"),
    ("special_tokens.json", b'{"<|endoftext|>": "0"}', "special_tokens.json: id of '<|endoftext|>' must be int"),
    ("special_tokens.json", b'{"<|endoftext|>": 0}', "special token '<|endoftext|>' has id"),
    ("special_tokens.json", b'{"<|nothing|>": 3}', "special token '<|nothing|>' has id None"),
    ("pre_tokenizer.json", b'"gpt2"', "pre_tokenizer.json: the top level must be dict"),
    ("pre_tokenizer.json", b'{"pre": "gpt5"}', "pre_tokenizer.json: \"pre\" must be one of"),
    ("pre_tokenizer.json", b'{}', "pre_tokenizer.json: \"pre\" must be one of"),
    ("pre_tokenizer.json", b"[" * 1000 + b"]" * 1000, "nested deeper"),
])
def test_hostile_tokenizer_files(folder, name, content, message):
    (folder / name).write_bytes(content)
    with pytest.raises(FormatError, match=message):
        BPE.load(folder)


def test_empty_vocabulary(folder):
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("")
    (folder / "special_tokens.json").write_text("{}")
    with pytest.raises(FormatError, match="not a usable BPE vocabulary: .* lacks the single-byte tokens"):
        BPE.load(folder)


def test_missing_tokenizer_files(folder, tmp_path):
    (folder / "merges.txt").unlink()
    with pytest.raises(FormatError, match="merges.txt: missing"):
        BPE.load(folder)
    with pytest.raises(FileNotFoundError):
        BPE.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):  # paths the caller names are the caller's
        BPE.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")


def test_from_tokens_refuses_non_strings_and_duplicates():
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    with pytest.raises(FormatError, match="token 3 must be str"):
        BPE.from_tokens(tokens[:3] + [3] + tokens[4:], [])
    with pytest.raises(FormatError, match="merge 0 must be str"):
        BPE.from_tokens(tokens, [b"a b"])
    with pytest.raises(FormatError, match="duplicate"):
        BPE.from_tokens(tokens + tokens[:1], [])
