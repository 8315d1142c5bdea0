"""Hugging Face tokenizer folders: tokenizer.json (+ tokenizer_config.json,
special_tokens_map.json, chat_template.jinja) read into nt's own tokenizers.

    tok = nt.tokenizer.from_pretrained("path/to/model")   # a BPE or a SentencePieceBPE
    ids = ([tok.bos_id] if tok.add_bos else []) + tok.encode(text, allowed_special="all")

tokenizer.json describes a pipeline of components (normalizer, pre_tokenizer, model,
post_processor, decoder, added_tokens). nt reads the BPE pipelines that GPT-2, Llama 2/3,
Mistral, Qwen2 and Gemma ship, mapping each onto one of nt's tokenizers:

    byte-level BPE (pre_tokenizer ByteLevel, alone or after a Split regex nt knows or
    Digits)                                        -> nt.tokenizer.BPE, its `pre` named by
                                                      the regex (PRE_TOKENIZERS)
    SentencePiece-style BPE ('▁' for spaces by the normalizer Replace / Prepend or the
    pre_tokenizer Metaspace; byte_fallback <0xNN>) -> nt.tokenizer.SentencePieceBPE with the
                                                      merges in rank order

Read: model BPE (vocab, merges as "a b" or ["a", "b"], byte_fallback, fuse_unk,
ignore_merges, unk_token); normalizer NFC, Prepend('▁'), Replace(' ', '▁') (alone or in a
Sequence); pre_tokenizer ByteLevel (add_prefix_space, use_regex), Split with GPT-2's /
Llama 3's / Qwen2's regex then ByteLevel, Digits(individual_digits) then ByteLevel,
Metaspace (prepend_scheme always / first / never or the older add_prefix_space, split),
Gemma's Split on ' ' after Replace (a no-op); post_processor ByteLevel, TemplateProcessing
putting one token (bos) before the text, or a Sequence of those; decoder ByteLevel, or
Replace('▁', ' ') / Metaspace + ByteFallback + Fuse + Strip(' ', 1, 0); added_tokens with
lstrip / rstrip, special (found when encode allows them) or not (always found).

Refused, naming the file and component (NotImplementedError): other model types
(WordPiece, Unigram, WordLevel), BPE dropout or subword prefixes/suffixes, any other
normalizer (NFKC, Lowercase, Precompiled, ...), pre-tokenizer or Split regex (Python's re
cannot run \\p{L} patterns, so only the known ones map onto nt's), post-processors adding
eos or other tokens (and tokenizer_config.json's add_eos_token), single_word added tokens,
non-special added tokens matched after a '▁' normalizer, decoders nt's decode does not
mirror. Malformed files are FormatErrors naming the file and field. So a tokenizer loads
only when it encodes as tokenizers does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from .io.common import MAX_JSON_BYTES, FormatError, expect, read_json
from .tokenizer import (BPE, SP_BYTE, SP_CONTROL, SP_NORMAL, SP_UNKNOWN, SP_USER_DEFINED, SPACE,
                        SentencePieceBPE, bytes_to_unicode)

TOKENIZER = "tokenizer.json"
CONFIG = "tokenizer_config.json"
SPECIAL_MAP = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"   # where transformers 4.43+ saves the chat template

# the Split regexes of released tokenizers that nt's pre-tokenizers reproduce exactly
KNOWN_REGEXES = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama3",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _unsupported(where: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"{where}: {what}")


def _type(obj, where: str, field: str) -> str:
    """The "type" of a component object."""
    expect(obj, dict, where, field)
    return expect(obj.get("type"), str, where, f"{field}.type")


def _parts(obj, key: str, where: str, field: str) -> list[tuple[dict, str]]:
    """A component as a flat list of (component, field name): a Sequence's members in order,
    nested Sequences flattened, or the component itself; None gives []."""
    if obj is None:
        return []
    if _type(obj, where, field) != "Sequence":
        return [(obj, field)]
    members = expect(obj.get(key), list, where, f"{field}.{key}")
    out = []
    for i, member in enumerate(members):
        out.extend(_parts(member, key, where, f"{field}.{key}[{i}]"))
    return out


def _flag(obj: dict, key: str, default: bool, where: str, field: str) -> bool:
    return expect(obj.get(key, default), bool, where, f"{field}.{key}")


# ====================================================================== components

def _normalizer(obj, where: str) -> tuple[Optional[str], bool, bool]:
    """(unicode normalization or None, Prepend('▁'), Replace(' ', '▁')) of the normalizer."""
    nfc = prepend = replace = False
    for part, field in _parts(obj, "normalizers", where, "normalizer"):
        kind = _type(part, where, field)
        if kind == "NFC":
            nfc = True
        elif kind == "Prepend" and part.get("prepend") == SPACE:
            prepend = True
        elif kind == "Replace" and part.get("pattern") == {"String": " "} and part.get("content") == SPACE:
            replace = True
        else:
            raise _unsupported(where, f"{field} {kind} {_brief(part)} is not supported (nt applies NFC, and "
                                      "Prepend('▁') / Replace(' ', '▁') as SentencePiece-style tokenizers use them)")
    return ("NFC" if nfc else None), prepend, replace


def _brief(obj) -> str:
    return repr({k: v for k, v in obj.items() if k != "type"})[:120]


def _pre_tokenizer(obj, where: str, spaces_replaced: bool) -> dict:
    """What the pre-tokenizer does, as nt's options: {"pre": name, "add_prefix_space": bool}
    for a byte-level BPE, {"metaspace": scheme, "split": bool} for Metaspace, {} for none.
    spaces_replaced: the normalizer turns every ' ' into '▁', so a Split on ' ' (Gemma's)
    never finds one and is left out."""
    parts = _parts(obj, "pretokenizers", where, "pre_tokenizer")
    steps = []
    for part, field in parts:
        kind = _type(part, where, field)
        if kind == "Split" and spaces_replaced and part.get("pattern") == {"String": " "}:
            continue
        if kind == "ByteLevel":
            steps.append(("ByteLevel", _flag(part, "add_prefix_space", True, where, field),
                          _flag(part, "use_regex", True, where, field)))
        elif kind == "Split":
            steps.append(("Split", _split_regex(part, where, field)))
        elif kind == "Digits":
            if not _flag(part, "individual_digits", False, where, field):
                raise _unsupported(where, f"{field} Digits with individual_digits false is not supported "
                                          "(nt splits digits one by one)")
            steps.append(("Digits",))
        elif kind == "Metaspace":
            steps.append(("Metaspace", *_metaspace(part, where, field)))
        else:
            raise _unsupported(where, f"{field} {kind} is not supported (nt reads ByteLevel, Split with the "
                                      "GPT-2 / Llama-3 / Qwen2 regex, Digits and Metaspace)")
    names = [s[0] for s in steps]
    if names == ["ByteLevel"] and steps[0][2]:
        return {"pre": "gpt2", "add_prefix_space": steps[0][1]}
    if names in (["Split", "ByteLevel"], ["Digits", "ByteLevel"]):
        _, add_prefix_space, use_regex = steps[1]
        if add_prefix_space or use_regex != (names[0] == "Digits"):
            raise _unsupported(where, f"pre_tokenizer {names[0]} then ByteLevel(add_prefix_space="
                                      f"{add_prefix_space}, use_regex={use_regex}) is not supported: nt splits "
                                      "like Split(regex) + ByteLevel(false, false) or Digits + ByteLevel(false, true)")
        return {"pre": steps[0][1] if names[0] == "Split" else "digits", "add_prefix_space": False}
    if names == ["Metaspace"]:
        return {"metaspace": steps[0][1], "split": steps[0][2]}
    if not names:
        return {}
    raise _unsupported(where, f"pre_tokenizer {' + '.join(names)} is not a combination nt reproduces "
                              "(ByteLevel; Split or Digits + ByteLevel; Metaspace)")


def _split_regex(part: dict, where: str, field: str) -> str:
    """The nt pre-tokenizer a Split component's regex is."""
    pattern = expect(part.get("pattern"), dict, where, f"{field}.pattern")
    regex = pattern.get("Regex")
    if part.get("behavior") != "Isolated" or part.get("invert", False) is not False:
        raise _unsupported(where, f"{field} Split with behavior {part.get('behavior')!r:.40} and invert "
                                  f"{part.get('invert')!r:.10} is not supported (nt reproduces Isolated, not inverted)")
    if not isinstance(regex, str) or regex not in KNOWN_REGEXES:
        raise _unsupported(where, f"{field}.pattern {str(pattern)[:120]!r} is not a regex nt reproduces (it knows "
                                  "GPT-2's, Llama 3's and Qwen2's; Python's re lacks \\p{L}, so nt cannot run "
                                  "another one exactly)")
    return KNOWN_REGEXES[regex]


def _metaspace(part: dict, where: str, field: str) -> tuple[str, bool]:
    """(prepend scheme, split) of a Metaspace component (older files: add_prefix_space)."""
    if part.get("replacement", SPACE) != SPACE:
        raise _unsupported(where, f"{field}.replacement {part.get('replacement')!r:.20} is not supported (nt uses '▁')")
    if "prepend_scheme" in part:
        scheme = part["prepend_scheme"]
        if scheme not in ("always", "first", "never"):
            raise FormatError(f"{where}: {field}.prepend_scheme must be always, first or never, got {scheme!r:.40}")
    else:
        scheme = "always" if _flag(part, "add_prefix_space", True, where, field) else "never"
    return scheme, _flag(part, "split", True, where, field)


def _decoder(obj, byte_level: bool, where: str) -> bool:
    """Whether decoding strips one leading space; checks that the decoder undoes the model's
    spelling (ByteLevel; or '▁' to ' ' plus byte fallback) the way nt's decode does."""
    parts = _parts(obj, "decoders", where, "decoder")
    kinds = [_type(p, where, f) for p, f in parts]
    if byte_level:
        if kinds != ["ByteLevel"]:
            raise _unsupported(where, f"decoder {' + '.join(kinds) or 'null'} is not supported for a byte-level BPE "
                                      "(nt decodes as ByteLevel)")
        return False
    strip, spaces = False, False
    for (part, field), kind in zip(parts, kinds):
        if kind == "Replace" and part.get("pattern") == {"String": SPACE} and part.get("content") == " ":
            spaces = True
        elif kind == "Metaspace":
            scheme, _ = _metaspace(part, where, field)
            spaces, strip = True, scheme != "never"
        elif kind == "Strip" and part.get("content") == " " and part.get("start") in (0, 1) and part.get("stop") == 0:
            strip = part["start"] == 1
        elif kind not in ("ByteFallback", "Fuse"):
            raise _unsupported(where, f"{field} {kind} {_brief(part)} is not supported (nt decodes '▁' as a space, "
                                      "<0xNN> as bytes, and strips at most one leading space)")
    if not spaces:
        raise _unsupported(where, "decoder does not turn '▁' back into spaces, which nt's decode does")
    return strip


def _post_processor(obj, where: str) -> Optional[str]:
    """The token the post-processor puts before the text (a bos), or None; anything it adds
    elsewhere is refused."""
    bos = None
    for part, field in _parts(obj, "processors", where, "post_processor"):
        kind = _type(part, where, field)
        if kind == "ByteLevel":
            continue   # offsets only
        if kind != "TemplateProcessing":
            raise _unsupported(where, f"{field} {kind} is not supported (nt reads TemplateProcessing adding a bos)")
        single = expect(part.get("single"), list, where, f"{field}.single")
        items = []
        for i, item in enumerate(single):
            expect(item, dict, where, f"{field}.single[{i}]")
            if "Sequence" in item:
                items.append(None)
            else:
                special = expect(item.get("SpecialToken"), dict, where, f"{field}.single[{i}].SpecialToken")
                items.append(expect(special.get("id"), str, where, f"{field}.single[{i}].SpecialToken.id"))
        if items == [None]:
            continue
        if len(items) != 2 or items[0] is None or items[1] is not None:
            raise _unsupported(where, f"{field}.single {items!r:.120} is not supported: nt adds only a bos before "
                                      "the text (no eos, no other tokens)")
        special = expect(part.get("special_tokens", {}), dict, where, f"{field}.special_tokens")
        entry = expect(special.get(items[0]), dict, where, f"{field}.special_tokens[{items[0]!r:.40}]")
        tokens = expect(entry.get("tokens"), list, where, f"{field}.special_tokens[{items[0]!r:.40}].tokens")
        if len(tokens) != 1 or not isinstance(tokens[0], str):
            raise _unsupported(where, f"{field}: special token {items[0]!r:.40} adds {len(tokens)} tokens; "
                                      "nt adds one bos")
        bos = tokens[0]
    return bos


# ====================================================================== vocabulary

def _added_tokens(top: dict, where: str, prepend: bool, replace: bool) -> list[dict]:
    """tokenizer.json's added_tokens, checked: nt reproduces lstrip and rstrip, not
    single_word. nt finds every added token in the raw text; tokenizers finds a
    `normalized` one in normalized text, which differs under a Prepend('▁') normalizer (the
    text after the token gets no '▁') or a Replace(' ', '▁') one (a token holding ' ')."""
    tokens = expect(top.get("added_tokens", []), list, where, "added_tokens")
    out = []
    for i, t in enumerate(tokens):
        field = f"added_tokens[{i}]"
        expect(t, dict, where, field)
        content = expect(t.get("content"), str, where, f"{field}.content")
        tid = expect(t.get("id"), int, where, f"{field}.id")
        if not content:
            raise FormatError(f"{where}: {field}.content is empty")
        if _flag(t, "single_word", False, where, field):
            raise _unsupported(where, f"{field} ({content!r:.40}) sets single_word, which nt does not reproduce")
        special = _flag(t, "special", False, where, field)
        normalized = _flag(t, "normalized", not special, where, field)   # AddedToken's default
        if normalized and (prepend or (replace and " " in content)):
            raise _unsupported(where, f"{field} ({content!r:.40}) is matched after the '▁' normalizer, which nt "
                                      "does not reproduce (nt matches added tokens in the raw text)")
        out.append({"content": content, "id": tid, "special": special,
                    "lstrip": _flag(t, "lstrip", False, where, field),
                    "rstrip": _flag(t, "rstrip", False, where, field)})
    return out


def _token_options(added: list[dict]) -> dict:
    """The tokenizer keyword arguments of the added tokens' options."""
    return {"always_split": [t["content"] for t in added if not t["special"]],
            "lstrip": [t["content"] for t in added if t["lstrip"]],
            "rstrip": [t["content"] for t in added if t["rstrip"]]}


def _id_table(vocab: dict, added: list[dict], where: str) -> list[str]:
    """Token string of every id 0..n-1 from the model's vocab and the added tokens; the ids
    must be exactly 0..n-1 (nothing sized by an id can outgrow the file)."""
    for token, i in vocab.items():
        expect(i, int, where, f"model.vocab id of {token!r:.60}")
    n = len(set(vocab.values()) | {t["id"] for t in added})
    table: list[Optional[str]] = [None] * n
    for token, i in vocab.items():
        if not 0 <= i < n:
            raise FormatError(f"{where}: model.vocab id of {token!r:.60} must be an integer in [0, {n}), got {i!r:.40}")
        if table[i] is not None:
            raise FormatError(f"{where}: model.vocab gives id {i} to both {table[i]!r:.40} and {token!r:.40}")
        table[i] = token
    for t in added:
        i = t["id"]
        if not 0 <= i < n:
            raise FormatError(f"{where}: added token {t['content']!r:.60} has id {i}, outside [0, {n})")
        if table[i] is not None and table[i] != t["content"]:
            raise FormatError(f"{where}: added token {t['content']!r:.60} has id {i}, which model.vocab gives to "
                              f"{table[i]!r:.60}")
        table[i] = t["content"]
    return table   # every slot is filled: n counts the distinct ids, all in range


def _merges(model: dict, vocab: dict, where: str) -> list[tuple[str, str]]:
    """model.merges as (left, right) pairs, each side and their concatenation in the vocab;
    either form tokenizers writes: "a b" strings or ["a", "b"] lists."""
    merges = expect(model.get("merges", []), list, where, "model.merges")
    out = []
    for r, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise FormatError(f"{where}: model.merges[{r}] must be \"a b\" or [\"a\", \"b\"], got {m!r:.80}")
        a, b = pair
        for side in (a, b, a + b):
            if side not in vocab:
                raise FormatError(f"{where}: model.merges[{r}] ({a!r:.40}, {b!r:.40}) names {side!r:.60}, "
                                  "which is not in model.vocab")
        out.append((a, b))
    return out


def _model(top: dict, where: str) -> dict:
    """tokenizer.json's model, checked to be a BPE whose options nt reproduces."""
    model = expect(top.get("model"), dict, where, "model")
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise _unsupported(where, f"model.type {kind!r:.40} is not supported (nt reads BPE tokenizers; not "
                                  "WordPiece, Unigram or WordLevel)")
    if model.get("dropout") is not None:
        raise _unsupported(where, "model.dropout is set: nt encodes deterministically")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _unsupported(where, f"model.{key} {model[key]!r:.20} is not supported")
    expect(model.get("vocab"), dict, where, "model.vocab")
    return model


def _byte_level(model: dict, table: list[str], added: list[dict], pre: dict, normalizer, where: str) -> BPE:
    """nt's BPE of a byte-level tokenizer.json."""
    if _flag(model, "byte_fallback", False, where, "model"):
        raise _unsupported(where, "model.byte_fallback with a ByteLevel pre-tokenizer is not supported")
    decoder = {u: b for b, u in bytes_to_unicode().items()}
    added_ids = {t["id"] for t in added}
    vocab: list[bytes] = []
    for i, token in enumerate(table):
        if i in added_ids:
            vocab.append(token.encode("utf-8"))
        elif all(ch in decoder for ch in token):
            vocab.append(bytes(decoder[ch] for ch in token))
        else:
            raise FormatError(f"{where}: model.vocab token {token!r:.60} (id {i}) is not spelled in ByteLevel's "
                              "byte alphabet")
    ids = {token: i for i, token in enumerate(table) if i not in added_ids}
    pairs = _merges(model, ids, where)
    try:
        return BPE(vocab, [(ids[a], ids[b]) for a, b in pairs], [ids[a + b] for a, b in pairs],
                   {t["content"]: t["id"] for t in added}, pre["pre"], **_token_options(added),
                   add_prefix_space=pre["add_prefix_space"], normalizer=normalizer,
                   ignore_merges=_flag(model, "ignore_merges", False, where, "model"))
    except ValueError as e:
        raise FormatError(f"{where}: not a usable byte-level BPE: {e}") from None


def _sentencepiece(model: dict, table: list[str], added: list[dict], scheme: str, split: bool, strip: bool,
                   normalizer, where: str) -> SentencePieceBPE:
    """nt's SentencePieceBPE of a SentencePiece-style tokenizer.json (merges by rank)."""
    byte_fallback = _flag(model, "byte_fallback", False, where, "model")
    unk = model.get("unk_token")
    added_kind = {t["id"]: (SP_CONTROL if t["special"] else SP_USER_DEFINED) for t in added}
    unk_id = None
    if unk is not None:   # Llama 2's <unk> is an added token too: then it stays one (found in text)
        expect(unk, str, where, "model.unk_token")
        unk_id = next((i for i, token in enumerate(table) if token == unk), None)
        if unk_id is None:
            raise FormatError(f"{where}: model.unk_token {unk!r:.40} is not in model.vocab")
    types = []
    for i, token in enumerate(table):
        if i in added_kind:
            types.append(added_kind[i])
        elif token == unk:
            types.append(SP_UNKNOWN)
        elif byte_fallback and BYTE_TOKEN.fullmatch(token):
            types.append(SP_BYTE)
        else:
            types.append(SP_NORMAL)
    pieces = {token: i for i, token in enumerate(table) if types[i] in (SP_NORMAL, SP_USER_DEFINED)}
    pairs = _merges(model, pieces, where)
    # scores that rank pieces as the merges do, for formats that keep scores (GGUF)
    scores = [-float(len(pairs) + 1)] * len(table)
    for r, (a, b) in reversed(list(enumerate(pairs))):
        scores[pieces[a + b]] = -float(r)
    try:
        return SentencePieceBPE(table, scores, types, unk_id=unk_id, merges=pairs, prefix_scheme=scheme,
                                split_words=split, strip_space=strip, **_token_options(added),
                                normalizer=normalizer, fuse_unk=_flag(model, "fuse_unk", False, where, "model"),
                                ignore_merges=_flag(model, "ignore_merges", False, where, "model"))
    except ValueError as e:
        raise FormatError(f"{where}: not a usable SentencePiece-style BPE: {e}") from None


def tokenizer_from_json(top, where: str) -> Union[BPE, SentencePieceBPE]:
    """nt's tokenizer of a decoded tokenizer.json (`where` names it in errors); no bos/eos
    or chat template (those come from tokenizer_config.json: see from_pretrained)."""
    expect(top, dict, where, "the top level")
    model = _model(top, where)
    normalizer, prepend, replace = _normalizer(top.get("normalizer"), where)
    pre = _pre_tokenizer(top.get("pre_tokenizer"), where, replace)
    added = _added_tokens(top, where, prepend, replace)
    table = _id_table(model["vocab"], added, where)
    if "pre" in pre:
        if prepend or replace:
            raise _unsupported(where, "a '▁' normalizer with a ByteLevel pre-tokenizer is not supported")
        _decoder(top.get("decoder"), True, where)
        return _byte_level(model, table, added, pre, normalizer, where)
    if "metaspace" in pre:
        if prepend or replace:
            raise _unsupported(where, "both a '▁' normalizer and a Metaspace pre-tokenizer: not supported")
        scheme, split = pre["metaspace"], pre["split"]
    elif replace:
        scheme, split = ("piece" if prepend else "never"), False
    else:
        raise _unsupported(where, "a BPE without a ByteLevel pre-tokenizer or SentencePiece's '▁' for spaces "
                                  "(normalizer Replace(' ', '▁') or pre_tokenizer Metaspace) is not supported")
    strip = _decoder(top.get("decoder"), False, where)
    return _sentencepiece(model, table, added, scheme, split, strip, normalizer, where)


# ====================================================================== the folder

def _token_string(value, where: str, field: str) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    if value is None or isinstance(value, str):
        return value
    expect(value, dict, where, field)
    return expect(value.get("content"), str, where, f"{field}.content")


def _token_id(tok, token: str) -> Optional[int]:
    """The id of a token string in nt's tokenizer (special tokens, then ordinary pieces)."""
    if token in tok.special_tokens:
        return tok.special_tokens[token]
    if isinstance(tok, SentencePieceBPE):
        return tok.pieces.get(token)
    spelled = token.encode("utf-8") if not all(ch in _BYTE_DECODER for ch in token) else \
        bytes(_BYTE_DECODER[ch] for ch in token)
    return next((i for i, v in enumerate(tok.vocab) if v == spelled and i not in tok.special_ids), None)


_BYTE_DECODER = {u: b for b, u in bytes_to_unicode().items()}


def _chat_template(folder: Path, config: dict, where: str) -> Optional[str]:
    """The chat template: chat_template.jinja if present (transformers prefers it), else
    tokenizer_config.json's chat_template (a string, or a list of {"name", "template"}
    from which "default" is taken)."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(f"{path}: {size} bytes is more than the {MAX_JSON_BYTES} allowed for a chat template")
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    expect(template, list, where, "chat_template")
    named = {}
    for i, entry in enumerate(template):
        expect(entry, dict, where, f"chat_template[{i}]")
        name = expect(entry.get("name"), str, where, f"chat_template[{i}].name")
        named[name] = expect(entry.get("template"), str, where, f"chat_template[{i}].template")
    return named.get("default")


def from_pretrained(path) -> Union[BPE, SentencePieceBPE]:
    """nt's tokenizer of a Hugging Face folder: tokenizer.json, with tokenizer_config.json
    (bos_token, eos_token, add_bos_token, chat_template) and special_tokens_map.json when
    present. The result carries bos_id, eos_id, add_bos and chat_template, as GGUF
    tokenizers do. add_bos follows transformers: tokenizer_config.json's add_bos_token when
    it sets add_bos_token or add_eos_token (transformers then rebuilds the post-processor),
    else the tokenizer.json post-processor's bos. A missing or malformed file is a
    FormatError and a component nt cannot reproduce a NotImplementedError, naming the file
    and field."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (a Hugging Face tokenizer is a folder with {TOKENIZER})")
    where = str(folder / TOKENIZER)
    top = read_json(folder / TOKENIZER, what="the Hugging Face tokenizer: nt reads tokenizer.json, not vocab files")
    tok = tokenizer_from_json(top, where)
    config = {}
    config_where = str(folder / CONFIG)
    if (folder / CONFIG).exists():
        config = expect(read_json(folder / CONFIG), dict, config_where, "the top level")
    special_map = {}
    if (folder / SPECIAL_MAP).exists():
        special_map = expect(read_json(folder / SPECIAL_MAP), dict, str(folder / SPECIAL_MAP), "the top level")
    names = {}
    for key in ("bos_token", "eos_token"):
        source, source_where = (config, config_where) if key in config else (special_map, str(folder / SPECIAL_MAP))
        names[key] = _token_string(source.get(key), source_where, key)
        if names[key] is not None:
            i = _token_id(tok, names[key])
            if i is None:
                raise FormatError(f"{source_where}: {key} {names[key]!r:.60} is not a token of {TOKENIZER}")
            setattr(tok, key[:3] + "_id", i)
    tok.add_bos = _add_bos(tok, top, config, names["bos_token"], where, config_where)
    if tok.add_bos and tok.bos_id is None:
        tok.add_bos = False
    tok.chat_template = _chat_template(folder, config, config_where)
    return tok


def _add_bos(tok, top: dict, config: dict, bos: Optional[str], where: str, config_where: str) -> bool:
    """Whether encoding for the model starts with bos (see from_pretrained)."""
    post = top.get("post_processor")
    if "add_bos_token" in config or "add_eos_token" in config or post is None:
        if _flag(config, "add_eos_token", False, config_where, "tokenizer_config"):
            raise _unsupported(config_where, "add_eos_token is true: nt's tokenizers add only a bos")
        return _flag(config, "add_bos_token", False, config_where, "tokenizer_config")
    first = _post_processor(post, where)
    if first is None:
        return False
    if bos is not None and first != bos:
        raise _unsupported(where, f"post_processor adds {first!r:.40} before the text, but {config_where} names "
                                  f"bos_token {bos!r:.40}")
    i = _token_id(tok, first)
    if i is None:
        raise FormatError(f"{where}: post_processor adds {first!r:.60}, which is not a token")
    tok.bos_id = i
    return True
