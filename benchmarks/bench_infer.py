"""Inference speed on the CPU: nt, and llama.cpp on the same GGUF files.

    python benchmarks/bench_infer.py                         # nt alone: 58M shape, F32/F16/Q8_0/Q4_0
    python benchmarks/bench_infer.py --vs-llama-cpp --json   # nt vs llama.cpp, 58M and SmolLM2-135M shapes

Files: a Llama with random weights (speed does not depend on them) written as F32 by nt;
F16, Q8_0, Q4_0 and Q4_K_M made from it by llama.cpp's own quantiser when llama-cpp-python
is installed (nt's writer otherwise, which makes no Q4_K_M). They are kept in --files-dir.

Each measurement is its own process (so each engine's peak RSS is its own), with the
thread count set for it (nt: NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS; llama.cpp: n_threads
and n_threads_batch), engines and thread counts alternating (nt 1 thread, llama.cpp 1 thread,
nt 2 threads, llama.cpp 2 threads, nt 1 thread, ...) --reps times per file, the best run
reported, and nt's decode speed over its 1-thread speed ("vs 1", `nt_decode_vs_1_thread`).
A process warms up first (Numba's cache, page faults).
  decode: an 8-token prompt, then --decode greedy tokens one at a time, tokens/s
  prefill: one --prompt-token prompt through the model, tokens/s
nt loads each file with keep_quantized=True: Q8_0 / Q4_0 / Q4_K / Q6_K matrices stay blocks,
other types are dequantised to float32 at load (F16, and Q4_K_M's layers that mix types).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {   # untied 58M Llama of the issue; SmolLM2-135M's shape (tied embeddings)
    "58m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1536, vocab_size=32000,
                tie_embeddings=False),
    "135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536, vocab_size=49152,
                 tie_embeddings=True, rope_theta=100000.0),
}
LLAMA_CPP_FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}   # llama_ftype values


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 (C libraries' logs) to /dev/null while the block runs."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def make_files(shape: str, types: list[str], folder: Path, llama_cpp_quantiser: bool) -> dict[str, Path]:
    """{type: GGUF path} for the shape, written once and reused."""
    from nt.models import Llama, LlamaConfig, gguf
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / f"{shape}_F32.gguf"
    if not f32.exists():
        cfg = LlamaConfig(**SHAPES[shape], block_size=1024, rope_pairing="interleaved")
        gguf.write(f32, Llama(cfg, seed=0), "F32")
    files = {"F32": f32}
    for kind in types:
        path = folder / f"{shape}_{kind}{'' if llama_cpp_quantiser else '_nt'}.gguf"
        if kind != "F32" and not path.exists():
            if llama_cpp_quantiser:
                import llama_cpp
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = LLAMA_CPP_FTYPES[kind]
                with quiet_stderr():   # the quantiser logs every tensor
                    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params)
                if rc != 0:
                    raise RuntimeError(f"llama.cpp could not quantise {f32} to {kind}")
            elif kind in ("F16", "Q8_0", "Q4_0"):
                from nt.models import from_gguf   # nt's writer, from the F32 file's weights
                gguf.write(path, from_gguf(f32), kind)
            else:
                print(f"{kind}: needs llama.cpp's quantiser (pip install llama-cpp-python); skipped")
                continue
        files[kind] = path
    return {k: files[k] for k in types if k in files}


# ---------------------------------------------------------------------- one measurement (worker process)

def measure_nt(path: str, prompt: list[int], n_decode: int) -> tuple[float, float, str]:
    """(prefill tok/s, decode tok/s, decoding path) of nt on the file: the path is "fused"
    when every token ran Llama._decode_one's one-call step, "tape" when it fell back to
    the per-op path (then the numbers do not measure the fused decoder)."""
    import nt
    model = nt.models.from_gguf(path, keep_quantized=True).eval()

    def decode(tokens: list[int], n: int) -> float:
        rows = np.zeros((1, len(tokens) + n), np.int32)
        rows[0, :len(tokens)] = tokens
        model._begin_generation(rows.shape[1], 1)
        L = len(tokens)
        logits = model._next_logits(rows[:, :L])
        t0 = time.perf_counter()
        for _ in range(n):
            rows[0, L] = int(np.argmax(logits[0]))
            L += 1
            logits = model._next_logits(rows[:, :L])
        return n / (time.perf_counter() - t0)

    def prefill(tokens: list[int]) -> float:
        model._begin_generation(len(tokens), 1)
        t0 = time.perf_counter()
        model._next_logits(np.array([tokens], np.int32))
        return len(tokens) / (time.perf_counter() - t0)

    decode(prompt[:8], 8)   # warm-up
    prefill(prompt[:64])
    pre, dec = prefill(prompt), decode(prompt[:8], n_decode)
    return pre, dec, "fused" if getattr(model, "_decode_plan", None) is not None else "tape"


def measure_llama_cpp(path: str, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of llama.cpp on the file (default settings otherwise)."""
    import llama_cpp
    n_ctx = len(prompt) + n_decode + 16
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=len(prompt), n_ubatch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def decode(tokens: list[int], n: int) -> float:
        llm.reset()
        llm.eval(tokens)
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(last_logits()))])
        return n / (time.perf_counter() - t0)

    def prefill(tokens: list[int]) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        return len(tokens) / (time.perf_counter() - t0)

    decode(prompt[:8], 8)   # warm-up
    prefill(prompt[:64])
    return prefill(prompt), decode(prompt[:8], n_decode)


