"""Checkpoints: exact resume (bit-identical losses), atomic saves that survive a writer
killed mid-save, and clear errors for incomplete or mismatched checkpoints."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nt.data import DataLoader
from nt.io import (FormatError, checkpoint, latest_checkpoint, load_checkpoint, load_model, save_checkpoint,
                   save_run_checkpoint, save_safetensors)
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW, CosineSchedule, clip_grad_norm

TOKENS = (np.arange(3000) * 7919 % 97).astype(np.uint16)


def setup(seed=0):
    model = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=seed)
    opt = AdamW(model.params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = CosineSchedule(3e-3, warmup=2, total=6)
    loader = DataLoader(TOKENS, B=2, T=16, shuffle=True, seed=5)
    return model, opt, sched, loader


def run(model, opt, sched, loader, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = loader.next_batch()
        _, loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        clip_grad_norm(model.params, 1.0)
        opt.step(sched(step))
        losses.append(float(loss.numpy()[0]))
    return losses


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path):
    full = run(*setup(), 0, 6)
    model, opt, sched, loader = setup()
    first = run(model, opt, sched, loader, 0, 3)
    rng = np.random.default_rng(11)
    rng.random(5)
    save_run_checkpoint(tmp_path, 3, model, opt, schedule=sched, loaders={"train": loader}, rngs={"sample": rng},
                        extra={"note": "hi"})
    del model, opt, loader
    model, opt, sched, loader = setup(seed=123)  # different init: everything must come from the checkpoint
    rng2 = np.random.default_rng(0)
    ck = load_checkpoint(latest_checkpoint(tmp_path), model, opt, schedule=sched, loaders={"train": loader},
                         rngs={"sample": rng2})
    assert ck.step == 3 and ck.extra == {"note": "hi"} and opt.step_count == 3
    assert rng2.random() == rng.random()
    second = run(model, opt, sched, loader, ck.step, 6)
    assert first + second == full  # exact float equality


def test_checkpoint_layout_and_model_rebuild(tmp_path):
    model, opt, *_ = setup()
    path = save_checkpoint(tmp_path / "ck", model, opt, step=7)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    st_numpy = pytest.importorskip("safetensors.numpy")
    weights = st_numpy.load_file(str(path / "model.safetensors"))
    assert weights["qkvw"].shape == (2, 3 * 64, 64) and np.array_equal(weights["wte"], model.params["wte"].numpy())
    again = load_model(path)
    assert again.config == model.config and np.array_equal(again.params.flat, model.params.flat)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_mismatch_and_incomplete_errors(tmp_path):
    model, opt, *_ = setup()
    path = save_checkpoint(tmp_path / "ck", model, opt)
    other = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=32))
    with pytest.raises(FormatError, match="wpe"):
        load_checkpoint(path, other)
    os.remove(path / "state.json")
    with pytest.raises(FormatError, match="state.json: missing"):
        load_checkpoint(path, model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model)


WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from nt.io import checkpoint
    from nt.models import GPT2, GPT2Config
    from nt.optim import AdamW
    out, kill_after = sys.argv[1], int(sys.argv[2])
    model = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=0)
    opt = AdamW(model.params)
    checkpoint.save_run_checkpoint(out, 1, model, opt)          # the last good checkpoint
    model.params.flat[:] += 1.0
    written = []
    def hook(path):
        written.append(path)
        if len(written) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._after_file = hook
    checkpoint.save_run_checkpoint(out, 2, model, opt)
""")


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_writer_killed_mid_save_leaves_last_good_checkpoint(tmp_path, kill_after):
    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(kill_after)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    ck = load_checkpoint(latest)
    assert ck.step == 1
    fresh = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=0)
    assert np.array_equal(ck.model.params.flat, fresh.params.flat)
    assert not (tmp_path / "step_00000002").exists()
    # the next save cleans the crashed writer's temporary folder up
    save_run_checkpoint(tmp_path, 3, ck.model, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


# ---------------------------------------------------------------------- hostile folders

@pytest.fixture
def saved(tmp_path):
    model, opt, sched, loader = setup()
    path = save_checkpoint(tmp_path / "ck", model, opt, step=4, schedule=sched, loaders={"train": loader})
    return path, model


def edit_json(path, edit):
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj)))


