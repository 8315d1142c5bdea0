"""DPO end to end: preference files (text and chat messages) and their errors, the batch
layout, the reference (LoRA base / frozen copy), the loss through a model against NumPy,
a seeded run that learns the synthetic preferences, exact resume, --help."""
import json
import shutil

import numpy as np
import pytest

from nt import align
from nt.lora import LoRA
from nt.models import GPT2, GPT2Config
from nt.sft import chatml
from nt.tokenizer import ByteTokenizer
from helpers import load_script

TOK = ByteTokenizer()


def load_train_script(name):
    return load_script(f"train/{name}.py", f"align_{name}")


def write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_model(seed=0):
    return GPT2(GPT2Config.preset("tiny", vocab_size=256, block_size=48), dtype=np.float64, seed=seed)


def test_read_preferences_text_and_messages(tmp_path):
    user = [{"role": "user", "content": "hi?"}]
    path = write(tmp_path, [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
                            {"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}],
                             "rejected": [{"role": "assistant", "content": "go away"}]},
                            {"prompt": user, "chosen": "yes", "rejected": "no"}])
    pairs = align.read_preferences(path, TOK, 200)
    assert [TOK.decode(p.prompt) for p in pairs[:2]] == ["Q: 1+1?", chatml(user, True)]
    assert TOK.decode(pairs[0].chosen) == " 2" and TOK.decode(pairs[0].rejected) == " 3"
    # an assistant message is its content and the template's end of turn, as rendered after the prompt
    assert TOK.decode(pairs[1].chosen) == "hello<|im_end|>\n"
    assert TOK.decode(pairs[2].chosen) == "yes" and [p.line for p in pairs] == [1, 2, 3]


@pytest.mark.parametrize("record, match", [
    ({"chosen": "a", "rejected": "b"}, "line 2: missing field 'prompt'"),
    ({"prompt": "p", "rejected": "b"}, "line 2: missing field 'chosen'"),
    ({"prompt": "p", "chosen": "a"}, "line 2: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "line 2: 'chosen' is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "line 2: 'prompt' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "line 2: 'chosen' must be text or"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "line 2: 'chosen' messages must all be the assistant's"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "b"},
     "line 2: 'chosen' is messages, so 'prompt' must be messages too"),
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ({"prompt": "p" * 70, "chosen": "a", "rejected": "b"}, "line 2: the prompt has 70 tokens"),
])
def test_bad_preference_records_name_their_line(tmp_path, record, match):
    path = write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(align.BadRecord, match=match):
        align.read_preferences(path, TOK, 64)


def test_empty_file_and_long_responses(tmp_path):
    with pytest.raises(align.BadRecord, match="no records"):
        align.read_preferences(write(tmp_path, ["", " "]), TOK, 64)
    pairs = align.read_preferences(write(tmp_path, [{"prompt": "abc", "chosen": "x" * 20, "rejected": "y"}]), TOK, 10)
    assert len(pairs[0].chosen) == 7    # cut to fit 10 tokens with the prompt


