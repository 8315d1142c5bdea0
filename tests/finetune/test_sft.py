"""Supervised fine-tuning data (nt.sft): JSONL checking with line numbers, ChatML rendering,
targets only on the assistant's tokens, padding that changes nothing, resumable batches,
a steady step through the training loop allocating nothing, and the demo's assistant
loss falling in a short seeded run."""
import json

import numpy as np
import pytest

from helpers import measure_step_allocations
from nt.lora import LoRA
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW, clip_factor
from nt.sft import Chat, ChatBatches, chatml, demo_chats, encode_chat, encode_chats, first_sentence, read_chats
from nt.tokenizer import BPE, CHAT_TOKENS, ENDOFTEXT
from nt.train_utils import accumulate_grads, lm_loss

MODULES = ("json", "textwrap", "string", "shlex")


@pytest.fixture(scope="module")
def demo():
    return demo_chats(MODULES)


@pytest.fixture(scope="module")
def tok(demo):
    text = "".join(chatml(c["messages"]) for c in demo)
    return BPE.train(text, 512, special_tokens=(ENDOFTEXT, *CHAT_TOKENS))


def chat(*turns):
    return Chat(7, [{"role": r, "content": c} for r, c in turns])


def test_only_the_assistants_tokens_are_targets(tok):
    c = chat(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello there."), ("user", "And?"),
             ("assistant", "Bye."), ("user", "Trailing question"))
    row = encode_chat(c, tok, 256)
    assert tok.decode(row.ids) == chatml(c.messages)
    counted = [int(i) for i, t in zip(row.ids[1:], row.targets) if t >= 0]
    assert tok.decode(counted) == "Hello there.<|im_end|>\nBye.<|im_end|>\n"
    np.testing.assert_array_equal(row.targets[row.targets >= 0], counted)
    assert tok.special_tokens["<|im_end|>"] in counted and tok.special_tokens["<|im_start|>"] not in counted


def test_chat_tokens_are_plain_text_for_a_tokenizer_without_them(demo):
    plain = BPE.train("".join(chatml(c["messages"]) for c in demo[:50]), 300)
    row = encode_chat(chat(("user", "Q"), ("assistant", "A.")), plain, 256)
    counted = [int(i) for i, t in zip(row.ids[1:], row.targets) if t >= 0]
    assert plain.decode(counted) == "A.<|im_end|>\n"


CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_JINJA = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_the_tokenizers_jinja_template_is_used(tok, demo):
    c = chat(("system", "S."), ("user", "Q?"), ("assistant", " A. "))
    tok.chat_template = CHATML_JINJA
    try:
        jinja = encode_chat(c, tok, 256)
    finally:
        tok.chat_template = None
    plain = encode_chat(c, tok, 256)
    np.testing.assert_array_equal(jinja.ids, plain.ids)
    np.testing.assert_array_equal(jinja.targets, plain.targets)

    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    llama = BPE.train("".join(chatml(d["messages"]) for d in demo), 400, special_tokens=specials)
    llama.chat_template, llama.bos_id, llama.add_bos = LLAMA3_JINJA, llama.special_tokens[specials[0]], True
    row = encode_chat(c, llama, 256)
    assert row.ids[0] == llama.bos_id and list(row.ids).count(llama.bos_id) == 1
    counted = [int(i) for i, t in zip(row.ids[1:], row.targets) if t >= 0]
    assert llama.decode(counted) == "A.<|eot_id|>"

    llama.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"   # a count first
    with pytest.raises(ValueError, match="line 7: the chat template does not render a conversation as a prefix"):
        encode_chat(c, llama, 256)


def test_prompt_side_changes_change_nothing_in_the_loss(tok):
    """The loss is the mean cross-entropy over the assistant's tokens alone: the prompt
    positions' would-be targets, a user turn after the last answer and the padding
    (inputs and rows) do not move it."""
    model = GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size, block_size=96), seed=0)
    base = chat(("user", "What does `a.b` do?"), ("assistant", "It does c."), ("user", "more"))
    other = chat(("user", "What does `a.b` do?"), ("assistant", "It does c."), ("user", "something else entirely"))
    loss = []
    for c, pad in ((base, 0), (other, 7)):
        row = encode_chat(c, tok, 95)
        x = np.full((1, 95), pad, dtype=np.int32)
        y = np.full((1, 95), -1, dtype=np.int32)
        n = len(row.targets)
        x[0, :n], y[0, :n] = row.ids[:-1], row.targets
        logits, value = model(x, y)
        # NumPy reference over the positions whose target is the assistant's
        V = tok.vocab_size
        z = logits[0, :, :V].astype(np.float64)
        logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        keep = np.flatnonzero(y[0] >= 0)
        assert value == pytest.approx(-logp[keep, y[0, keep]].mean(), rel=1e-5)
        loss.append(value)
    assert loss[0] == loss[1]


