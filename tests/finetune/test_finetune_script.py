"""train/finetune.py end to end on tiny GPT-2 and Llama bases: LoRA adapters written and
loadable, a stopped-and-resumed run logging the same losses bit for bit (Llama with LoRA
dropout, so the tape's RNG counter must come back), checkpoints holding the adapters and
not the base, --merge and --full outputs, and bad input refused before anything is written."""
import json
import shutil

import numpy as np
import pytest

from nt.io import FormatError, load_model, save_run_checkpoint
from nt.lora import LoRA
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.sft import chatml, demo_chats
from nt.tokenizer import BPE, CHAT_TOKENS, ENDOFTEXT
from helpers import load_script

MODULES = ("json", "textwrap", "string", "shlex")
IDX = np.arange(32, dtype=np.int32).reshape(2, 16)


def script(name):
    return load_script(f"train/{name}.py", name)


@pytest.fixture(scope="module")
def finetune():
    return script("finetune")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in demo_chats(MODULES)))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory, chats):
    """Run folders of a tiny GPT-2 and a tiny Llama (random weights) with a 512-token BPE."""
    text = "".join(chatml(json.loads(line)["messages"]) for line in chats.read_text().splitlines())
    tok = BPE.train(text, 512, special_tokens=(ENDOFTEXT, *CHAT_TOKENS))
    out = {}
    for name, model in (("gpt2", GPT2(GPT2Config.preset("tiny", vocab_size=512, block_size=128), seed=1)),
                        ("llama", Llama(LlamaConfig.preset("llama-tiny", vocab_size=512, block_size=128), seed=1))):
        run = tmp_path_factory.mktemp(name)
        save_run_checkpoint(run, 10, model)
        tok.save(run / "tokenizer")
        out[name] = run
    return out


def common(base, chats, steps=4):
    return ["--base", str(base), "--data", str(chats), "-B", "2", "-T", "128", "--steps", str(steps),
            "--eval-every", "2", "--eval-batches", "1", "--val-fraction", "0.25", "--warmup", "1", "--lr", "1e-2", "--sample-tokens", "3",
            "--lora-rank", "4"]


def log_of(out):
    return [{k: v for k, v in json.loads(line).items() if k != "ms"} for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch,flags", [("gpt2", []), ("llama", ["--lora-dropout", "0.1", "--lora-targets", "q,v,down"])])
def test_lora_run_resumes_exactly_and_writes_adapters(finetune, bases, chats, tmp_path, arch, flags):
    args = common(bases[arch], chats) + flags
    full, part = tmp_path / "full", tmp_path / "part"
    finetune.main(args + ["--out-dir", str(full)])
    finetune.main(args + ["--out-dir", str(part), "--checkpoint-every", "2", "--keep-last", "0"])
    step2 = part / "step_00000002"
    assert sorted(p.name for p in step2.iterdir()) == ["config.json", "optimizer.safetensors", "state.json",
                                                       "trainable.safetensors"]
    assert json.loads((step2 / "state.json").read_text())["extra"]["finetune"]["base"].endswith("step_00000010")
    with pytest.raises(FormatError, match="holds only a run's trainable parameters"):
        load_model(step2)
    shutil.rmtree(part / "step_00000004")
    shutil.rmtree(part / "adapter")
    (part / "latest").write_text("step_00000002\n")
    finetune.main(["--out-dir", str(part), "--resume", "latest"] + args[2:])   # the base comes from the checkpoint
    assert log_of(part) == log_of(full)
    assert [e["step"] for e in log_of(full)] == [0, 1, 2, 2, 3, 4, 4]
    assert log_of(full)[-1]["val_loss"] < log_of(full)[0]["val_loss"]

    base = load_model(bases[arch] / "step_00000010")
    before = base.params.to_flat()
    lora = LoRA.load(full / "adapter", base)
    assert list(lora.targets) == (["qkv", "o", "fc", "proj"] if arch == "gpt2" else ["q", "v", "down"])
    assert np.abs(lora.params.to_flat()).max() > 0
    np.testing.assert_array_equal(base.params.to_flat(), before)


def test_merge_writes_the_model_the_adapters_make(finetune, bases, chats, tmp_path):
    args = common(bases["gpt2"], chats, steps=2)
    finetune.main(args + ["--out-dir", str(tmp_path / "merged"), "--merge"])
    finetune.main(args + ["--out-dir", str(tmp_path / "adapted")])
    assert not (tmp_path / "merged" / "adapter").exists()
    assert (tmp_path / "merged" / "tokenizer" / "merges.txt").exists()
    merged = load_model(tmp_path / "merged" / "model")
    adapted = load_model(bases["gpt2"] / "step_00000010")
    base_logits = adapted(IDX)[0].copy()
    LoRA.load(tmp_path / "adapted" / "adapter", adapted)
    want = adapted(IDX)[0]
    np.testing.assert_allclose(merged(IDX)[0], want, atol=1e-5)
    assert np.abs(want - base_logits).max() > 1e-4   # the adapters changed the model


def test_full_finetune_keeps_frozen_parameters(finetune, bases, chats, tmp_path):
    finetune.main(common(bases["llama"], chats, steps=2)[:-2] + ["--full", "--freeze", "wte", "--out-dir", str(tmp_path)])
    tuned = load_model(tmp_path / "model").params
    base = load_model(bases["llama"] / "step_00000010").params
    np.testing.assert_array_equal(tuned["wte"].numpy(), base["wte"].numpy())
    assert not np.array_equal(tuned["down"].numpy(), base["down"].numpy())


@pytest.mark.parametrize("flags,error", [
    (["--lora-targets", "q,nope"], "match no layer"),
    (["--lora-rank", "0"], "rank must be a positive integer"),
    (["--full", "--freeze", "wte"], "--full and --lora-rank exclude each other"),
    (["-T", "9999"], "exceeds the model's block_size"),
    (["-T", "16"], "line 1: the conversation is .* tokens, more than T \\+ 1 = 17"),
])
def test_bad_requests_are_refused_before_writing(finetune, bases, chats, tmp_path, flags, error):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=error):
        finetune.main(common(bases["gpt2"], chats) + flags + ["--out-dir", str(out)])
    assert not out.exists()


def test_bad_chat_line_is_named(finetune, bases, chats, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: message 0 has unknown role 'robot'"):
        finetune.main(common(bases["gpt2"], bad) + ["--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_help_documents_every_flag(finetune):
    missing = [a.option_strings for a in finetune.parser()._actions if a.option_strings and not a.help]
    assert missing == []
