"""nt.tokenizer.from_pretrained on Hugging Face tokenizer folders: ids equal to what the
`tokenizers` library gave for 1090 strings (fixtures made by
tests/fixtures/hf/make_tokenizers.py; no tokenizers needed here), round trips, the bos /
eos / add_bos transformers uses, and every malformed or unsupported file refused by name."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nt.io.common import FormatError
from nt.tokenizer import BPE, SentencePieceBPE, from_pretrained

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
TOKENIZERS = HF / "tokenizers"
STANDALONE = ["gpt2", "llama3", "qwen2", "smollm", "llama2"]
MODELS = ["gpt2", "llama", "qwen2", "mistral", "gemma3_text"]
NAMES = STANDALONE + [f"model_{m}" for m in MODELS]
STRINGS = json.loads((TOKENIZERS / "strings.json").read_text(encoding="utf-8"))


def folder(name: str) -> Path:
    return HF / "models" / name[len("model_"):] if name.startswith("model_") else TOKENIZERS / name


def oracle(name: str) -> dict:
    z = np.load(TOKENIZERS / f"{name}.npz")
    cut = lambda flat, offsets: [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]  # noqa: E731
    return {"ids": cut(z["ids"], z["offsets"]), "special": cut(z["special_ids"], z["special_offsets"]),
            "roundtrip": z["roundtrip"]}


# what each fixture is: nt class, pre-tokenizer or prefix scheme, bos, eos, add_bos, has a chat template
EXPECTED = {
    "gpt2": (BPE, "gpt2", "<|endoftext|>", "<|endoftext|>", False, True),
    "llama3": (BPE, "llama3", "<|begin_of_text|>", "<|eot_id|>", True, True),
    "qwen2": (BPE, "qwen2", None, "<|im_end|>", False, True),
    "smollm": (BPE, "digits", "<|im_start|>", "<|im_end|>", False, True),
    "llama2": (SentencePieceBPE, "piece", "<s>", "</s>", True, True),
    "model_gpt2": (BPE, "gpt2", "<|endoftext|>", "<|endoftext|>", False, False),
    "model_llama": (BPE, "llama3", "<|begin_of_text|>", "<|eot_id|>", True, True),
    "model_qwen2": (BPE, "qwen2", None, "<|im_end|>", False, True),
    "model_mistral": (SentencePieceBPE, "first", "<s>", "</s>", True, True),
    "model_gemma3_text": (SentencePieceBPE, "never", "<bos>", "<eos>", True, True),
}


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    return request.param, from_pretrained(folder(request.param))


def test_fixture_strings_cover_the_cases():
    assert len(STRINGS) >= 1000
    joined = "".join(STRINGS)
    for sample in ("日本", "👍", "\u200d", "e\u0301", "م", "ש", "\t", "\r\n", "<|im_start|>", "<s>", "２０", "'ſt", "🏳️‍🌈"):
        assert sample in joined


def test_encodings_equal_tokenizers(loaded):
    name, tok = loaded
    want = oracle(name)["ids"]
    bad = [(s, tok.encode(s, allowed_special="all"), ids) for s, ids in zip(STRINGS, want)
           if tok.encode(s, allowed_special="all") != ids]
    assert not bad, f"{name}: {len(bad)} of {len(STRINGS)} differ, first {bad[0]!r:.300}"


def test_add_special_tokens_adds_bos_as_tokenizers_does(loaded):
    name, tok = loaded
    for s, want in zip(STRINGS, oracle(name)["special"]):
        assert ([tok.bos_id] if tok.add_bos else []) + tok.encode(s, allowed_special="all") == want


def test_decode_round_trips_where_tokenizers_does(loaded):
    name, tok = loaded
    checked = 0
    for s, ok in zip(STRINGS, oracle(name)["roundtrip"]):
        if ok and not any(t in s for t in tok.special_tokens):   # SentencePiece decodes control tokens as ""
            assert tok.decode(tok.encode(s, allowed_special="all")) == s
            checked += 1
    assert checked > 900


def test_attributes(loaded):
    name, tok = loaded
    kind, pre, bos, eos, add_bos, template = EXPECTED[name]
    assert type(tok) is kind
    assert (tok.pre if kind is BPE else tok.prefix_scheme) == pre
    text = lambda i: None if i is None else (tok.tokens[i] if kind is SentencePieceBPE  # noqa: E731
                                             else tok.token_bytes(i).decode())
    assert (text(tok.bos_id), text(tok.eos_id), tok.add_bos) == (bos, eos, add_bos)
    assert (tok.chat_template is not None) == template


def test_added_tokens_are_matched_as_tokenizers_does():
    tok = from_pretrained(folder("llama3"))
    plain = tok.encode("a<tool>b<|eot_id|>")            # <tool> is not special: always recognised
    assert tok.special_tokens["<tool>"] in plain and tok.special_tokens["<|eot_id|>"] not in plain
    assert tok.encode("<|eot_id|>", allowed_special="all") == [tok.special_tokens["<|eot_id|>"]]
    assert tok.ignore_merges and tok.always_split == {"<tool>"}


def test_model_folder_tokenizers_fit_their_models():
    for arch in MODELS:
        config = json.loads((HF / "models" / arch / "config.json").read_text())
        assert from_pretrained(HF / "models" / arch).vocab_size == config["vocab_size"]


# ====================================================================== variants of valid files

def copy(tmp_path, name="gpt2") -> Path:
    target = tmp_path / name
    shutil.copytree(folder(name), target)
    return target


def edit(path: Path, change) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_merges_as_strings_or_lists_encode_the_same(tmp_path, name):
    d = copy(tmp_path, name)
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    assert isinstance(merges[0], list)   # what tokenizers writes now; older files have "a b"
    edit(d / "tokenizer.json", lambda t: t["model"].update(merges=[" ".join(m) for m in t["model"]["merges"]]))
    tok = from_pretrained(d)
    for s, ids in list(zip(STRINGS, oracle(name)["ids"]))[:300]:
        assert tok.encode(s, allowed_special="all") == ids


def test_special_tokens_as_objects_and_special_tokens_map(tmp_path):
    d = copy(tmp_path, "llama2")
    edit(d / "tokenizer_config.json", lambda c: (c.pop("bos_token"), c.update(eos_token={"content": "</s>"})))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<start_of_turn>"}}))
    edit(d / "tokenizer_config.json", lambda c: c.update(add_bos_token=True))
    tok = from_pretrained(d)
    assert tok.tokens[tok.eos_id] == "</s>" and tok.tokens[tok.bos_id] == "<start_of_turn>" and tok.add_bos


def test_add_bos_follows_transformers(tmp_path):
    d = copy(tmp_path, "llama3")   # the post-processor adds <|begin_of_text|>; the config says nothing
    assert from_pretrained(d).add_bos
    edit(d / "tokenizer_config.json", lambda c: c.update(add_bos_token=False))   # transformers rebuilds: no bos
    assert not from_pretrained(d).add_bos
    edit(d / "tokenizer_config.json", lambda c: c.update(add_eos_token=True))
    with pytest.raises(NotImplementedError, match="add_eos_token"):
        from_pretrained(d)


def test_chat_template_sources(tmp_path):
    d = copy(tmp_path, "qwen2")   # a list of named templates: "default" is taken
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert from_pretrained(d).chat_template == config["chat_template"][0]["template"]
    (d / "chat_template.jinja").write_text("{{ messages }}")   # transformers prefers the file
    assert from_pretrained(d).chat_template == "{{ messages }}"


VARIANTS = json.loads((TOKENIZERS / "variants.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v["name"] for v in VARIANTS])
def test_options_no_fixture_uses_encode_as_tokenizers_does(tmp_path, variant):
    """ByteLevel's add_prefix_space, Llama 3 without ignore_merges, Qwen2 without NFC,
    Metaspace "always" with split and its older add_prefix_space form, added tokens' lstrip /
    rstrip, normalized added tokens under Gemma's normalizer, no fuse_unk / byte_fallback: tokenizers' ids with the change (variants.json)
    for a third of the strings and all with special tokens."""
    d = copy(tmp_path, variant["base"])

    def change(obj):
        for path, value in variant["set"]:
            parent = obj
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
    edit(d / "tokenizer.json", change)
    tok = from_pretrained(d)
    want = oracle(variant["name"])["ids"]
    indices = np.load(TOKENIZERS / f"{variant['name']}.npz")["indices"]
    assert len(want) == len(indices) > 400
    for i, ids in zip(indices, want):
        assert tok.encode(STRINGS[i], allowed_special="all") == ids, repr(STRINGS[i])


# ====================================================================== refused

def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FormatError, match="not a folder"):
        from_pretrained(tmp_path / "nothing")
    d = copy(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match=r"tokenizer\.json: missing"):
        from_pretrained(d)
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE",')
    with pytest.raises(FormatError, match=r"tokenizer\.json: not valid JSON"):
        from_pretrained(d)
    (d / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="the top level must be dict"):
        from_pretrained(d)
    d = copy(tmp_path, "llama3")
    (d / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(FormatError, match=r"tokenizer_config\.json: not valid JSON"):
        from_pretrained(d)


BAD = [  # (fixture, change to tokenizer.json, error, message)
    ("gpt2", lambda t: t["model"].update(type="WordPiece"), NotImplementedError, "model.type 'WordPiece'"),
    ("llama2", lambda t: t["model"].update(type="Unigram"), NotImplementedError, "model.type 'Unigram'"),
    ("gpt2", lambda t: t["model"].update(dropout=0.1), NotImplementedError, "model.dropout"),
    ("gpt2", lambda t: t.update(normalizer={"type": "NFKC"}), NotImplementedError, "normalizer NFKC"),
    ("llama2", lambda t: t["normalizer"]["normalizers"].append({"type": "Lowercase"}), NotImplementedError,
     r"normalizer.normalizers\[2\] Lowercase"),
    ("gpt2", lambda t: t.update(pre_tokenizer={"type": "Whitespace"}), NotImplementedError, "pre_tokenizer Whitespace"),
    ("llama3", lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+"),
     NotImplementedError, r"pre_tokenizer.pretokenizers\[0\].pattern .* not a regex nt reproduces"),
    ("llama3", lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), NotImplementedError,
     "behavior 'Removed'"),
    ("gpt2", lambda t: t["pre_tokenizer"].update(use_regex=False), NotImplementedError, "pre_tokenizer ByteLevel"),
    ("smollm", lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(individual_digits=False),
     NotImplementedError, "individual_digits"),
    ("gpt2", lambda t: t["model"]["merges"].__setitem__(3, ["Ġzzz", "q"]), FormatError,
     r"model.merges\[3\] .* names 'Ġzzz', which is not in model.vocab"),
    ("gpt2", lambda t: t["model"]["merges"].__setitem__(3, "a b c"), FormatError, r"model.merges\[3\] must be"),
    ("gpt2", lambda t: t["model"]["vocab"].update(x=10 ** 12), FormatError, r"model.vocab id of 'x' must be"),
    ("gpt2", lambda t: t["model"]["vocab"].update(dup=7), FormatError, "gives id 7 to both"),
    ("gpt2", lambda t: t["model"]["vocab"].update({"é€": 600}), FormatError,
     "not spelled in ByteLevel's byte alphabet"),
    ("gpt2", lambda t: t["added_tokens"][0].update(single_word=True), NotImplementedError,
     r"added_tokens\[0\] .* single_word"),
    ("gpt2", lambda t: t["added_tokens"][0].update(id=5), FormatError, "model.vocab gives to"),
    ("llama2", lambda t: t["added_tokens"][0].update(special=False, normalized=True), NotImplementedError,
     "matched after the '▁' normalizer"),
    ("llama2", lambda t: t["added_tokens"][1].update(normalized=True), NotImplementedError,
     r"added_tokens\[1\] \('</s>'\) is matched after the '▁' normalizer"),
    ("model_gemma3_text", lambda t: t["added_tokens"][4].update(normalized=True, content="<end of turn>"),
     NotImplementedError, "matched after the '▁' normalizer"),
    ("llama2", lambda t: t["post_processor"].update(single=[{"Sequence": {"id": "A", "type_id": 0}},
                                                            {"SpecialToken": {"id": "</s>", "type_id": 0}}]),
     NotImplementedError, "nt adds only a bos"),
    ("llama2", lambda t: t["post_processor"].update(type="BertProcessing"), NotImplementedError,
     "post_processor BertProcessing"),
    ("llama2", lambda t: t["decoder"]["decoders"].append({"type": "CTC"}), NotImplementedError, "decoder.decoders"),
    ("gpt2", lambda t: t.update(decoder=None), NotImplementedError, "decoder null"),
    ("llama2", lambda t: t.update(normalizer=None), NotImplementedError, "a BPE without a ByteLevel pre-tokenizer"),
    ("llama2", lambda t: t["model"].update(unk_token="<nope>"), FormatError, "model.unk_token '<nope>'"),
    ("gpt2", lambda t: t["model"]["vocab"].pop("Ġ"), FormatError, r"must be an integer in \[0, 599\), got 599"),
    ("gpt2", lambda t: (t["model"].update(merges=[]), t["model"]["vocab"].update({"Ġ" * 30: t["model"]["vocab"]
                                                                                 .pop("Ġ")})),
     FormatError, "lacks the single-byte tokens"),
]


@pytest.mark.parametrize("name,change,error,message", BAD)
def test_refused_tokenizer_json(tmp_path, name, change, error, message):
    d = copy(tmp_path, name)
    edit(d / "tokenizer.json", change)
    with pytest.raises(error, match=message) as e:
        from_pretrained(d)
    assert str(d / "tokenizer.json") in str(e.value)


def test_refused_tokenizer_config(tmp_path):
    d = copy(tmp_path, "llama3")
    edit(d / "tokenizer_config.json", lambda c: c.update(eos_token="<|nope|>"))
    with pytest.raises(FormatError, match=r"tokenizer_config\.json: eos_token '<\|nope\|>' is not a token"):
        from_pretrained(d)
    edit(d / "tokenizer_config.json", lambda c: c.update(eos_token=["<|eot_id|>"]))
    with pytest.raises(FormatError, match="eos_token must be dict"):
        from_pretrained(d)
    edit(d / "tokenizer_config.json", lambda c: c.update(eos_token="<|eot_id|>", bos_token="<|eot_id|>"))
    with pytest.raises(NotImplementedError, match="post_processor adds '<|begin_of_text|>'"):
        from_pretrained(d)
    d = copy(tmp_path, "gpt2")
    edit(d / "tokenizer_config.json", lambda c: c.update(chat_template=[{"name": 3}]))
    with pytest.raises(FormatError, match=r"chat_template\[0\].name must be str"):
        from_pretrained(d)


def _paths(node, path=(), depth=0):
    """Paths to the nodes of a tokenizer.json tree (the first few entries of long tables)."""
    yield path
    if depth >= 5:
        return
    if isinstance(node, dict):
        keys = list(node)[:4] if path in (("model", "vocab"),) else list(node)
        for k in keys:
            yield from _paths(node[k], path + (k,), depth + 1)
    elif isinstance(node, list):
        for i in range(min(len(node), 3)):
            yield from _paths(node[i], path + (i,), depth + 1)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "llama2", "model_mistral"])
def test_mistyped_values_are_refused_by_name(name):
    """Every node of tokenizer.json swapped for a value of another type: the tokenizer loads
    or the error is a FormatError / NotImplementedError (no TypeError, KeyError, ...)."""
    from nt.hf_tokenizer import tokenizer_from_json
    top = json.loads((folder(name) / "tokenizer.json").read_text(encoding="utf-8"))
    tried = 0
    for path in list(_paths(top))[1:]:
        parent = top
        for key in path[:-1]:
            parent = parent[key]
        original = parent[path[-1]]
        for value in (None, 7, -1, "x", [], {}, True):
            if type(value) is type(original) and value == original:
                continue
            parent[path[-1]] = value
            try:
                tokenizer_from_json(top, "tokenizer.json")
            except (FormatError, NotImplementedError):
                pass
            tried += 1
        parent[path[-1]] = original
    assert tried > 300


def test_mistyped_config_values_are_refused_by_name(tmp_path):
    d = copy(tmp_path, "llama2")
    config = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "add_bos_token", "add_eos_token", "chat_template"):
        for value in (None, 7, "x", [], {}, [{}], {"content": 1}, True):
            (d / "tokenizer_config.json").write_text(json.dumps({**config, key: value}))
            try:
                from_pretrained(d)
            except (FormatError, NotImplementedError) as e:
                assert "tokenizer_config.json" in str(e)
    (d / "tokenizer_config.json").write_text(json.dumps([config]))
    with pytest.raises(FormatError, match=r"tokenizer_config\.json: the top level must be dict"):
        from_pretrained(d)


def test_nt_does_not_import_the_oracles():
    import subprocess
    import sys
    code = ("import sys, nt.hf_tokenizer, nt.chat, nt.tokenizer as t; t.from_pretrained(sys.argv[1]); "
            "bad = [m for m in ('tokenizers', 'transformers', 'torch') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(folder("llama3"))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