@pytest.mark.parametrize("line,error", [
    ('{"message": []}', "expected an object with a 'messages' list"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user"}]}', "must be an object with 'role' and 'content'"),
    ('{"messages": ', "not valid JSON"),
])
def test_bad_lines_are_named(tmp_path, line, error):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"chats.jsonl:3: .*{error}"):
        read_chats(path)


def test_a_conversation_longer_than_T_is_named(tok):
    with pytest.raises(ValueError, match="line 7: the conversation is .* tokens, more than T \\+ 1 = 9"):
        encode_chat(chat(("user", "a long question " * 5), ("assistant", "an answer")), tok, 8)


def test_first_sentence_keeps_prose_only():
    assert first_sentence("Return the thing asked for. Then more.\n\nMore text.") == "Return the thing asked for."
    assert first_sentence("split(sep) -> list of words.") is None
    assert first_sentence("lowercase start of a sentence.") is None


def rows_and_batches(tok, demo, B=4, T=128, **kw):
    rows = encode_chats([Chat(n, c["messages"]) for n, c in enumerate(demo, 1)], tok, T)
    return rows, ChatBatches(rows, B, T, **kw)


def test_batches_resume_and_pad(tok, demo):
    rows, src = rows_and_batches(tok, demo, seed=3)
    for _ in range(5):
        src.next_batch()
    state = json.loads(json.dumps(src.state()))
    expected = [tuple(a.copy() for a in src.next_batch()) for _ in range(2 * src.batches_per_epoch)]
    _, again = rows_and_batches(tok, demo, seed=3)
    again.set_state(state)
    for x, y in expected:
        nx, ny = again.next_batch()
        np.testing.assert_array_equal(nx, x)
        np.testing.assert_array_equal(ny, y)
    row = rows[0]
    n = len(row.targets)
    assert (src.targets[0, n:] == -1).all() and (src.inputs[0, n:] == 0).all()
    with pytest.raises(ValueError, match="n_rows"):
        ChatBatches(rows[:-1], 4, 128).set_state(state)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ChatBatches(rows[:3], 4, 128)


def test_lora_step_through_the_loop_allocates_nothing(tok, demo, monkeypatch):
    _, src = rows_and_batches(tok, demo, B=2)
    model = GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size, block_size=128), seed=0)
    lora = LoRA(model, 4, 8, ["qkv", "o", "fc", "proj"])
    opt = AdamW(lora.params, lr=1e-3)

    def step():
        loss = accumulate_grads(model, src.next_batch, 2, loss_fn=lm_loss)
        _, clip = clip_factor(lora.params, 1.0)
        opt.step(lr=1e-3, grad_scale=clip, loss=loss)
    step()
    step()
    grows = model.tape.acts.grows
    array_args, nrt_allocs, _ = measure_step_allocations(monkeypatch, model.tape.k, step)
    assert model.tape.acts.grows == grows
    assert nrt_allocs == array_args, "a kernel allocated memory in a steady step of the loop"


def test_demo_assistant_loss_falls(tok, demo):
    """A 40-step seeded run of a tiny GPT-2 (fresh, every parameter trained) on demo chats:
    the assistant-token loss falls from 6.12 (uniform over 512 tokens: 6.24) to 4.53 over
    the last 5 steps (measured); asserted: by more than 1.2 nats."""
    rows, src = rows_and_batches(tok, demo, B=8, seed=0)
    model = GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size, block_size=128), seed=0)
    model.unfreeze()
    opt = AdamW(model.params, lr=1e-2)
    losses = []
    for _ in range(40):
        losses.append(accumulate_grads(model, src.next_batch))
        opt.step()
    first, last = losses[0], float(np.mean(losses[-5:]))
    assert first > 6.0 and first - last > 1.2, (first, last)