def test_pair_batch_layout():
    pairs = [align.PreferencePair(np.array([1, 2, 3]), np.array([4, 5]), np.array([6]), 1),
             align.PreferencePair(np.array([7]), np.array([8, 9, 10]), np.array([11, 12]), 2)]
    idx, targets = align.pair_batch(pairs)
    assert idx.shape == targets.shape == (4, 4)   # the longest row: 3 + 2 tokens, shifted
    np.testing.assert_array_equal(idx[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(targets[0], [-1, -1, 4, 5])
    np.testing.assert_array_equal(targets[1], [8, 9, 10, -1])
    np.testing.assert_array_equal(targets[2], [-1, -1, 6, -1])     # rejected rows follow the chosen ones
    np.testing.assert_array_equal(targets[3], [11, 12, -1, -1])


def pair_rows():
    """The (idx, targets) of 3 synthetic pairs."""
    records = align.synthetic_preferences(3, seed=0)
    fields = ("prompt", "chosen", "rejected")
    return align.pair_batch([align.PreferencePair(*(align.encode(TOK, r[k]) for k in fields), i)
                             for i, r in enumerate(records)])


def test_lora_reference_is_the_untouched_base():
    """With adapters attached and trained away from zero, the reference log-probs (adapters
    switched off) equal those of the base model before LoRA existed, exactly."""
    idx, targets = pair_rows()
    model = tiny_model()
    base = align.inference_logprobs(model, idx, targets)
    lora = LoRA(model, 4, 8.0, ["qkv", "fc"], seed=1)
    lora.params.load_flat(np.random.default_rng(2).standard_normal(lora.params.numel) * 0.1)
    adapted = align.inference_logprobs(model, idx, targets)
    assert np.abs(adapted - base).max() > 1e-3        # the adapters change the policy
    np.testing.assert_array_equal(align.Reference(model, lora=lora).token_logprobs(idx, targets), base)
    assert lora.enabled    # switched back on after the reference pass


def test_frozen_copy_reference_keeps_the_start():
    idx, targets = pair_rows()
    model = tiny_model()
    reference = align.Reference(model, frozen_copy=align.frozen_copy(model))
    start = align.inference_logprobs(model, idx, targets)
    model.params.load_flat(model.params.to_flat() * 1.1)
    np.testing.assert_array_equal(reference.token_logprobs(idx, targets), start)
    assert reference.copy.params.size == 0     # frozen: no grads, no optimizer state


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_through_the_model_matches_numpy(loss_type, smoothing):
    """DPOLoss = nt.align.dpo_loss on the policy's and reference's summed (IPO: averaged)
    log-probs, and its gradient matches a finite difference along a random direction."""
    idx, targets = pair_rows()
    model = tiny_model()
    reference = align.Reference(model, frozen_copy=align.frozen_copy(tiny_model(seed=5)))
    loss_fn = align.DPOLoss(reference, 0.5, smoothing, loss_type)
    counts = (targets >= 0).sum(1)

    def value():
        pol = align.inference_logprobs(model, idx, targets).sum(1)
        ref = reference.token_logprobs(idx, targets).sum(1)
        if loss_type == "ipo":
            pol, ref = pol / counts, ref / counts
        B = len(pol) // 2
        return align.dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], 0.5, smoothing, loss_type)[0].mean()

    model.zero_grad()
    loss = loss_fn(model, (idx, targets))
    got = float(loss.numpy()[0])
    model.tape.backward(loss)
    grad = model.params.grad.copy()
    np.testing.assert_allclose(got, value(), rtol=1e-12)
    direction = np.random.default_rng(3).standard_normal(grad.size)
    start, h = model.params.to_flat(), 1e-6
    model.params.load_flat(start + h * direction)
    plus = value()
    model.params.load_flat(start - h * direction)
    minus = value()
    model.params.load_flat(start)
    np.testing.assert_allclose(grad @ direction, (plus - minus) / (2 * h), rtol=1e-5)


def test_dpo_help_documents_every_flag():
    parser = load_train_script("dpo").parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags", [[], ["--full", "--lr", "1e-3"]], ids=["lora", "full"])
def test_dpo_run_learns_the_synthetic_preferences(tmp_path, flags):
    """A seeded 10-step run on the synthetic set (LoRA, and full weights): reward accuracy
    from chance to above 0.9 on the training batches and on the held-out pairs."""
    load_train_script("dpo").main(["--out-dir", str(tmp_path), "--steps", "10", "--eval-every", "10"] + flags)
    entries = metrics(tmp_path)
    train = [e for e in entries if "rewards/accuracies" in e]
    evals = [e for e in entries if "eval/rewards/accuracies" in e]
    assert len(train) == 10 and train[0]["rewards/accuracies"] < 0.7 and evals[0]["eval/rewards/accuracies"] < 0.7
    assert train[-1]["rewards/accuracies"] > 0.9 and evals[-1]["eval/rewards/accuracies"] > 0.9
    assert train[-1]["rewards/margins"] > 0 and train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "log.jsonl").exists() and (tmp_path / "base" / "state.json").exists()


@pytest.mark.parametrize("flags", [[], ["--full"], ["--loss-type", "ipo", "--label-smoothing", "0"]],
                         ids=["lora", "full", "ipo"])
def test_dpo_resumes_exactly(tmp_path, flags):
    """Stopping at step 3 and resuming gives the same metrics, bit for bit, as 5 steps in one go."""
    dpo = load_train_script("dpo")
    flags = ["--steps", "5", "--eval-every", "0", "--checkpoint-every", "3", "--keep-last", "0"] + flags
    dpo.main(["--out-dir", str(tmp_path / "a")] + flags)
    whole = metrics(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    dpo.main(["--out-dir", str(tmp_path / "b"), "--resume", "latest"] + flags)
    assert metrics(tmp_path / "b") == whole    # nothing left to do: the log is kept
    shutil.rmtree(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    dpo.main(["--out-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "step_00000003")] + flags)
    assert metrics(tmp_path / "b") == whole


def test_dpo_script_reports_a_bad_record(tmp_path, capsys):
    path = write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(SystemExit, match="line 2: missing field 'rejected'"):
        load_train_script("dpo").main(["--data", str(path), "--out-dir", str(tmp_path / "run"), "--steps", "1"])