def worker(a) -> None:
    prompt = np.random.default_rng(0).integers(3, 32000, a.prompt).tolist()
    if a.worker == "nt":
        pre, dec, path = measure_nt(a.file, prompt, a.decode)
    else:
        (pre, dec), path = measure_llama_cpp(a.file, prompt, a.decode, a.threads[0]), "llama.cpp"
    print(json.dumps({"prefill": pre, "decode": dec, "path": path}))


def run_worker(engine: str, path: Path, threads: int, a) -> dict:
    """One measurement in a fresh process: tok/s and the process's peak RSS (MB)."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    if engine == "nt" and a.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy
    cmd = [sys.executable, __file__, "--worker", engine, "--file", str(path), "--threads", str(threads),
           "--prompt", str(a.prompt), "--decode", str(a.decode)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} on {path} with {threads} threads failed (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["rss_mb"] = usage.ru_maxrss / 1024
    return result


# ---------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vs-llama-cpp", action="store_true", help="run llama.cpp on the same files too")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: 58m (with --vs-llama-cpp: both)")
    ap.add_argument("--types", nargs="+", help="default F32 F16 Q8_0 Q4_0 (+ Q4_K_M with llama.cpp)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    ap.add_argument("--decode", type=int, default=128, help="greedy tokens decoded one at a time")
    ap.add_argument("--reps", type=int, default=3, help="runs per engine, file and thread count; the best is kept")
    ap.add_argument("--files-dir", type=Path, default=Path("/tmp/nt_bench_infer"))
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                    help="for nt's processes (default: libgomp's, a worker spins briefly after a parallel region, "
                         "then sleeps; PASSIVE sleeps at once; ACTIVE spins without end, fastest on an otherwise "
                         "idle machine)")
    ap.add_argument("--json", action="store_true", help="one JSON object per (file, threads) instead of a table")
    ap.add_argument("--worker", choices=["nt", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--make-files", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.make_files:
        files = make_files(a.make_files, a.types, a.files_dir, have_llama_cpp())
        return print(json.dumps({k: str(v) for k, v in files.items()}))
    llama = have_llama_cpp()
    if a.vs_llama_cpp and not llama:
        print("llama-cpp-python is not installed: measuring nt alone "
              "(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python to compare)", file=sys.stderr)
    compare = a.vs_llama_cpp and llama
    shapes = a.shapes or (["58m", "135m"] if a.vs_llama_cpp else ["58m"])
    types = a.types or (["F32", "F16", "Q8_0", "Q4_0"] + (["Q4_K_M"] if llama else []))
    engines = ["nt", "llama.cpp"] if compare else ["nt"]
    if not a.json:
        print(f"prompt {a.prompt} tokens (prefill), decode {a.decode} tokens after an 8-token prompt, "
              f"best of {a.reps}; tok/s, peak RSS MB")
        head = f"{'file':16s} {'thr':>3s} {'nt dec':>8s} {'vs 1':>6s} {'nt pre':>8s} {'nt MB':>6s}"
        if compare:
            head += f" {'llc dec':>8s} {'llc pre':>8s} {'llc MB':>6s} {'dec x':>6s} {'pre x':>6s}"
        print(head)
    for shape in shapes:
        # in a child process: a child's peak RSS counts its parent's at the fork, so the
        # parent never loads a model
        made = subprocess.run([sys.executable, __file__, "--make-files", shape, "--files-dir", str(a.files_dir),
                               "--types", *types], stdout=subprocess.PIPE, check=True)
        files = {k: Path(v) for k, v in json.loads(made.stdout.decode().strip().splitlines()[-1]).items()}
        for kind, path in files.items():
            # thread counts alternate too, so a thread count's speed-up over one thread is
            # not the VM's drift between minutes
            runs = {(threads, e): [] for threads in a.threads for e in engines}
            for _ in range(a.reps):
                for threads in a.threads:
                    for e in engines:
                        runs[threads, e].append(run_worker(e, path, threads, a))
            best = {key: {k: max(r[k] for r in rs) for k in ("decode", "prefill", "rss_mb")} for key, rs in runs.items()}
            for threads in a.threads:
                best[threads, "nt"]["path"] = "/".join(sorted({r["path"] for r in runs[threads, "nt"]}))
                one = best[1, "nt"]["decode"] if 1 in a.threads else None
                report(shape, kind, path, threads, {e: best[threads, e] for e in engines}, one, compare, a.json)


def report(shape, kind, path, threads, best, one_thread_decode, compare, as_json) -> None:
    nt_, llc = best["nt"], best.get("llama.cpp")
    scaling = round(nt_["decode"] / one_thread_decode, 2) if one_thread_decode else None
    row = {"file": path.name, "shape": shape, "type": kind, "threads": threads,
           "nt_decode_tok_s": round(nt_["decode"], 1), "nt_prefill_tok_s": round(nt_["prefill"], 1),
           "nt_decode_vs_1_thread": scaling,
           "nt_peak_rss_mb": round(nt_["rss_mb"]), "nt_decode_path": nt_["path"],
           "llama_cpp_decode_tok_s": None, "llama_cpp_prefill_tok_s": None, "llama_cpp_peak_rss_mb": None,
           "decode_ratio": None, "prefill_ratio": None}
    if compare:
        row.update(llama_cpp_decode_tok_s=round(llc["decode"], 1), llama_cpp_prefill_tok_s=round(llc["prefill"], 1),
                   llama_cpp_peak_rss_mb=round(llc["rss_mb"]), decode_ratio=round(nt_["decode"] / llc["decode"], 2),
                   prefill_ratio=round(nt_["prefill"] / llc["prefill"], 2))
    if as_json:
        print(json.dumps(row), flush=True)
        return
    line = (f"{shape + ' ' + kind:16s} {threads:3d} {row['nt_decode_tok_s']:8.1f} "
            f"{'' if scaling is None else f'{scaling:.2f}x':>6s} {row['nt_prefill_tok_s']:8.1f} {row['nt_peak_rss_mb']:6d}")
    if compare:
        line += (f" {row['llama_cpp_decode_tok_s']:8.1f} {row['llama_cpp_prefill_tok_s']:8.1f} "
                 f"{row['llama_cpp_peak_rss_mb']:6d} {row['decode_ratio']:6.2f} {row['prefill_ratio']:6.2f}")
    if nt_["path"] != "fused":
        line += f"  (nt decoded on the {nt_['path']} path)"
    print(line, flush=True)


if __name__ == "__main__":
    main()
