"""How a GGUF load uses the mapped file: each tensor is copied (or dequantised) straight into
the model's own arrays and its mapped pages are released at once, so the load never holds
the file and the model in memory together, and the loaded model does not depend on the
file afterwards (docs/inference.md, "Memory")."""
import os
import re

import numpy as np
import pytest

import nt
from nt.io import gguf
from nt.models import Llama, LlamaConfig

SMAPS = "/proc/self/smaps"


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (Linux)."""
    total, inside = 0, False
    for line in open(SMAPS):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _write(tmp_path, kind: str, tie: bool = False):
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=2048, rope_pairing="interleaved", tie_embeddings=tie)
    src = Llama(cfg, seed=3)
    path = tmp_path / f"m_{kind}.gguf"
    nt.models.gguf.write(path, src, kind)
    return src, path


@pytest.mark.skipif(not os.path.exists(SMAPS), reason="needs /proc/self/smaps")
def test_release_drops_a_tensors_mapped_pages(tmp_path):
    _, path = _write(tmp_path, "F32")
    with gguf.GGUFFile(path) as f:
        name = "token_embd.weight"
        nbytes = f.tensor_infos[name].nbytes
        assert nbytes >= 256 * 1024
        expected = np.frombuffer(f.raw(name), "<f4").copy()             # touches every page
        touched = _mapped_rss_kb(path)
        assert touched >= nbytes // 1024
        f.release(name)
        assert _mapped_rss_kb(path) <= touched - nbytes // 1024 + 8     # at most the edge pages stay
        again = f.dequantize(name)                                      # read again: mapped back in
        assert _mapped_rss_kb(path) <= touched - nbytes // 1024 + 8     # dequantize releases too
        assert np.array_equal(again.reshape(-1), expected)


def test_dequantize_into_out(tmp_path):
    _, path = _write(tmp_path, "Q8_0")
    with gguf.GGUFFile(path) as f:
        name = "blk.0.ffn_up.weight"
        fresh = f.dequantize(name)
        out = np.full((fresh.shape[0] + 2, fresh.shape[1]), -1.0, np.float32)
        assert f.dequantize(name, out[1:-1]) is not None
        assert np.array_equal(out[1:-1], fresh) and (out[0] == -1).all() and (out[-1] == -1).all()
        with pytest.raises(ValueError, match="C-contiguous float32"):
            f.dequantize(name, np.empty(fresh.shape, np.float64))
        with pytest.raises(ValueError, match="C-contiguous float32"):
            f.dequantize(name, np.empty((fresh.shape[1], fresh.shape[0]), np.float32).T)


@pytest.mark.parametrize("kind,tie", [("F32", False), ("Q8_0", True), ("Q4_0", False)])
def test_loaded_model_does_not_depend_on_the_file(tmp_path, kind, tie):
    """The model owns its weights: truncating the file after the load (which would make a
    model that reads a mapping die of SIGBUS) changes nothing, and nothing aliases the map."""
    _, path = _write(tmp_path, kind, tie)
    model = nt.models.from_gguf(path, keep_quantized=True)
    prompt = np.array([1, 5, 9, 200], np.int32)
    want = model.generate(prompt, 6, temperature=0)
    with open(path, "r+b") as fh:
        fh.truncate(0)
    for w in model.qweights.values():
        assert w.flags.writeable   # views of the read-only map are not
    assert np.array_equal(model.generate(prompt, 6, temperature=0), want)