@pytest.mark.parametrize("content,message", [
    (b"[]", "top level must be dict"),
    (b'"state"', "top level must be dict"),
    (b'{"format": "nt-checkpoint", "version": 1, "step": "\xff"}', "UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (b'{"format": "nt-checkpoint", "format": "nt-checkpoint"}', "duplicate key"),
])
def test_state_json_that_is_not_an_object(saved, content, message):
    path, model = saved
    (path / "state.json").write_bytes(content)
    with pytest.raises(FormatError, match=message) as info:
        load_checkpoint(path, model)
    assert "state.json" in str(info.value)


@pytest.mark.parametrize("edit,message", [
    (lambda s: {**s, "step": "4"}, "step must be int"),
    (lambda s: {**s, "step": True}, "step must be int"),
    (lambda s: {**s, "step": 4.0}, "step must be int"),
    (lambda s: {**s, "step": -1}, "step must be >= 0"),
    (lambda s: {**s, "data": []}, "data must be dict"),
    (lambda s: {**s, "data": {"train": 3}}, "data\\['train'\\] must be dict"),
    (lambda s: {**s, "extra": None}, "extra must be dict"),
    (lambda s: {**s, "tape": {"k": 1}}, "not a tape setting"),
    (lambda s: {**s, "tape": {"seed": "1"}}, "tape\\['seed'\\] must be int"),
    (lambda s: {**s, "surprise": 1}, "unknown key 'surprise'"),
    (lambda s: {k: v for k, v in s.items() if k != "rng"}, "'rng' is missing"),
])
def test_state_json_fields_are_typed(saved, edit, message):
    path, model = saved
    edit_json(path / "state.json", edit)
    with pytest.raises(FormatError, match=message):
        load_checkpoint(path, model)


def test_saved_state_that_does_not_fit_its_object_is_a_format_error(saved):
    path, model = saved
    _, opt, sched, loader = setup()
    good = (path / "state.json").read_text()
    for edit, kwargs, message in [
        (lambda s: {**s, "data": {"train": {"epoch": 0}}}, {"loaders": {"train": loader}}, "data loader 'train'"),
        (lambda s: {**s, "data": {"train": {"epoch": 0, "position": "x"}}}, {"loaders": {"train": loader}}, "loader"),
        (lambda s: {**s, "rng": {"r": {"bit_generator": "nope"}}}, {"rngs": {"r": np.random.default_rng()}}, "RNG 'r'"),
        (lambda s: {**s, "schedule": {"type": "CosineSchedule"}}, {"schedule": sched}, "schedule"),
        (lambda s: {**s, "optimizer": {**s["optimizer"], "m": {"__tensor__": ["m"]}}}, {"optimizer": opt},
         "__tensor__ reference must be str"),
        (lambda s: {**s, "optimizer": {**s["optimizer"], "m": {"__tensor__": "v"}, "v": {"__tensor__": "m"},
                                       "step_count": "x"}}, {"optimizer": opt}, "optimizer state"),
    ]:
        (path / "state.json").write_text(good)
        edit_json(path / "state.json", edit)
        with pytest.raises(FormatError, match=message):
            load_checkpoint(path, model, **kwargs)


def test_missing_files_inside_the_folder_are_format_errors(saved):
    path, model = saved
    _, opt, *_ = setup()
    os.remove(path / "optimizer.safetensors")
    with pytest.raises(FormatError, match="optimizer.safetensors: missing"):
        load_checkpoint(path, model, opt)
    os.remove(path / "model.safetensors")
    with pytest.raises(FormatError, match="model.safetensors: missing"):
        load_checkpoint(path, model)
    with pytest.raises(FormatError, match="model.safetensors: missing"):
        load_model(path)
    os.remove(path / "config.json")
    with pytest.raises(FormatError, match="config.json: missing"):
        load_model(path)


@pytest.mark.parametrize("edit,message", [
    (lambda c: [c], "top level must be dict"),
    (lambda c: {**c, "config": {**c["config"], "n_lazers": 2}}, "config key 'n_lazers' is not a field"),
    (lambda c: {**c, "config": {k: v for k, v in c["config"].items() if k != "n_head"}},
     "config key 'n_head' is missing"),
    (lambda c: {**c, "config": {**c["config"], "n_layer": "2"}}, "config.n_layer must be int"),
    (lambda c: {**c, "config": {**c["config"], "n_layer": True}}, "config.n_layer must be int"),
    (lambda c: {**c, "config": {**c["config"], "n_layer": 2.0}}, "config.n_layer must be int"),
    (lambda c: {**c, "config": {**c["config"], "n_layer": 10 ** 30}}, "out of range"),
    (lambda c: {**c, "config": {**c["config"], "n_layer": 10 ** 400}}, "out of range"),
    (lambda c: {**c, "config": {**c["config"], "n_head": 3}}, "impossible GPT2"),
    (lambda c: {**c, "config": []}, "config must be dict"),
    (lambda c: {**c, "dtype": "float16"}, "dtype 'float16' is not supported"),
    (lambda c: {**c, "dtype": "int8"}, "dtype 'int8'"),
    (lambda c: {**c, "extra": 1}, "unknown key 'extra'"),
    (lambda c: {k: v for k, v in c.items() if k != "config_class"}, "'config_class' is missing"),
    (lambda c: {**c, "config_class": "LlamaConfig"}, "does not go with model 'GPT2'"),
    # only the model classes are reachable: not from_gguf (which would open any path)
    (lambda c: {"model": "from_gguf", "config_class": "from_gguf", "config": {"path": "/etc/passwd"}},
     "unknown model 'from_gguf'"),
    (lambda c: {**c, "model": "LanguageModel"}, "unknown model"),
    (lambda c: {**c, "model": ["GPT2"]}, "model must be str"),
    (lambda c: {**c, "config": {**c["config"], "block_size": 32}}, "'wpe' has shape \\(16, 64\\), the model expects \\(32, 64\\)"),
])
def test_config_json_is_validated_before_building(saved, edit, message):
    path, _ = saved
    edit_json(path / "config.json", edit)
    with pytest.raises(FormatError, match=message) as info:
        load_model(path)
    assert "ck" in str(info.value)


@pytest.mark.parametrize("key,value,message", [
    ("rope_theta", 10 ** 400, "rope_theta = .* out of range for a float"),
    ("rope_theta", "1e4", "rope_theta must be int or float"),
    ("rope_scaling", [10 ** 400, 1.0, 4.0, 8192], "rope_scaling element = .* out of range"),
    ("rope_scaling", [8.0, "1"], "rope_scaling element must be"),
    ("rope_scaling", {"factor": 8.0}, "rope_scaling must be list"),
    ("rope_scaling", [8.0, 1.0], "impossible Llama"),
    ("tie_embeddings", 1, "tie_embeddings must be bool"),
    ("ffn_kind", "relu", "impossible Llama"),
    ("norm", None, "norm must be str"),
    ("n_predict", 2, "'mtp'"),
])
def test_llama_config_values(tmp_path, key, value, message):
    from nt.models import Llama, LlamaConfig
    path = save_checkpoint(tmp_path / "ck", Llama(LlamaConfig.preset("llama-tiny", rope_scaling=(8.0, 1.0, 4.0, 64))))
    assert load_model(path).config.rope_scaling == (8.0, 1.0, 4.0, 64.0)
    edit_json(path / "config.json", lambda c: {**c, "config": {**c["config"], key: value}})
    with pytest.raises(FormatError, match=message):
        load_model(path)


def test_config_shapes_checked_against_the_weights_before_building(saved, monkeypatch):
    """block_size 2**24 once built a 35 s model before the shapes were compared."""
    path, _ = saved
    import nt.models
    built = []
    monkeypatch.setattr(nt.models.GPT2, "__init__", lambda self, *a, **k: built.append(1))
    edit_json(path / "config.json", lambda c: {**c, "config": {**c["config"], "block_size": 2 ** 24}})
    with pytest.raises(FormatError, match="wpe"):
        load_model(path)
    assert not built


def test_weights_of_the_wrong_kind_are_refused(saved):
    path, model = saved
    tensors = {name: t.numpy().astype(np.int64) for name, t in model.params.items()}
    save_safetensors(path / "model.safetensors", tensors)
    with pytest.raises(FormatError, match="stored as I64"):
        load_model(path)


def test_load_checkpoint_can_skip_the_weights(saved):
    path, _ = saved
    model = load_model(path)
    model.params.flat[:] = 0.0
    ck = load_checkpoint(path, model, weights=False)
    assert ck.step == 4 and not model.params.flat.any()
    load_checkpoint(path, model)
    assert model.params.flat.any()


@pytest.mark.parametrize("pointer", ["../elsewhere/step_00000001", "{abs}", "step_00000001/../../elsewhere/step_00000001",
                                     "step_1", "", "step_00000001\n/x"])
def test_latest_pointer_must_name_a_step_folder_inside(tmp_path, pointer):
    model, *_ = setup()
    save_run_checkpoint(tmp_path / "run", 1, model)
    elsewhere = save_run_checkpoint(tmp_path / "elsewhere", 1, model)  # complete: only the name may refuse it
    (tmp_path / "run" / "latest").write_text(pointer.format(abs=elsewhere))
    with pytest.raises(FormatError, match="latest: names .*, expected a step_XXXXXXXX folder"):
        latest_checkpoint(tmp_path / "run")


def test_latest_pointer_may_not_leave_the_run_folder_by_symlink(tmp_path):
    model, *_ = setup()
    save_run_checkpoint(tmp_path / "elsewhere", 1, model)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "step_00000007").symlink_to(tmp_path / "elsewhere" / "step_00000001")
    (run_dir / "latest").write_text("step_00000007\n")
    with pytest.raises(FormatError, match="outside"):
        latest_checkpoint(run_dir)
    (run_dir / "latest").write_bytes(b"step_\xff")
    with pytest.raises(FormatError, match="UTF-8"):
        latest_checkpoint(run_dir)


