"""BPE training time and encode throughput: nt vs tiktoken and HF tokenizers (when
installed) on the same merges, one thread, the built-in corpus.

    python benchmarks/bench_tokenizer.py --vocab-size 4096
"""
import argparse
import os
import tempfile
import time

from nt.data import builtin_corpus_text
from nt.tokenizer import BPE, pretokenize


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab-size", type=int, nargs="+", default=[4096])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    text = builtin_corpus_text()
    mb = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {mb:.2f} MB, {len(pretokenize(text)):,} pre-tokens")
    BPE.train(text[:10000], 300)  # compile / load the kernels
    for V in args.vocab_size:
        dt, bpe = best_of(lambda: BPE.train(text, V), 1)
        print(f"train V={V}: {dt:.2f} s ({len(bpe.merges)} merges)")
        ids = bpe.encode(text)
        print(f"  {len(ids):,} tokens, {mb * 1e6 / len(ids):.2f} bytes/token")
        bpe._cache.clear()
        cold, _ = best_of(lambda: (bpe._cache.clear(), bpe.encode(text)), args.repeat)
        warm, _ = best_of(lambda: bpe.encode(text), args.repeat)
        print(f"  nt encode: {mb / cold:.2f} MB/s (empty cache), {mb / warm:.2f} MB/s (warm pre-token cache)")
        try:
            import tiktoken
            pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
            ranks = {bpe.vocab[i]: i for i in range(bpe.vocab_size) if i not in bpe.special_ids}
            enc = tiktoken.Encoding("bench", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
            dt, out = best_of(lambda: enc.encode_ordinary(text), args.repeat)
            assert out == ids
            print(f"  tiktoken encode: {mb / dt:.2f} MB/s (same ids)")
        except ImportError:
            pass
        try:
            import tokenizers
            from tokenizers import models, pre_tokenizers
            with tempfile.TemporaryDirectory() as d:
                bpe.save(d)
                tok = tokenizers.Tokenizer(models.BPE.from_file(os.path.join(d, "vocab.json"),
                                                                os.path.join(d, "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            dt, out = best_of(lambda: tok.encode(text).ids, args.repeat)
            assert out == ids
            print(f"  HF tokenizers encode: {mb / dt:.2f} MB/s (same ids)")
        except ImportError:
            pass


if __name__ == "__main__":
    main()
