"""`python -m nt export`: a tiny training run (train/train_gpt2.py, train/train_llama.py) out
to GGUF and to a Hugging Face folder with its tokenizer, loaded back, generating; and the
command's errors, which leave nothing on disk."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nt.__main__ import main
from nt import bitnet
from nt.io import latest_checkpoint, load_model
from nt.models import from_gguf, from_pretrained
from nt.tokenizer import BPE

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The quick brown fox", "it's 2026, naïve café", "<|endoftext|> and more"]


def _train(script: str, preset: str, out: Path, text: Path) -> Path:
    spec = importlib.util.spec_from_file_location(script, ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", preset, "--data", str(text), "--vocab-size", "300", "-B", "2", "-T", "16",
                 "--steps", "2", "--eval-every", "0", "--sample-tokens", "0", "--checkpoint-every", "2",
                 "--out-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"gpt2": run folder, "llama": run folder}, each two steps of a tiny model with a BPE."""
    from nt.data import builtin_corpus_text
    base = tmp_path_factory.mktemp("runs")
    text = base / "data.txt"
    text.write_text(builtin_corpus_text()[:20_000])
    return {"gpt2": _train("train_gpt2", "tiny", base / "gpt2", text),
            "llama": _train("train_llama", "llama-tiny", base / "llama", text)}


def _logits(model, idx):
    return model(idx)[0][..., :model.config.vocab_size].copy()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,tol", [("F32", 1e-6), ("Q8_0", 3e-2)])
def test_export_run_to_gguf(runs, tmp_path, capsys, kind, dtype, tol):
    run = runs[kind]
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), str(out), "--type", dtype]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ref_model = load_model(run / "step_00000002")
    model = from_gguf(out)
    tok, ref_tok = model.tokenizer, BPE.load(run / "tokenizer")
    for s in TEXTS:
        assert tok.encode(s, allowed_special="all") == ref_tok.encode(s, allowed_special="all")
    idx = np.asarray([ref_tok.encode(TEXTS[0])], dtype=np.int32)
    ref = _logits(ref_model, idx)
    assert np.abs(_logits(model, idx) - ref).max() <= tol * np.abs(ref).max()
    ids = model.generate(idx[0], max_new_tokens=5, temperature=0.0)
    assert len(ids) == idx.shape[1] + 5 and tok.decode(ids).startswith(TEXTS[0])


def test_export_checkpoint_folder_and_cli(runs, tmp_path):
    """A checkpoint folder exports with its run's tokenizer; the command works as a process,
    and `python -m nt complete` runs the file it wrote."""
    out = tmp_path / "c.gguf"
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nt", "export", str(runs["gpt2"] / "step_00000002"), str(out),
                           "--type", "F16"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert from_gguf(out).tokenizer.vocab_size == BPE.load(runs["gpt2"] / "tokenizer").vocab_size
    done = subprocess.run([sys.executable, "-m", "nt", "complete", str(out), "--prompt", "The", "--max-new-tokens",
                           "4", "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def test_export_run_to_hf_folder(runs, tmp_path, capsys):
    run, out = runs["llama"], tmp_path / "hf"
    assert main(["export", str(run), str(out), "--to", "hf"]) == 0
    assert (out / "config.json").exists() and (out / "vocab.json").exists() and (out / "merges.txt").exists()
    ref_tok = BPE.load(run / "tokenizer")
    assert BPE.load(out).encode(TEXTS[1]) == ref_tok.encode(TEXTS[1])
    idx = np.asarray([ref_tok.encode(TEXTS[0])], dtype=np.int32)
    np.testing.assert_allclose(_logits(from_pretrained(out), idx), _logits(load_model(run / "step_00000002"), idx),
                               rtol=0, atol=1e-6)


def test_run_without_tokenizer_exports_token_ids(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["gpt2"], run)
    shutil.rmtree(run / "tokenizer")
    assert main(["export", str(run), str(tmp_path / "m.gguf")]) == 0
    assert "no tokenizer folder" in capsys.readouterr().out
    model = from_gguf(tmp_path / "m.gguf")
    assert model.tokenizer is None and model.config.vocab_size == BPE.load(runs["gpt2"] / "tokenizer").vocab_size


def test_errors_are_clear_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "missing"), str(out)]) == 1
    assert "no such run or checkpoint folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(runs["gpt2"]), str(tmp_path / "no" / "m.gguf")]) == 1
    assert "no such folder to write m.gguf in" in capsys.readouterr().err
    assert main(["export", str(runs["gpt2"]), str(tmp_path / "empty")]) == 1
    assert "is a folder; --to gguf writes a file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "empty"), str(out)]) == 1
    assert "no checkpoint here" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(runs["gpt2"], broken)
    (broken / "latest").write_text("step_00000099\n")
    assert main(["export", str(broken), str(out)]) == 1
    assert "step_00000099, which does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(runs["gpt2"]), str(out), "--type", "Q5_K"])
    assert e.value.code == 2 and "invalid choice: 'Q5_K'" in capsys.readouterr().err
    # a tokenizer folder that does not fit the model fails after loading, before writing
    shutil.rmtree(broken / "tokenizer")
    (broken / "latest").write_text("step_00000002\n")
    specials = {f"<{i}>": 256 + i for i in range(400)}
    BPE([bytes([b]) for b in range(256)] + [s.encode() for s in specials], [], [], specials).save(broken / "tokenizer")
    assert main(["export", str(broken), str(out)]) == 1
    assert "656 tokens" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty"]


def test_export_bitnet_run_defaults_to_tq2_0(tmp_path, capsys):
    """A BitNet run exports as TQ2_0 without --type (its projections are ternary; Q8_0, the
    default for other models, is refused for them) and loads back as the packed model."""
    from nt.data import builtin_corpus_text
    text = tmp_path / "data.txt"
    text.write_text(builtin_corpus_text()[:20_000])
    spec = importlib.util.spec_from_file_location("train_llama", ROOT / "train" / "train_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", "llama-mini", "--bitnet", "--data", str(text), "--vocab-size", "300", "-B", "1",
                 "-T", "16", "--steps", "1", "--eval-every", "0", "--sample-tokens", "0",
                 "--checkpoint-every", "1", "--out-dir", str(tmp_path / "run")])
    out = tmp_path / "bitnet.gguf"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert "TQ2_0 GGUF" in capsys.readouterr().out
    packed, loaded = bitnet.pack(load_model(latest_checkpoint(tmp_path / "run"))), from_gguf(out)
    idx = np.arange(8, dtype=np.int32)[None] % packed.config.vocab_size
    np.testing.assert_array_equal(_logits(loaded, idx), _logits(packed, idx))   # both on float16 row scales