class Crash(Exception):
    pass


def test_crash_between_the_two_renames_of_a_replace_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Replacing step_1: the old folder is moved aside, then the new one moved in. A crash
    between the two renames leaves no step_1; the loaders use the old one kept aside, and
    the next save puts it back."""
    model, opt, *_ = setup()
    save_run_checkpoint(tmp_path, 1, model, opt)
    before = model.params.flat.copy()
    model.params.flat[:] += 1.0

    def crash(path):
        if ".old-" in path.name:
            raise Crash

    monkeypatch.setattr(checkpoint, "_after_file", crash)
    with pytest.raises(Crash):
        save_run_checkpoint(tmp_path, 1, model, opt)
    monkeypatch.setattr(checkpoint, "_after_file", None)
    assert not (tmp_path / "step_00000001").exists()  # the window
    for ck in (load_checkpoint(latest_checkpoint(tmp_path)), load_checkpoint(tmp_path / "step_00000001")):
        assert ck.step == 1 and np.array_equal(ck.model.params.flat, before)
    save_run_checkpoint(tmp_path, 2, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert np.array_equal(load_checkpoint(tmp_path / "step_00000001").model.params.flat, before)


def test_replacing_a_checkpoint_leaves_nothing_behind(tmp_path):
    model, *_ = setup()
    save_checkpoint(tmp_path / "ck", model, step=1)
    save_checkpoint(tmp_path / "ck", model, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert load_checkpoint(tmp_path / "ck", model).step == 2


def test_leftovers_of_dead_writers_are_cleaned_on_the_next_save(tmp_path):
    model, *_ = setup()
    save_run_checkpoint(tmp_path, 1, model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    alive = os.getppid()  # a live process that is not this one: its temporaries stay
    (tmp_path / f".step_00000005.tmp-{pid}").mkdir()
    (tmp_path / f".step_00000005.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".latest.tmp-{pid}").write_text("step_0000")
    (tmp_path / f".loss.json.tmp-{pid}").write_text("{")
    (tmp_path / f".step_00000001.old-{pid}").mkdir()
    (tmp_path / f".latest.tmp-{alive}").write_text("in progress")
    save_run_checkpoint(tmp_path, 2, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".latest.tmp-{alive}", "latest", "step_00000001",
                                                        "step_00000002"]
