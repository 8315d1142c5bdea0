"""Byte-pair-encoding kernels: learning merges (training) and applying them (encoding).

Not a tape op (no forward/backward, no CUDA twin): `nt.tokenizer` calls these directly.
Tokens are int32 ids; a pair (a, b) is the int64 key a * PAIR_BASE + b.

Training works on the UNIQUE pre-tokens of a corpus, each weighted by its frequency:
words are doubly linked lists of symbols in one flat array, pair counts live in slots
(a typed dict maps pair key -> slot), every slot keeps a linked list of the words where
the pair was seen (duplicates and stale entries allowed: a word is re-checked when
visited), and a heap of (-count, key) with lazy invalidation picks the most frequent pair.
A merge touches only the words that hold the pair and updates neighbouring pair counts
incrementally, so the cost of training is proportional to the work the merges do.
"""
import heapq

import numpy as np
from numba import njit, types
from numba.typed import Dict

PAIR_BASE = np.int64(1) << 32


@njit(cache=True)
def _grown(a, n):
    """`a` with room for at least n elements (doubling; contents kept)."""
    if n <= a.shape[0]:
        return a
    b = np.empty(max(n, 2 * a.shape[0]), dtype=a.dtype)
    b[:a.shape[0]] = a
    return b


@njit(cache=True)
def bpe_train(syms, word_offsets, word_counts, n_merges, first_id, min_frequency):
    """Learn up to `n_merges` merges; returns (merges (n, 2) int32, n done).

    syms: int32 symbols of every unique word, concatenated (modified in place);
    word_offsets: int64 (n_words + 1,) boundaries; word_counts: int64 frequency per word.
    Merge m creates token id first_id + m. Stops early when the best pair is seen fewer
    than `min_frequency` times. Ties between equally frequent pairs go to the smaller
    (a, b) key, so training is deterministic.
    """
    n_words = word_offsets.shape[0] - 1
    n_syms = syms.shape[0]
    nxt = np.empty(n_syms, dtype=np.int32)
    prv = np.empty(n_syms, dtype=np.int32)
    for w in range(n_words):
        lo, hi = word_offsets[w], word_offsets[w + 1]
        for i in range(lo, hi):
            prv[i] = i - 1 if i > lo else -1
            nxt[i] = i + 1 if i + 1 < hi else -1

    slot_of = Dict.empty(key_type=types.int64, value_type=types.int64)
    key = np.empty(1024, dtype=np.int64)
    count = np.empty(1024, dtype=np.int64)
    head = np.empty(1024, dtype=np.int64)
    n_slots = 0
    node_word = np.empty(4096, dtype=np.int32)
    node_next = np.empty(4096, dtype=np.int64)
    n_nodes = 0
    touched = np.empty(1024, dtype=np.int64)  # slots whose count went up in this merge
    n_touched = 0

    # --- initial counts: every adjacent pair of every word, weighted by the word's count
    for w in range(n_words):
        lo, hi = word_offsets[w], word_offsets[w + 1]
        for i in range(lo, hi - 1):
            k = syms[i] * PAIR_BASE + syms[i + 1]
            if k in slot_of:
                s = slot_of[k]
            else:
                s = n_slots
                n_slots += 1
                key = _grown(key, n_slots)
                count = _grown(count, n_slots)
                head = _grown(head, n_slots)
                key[s], count[s], head[s] = k, 0, -1
                slot_of[k] = s
            count[s] += word_counts[w]
            node_word = _grown(node_word, n_nodes + 1)
            node_next = _grown(node_next, n_nodes + 1)
            node_word[n_nodes], node_next[n_nodes] = w, head[s]
            head[s] = n_nodes
            n_nodes += 1

    heap = [(np.int64(0), np.int64(0))]
    heap.pop()
    for s in range(n_slots):
        heap.append((-count[s], key[s]))
    heapq.heapify(heap)

    merges = np.zeros((n_merges, 2), dtype=np.int32)
    visited = np.full(n_words, -1, dtype=np.int64)
    done = 0
    while done < n_merges and len(heap) > 0:
        negc, k = heapq.heappop(heap)
        s = slot_of[k]
        if count[s] != -negc:  # stale entry: requeue with the current count
            if count[s] > 0:
                heapq.heappush(heap, (-count[s], k))
            continue
        if count[s] < min_frequency:
            break
        a = np.int32(k // PAIR_BASE)
        b = np.int32(k % PAIR_BASE)
        c = np.int32(first_id + done)
        merges[done, 0], merges[done, 1] = a, b
        n_touched = 0
        node = head[s]
        while node >= 0:
            w = node_word[node]
            node = node_next[node]
            if visited[w] == done:
                continue
            visited[w] = done
            wc = word_counts[w]
            i = np.int64(word_offsets[w])  # a word's first symbol is never merged away
            while i >= 0:
                j = nxt[i]
                if j < 0:
                    break
                if syms[i] != a or syms[j] != b:
                    i = j
                    continue
                # merge positions i, j into c at i; fix the neighbouring pairs' counts
                p, n = prv[i], nxt[j]
                for side in range(2):
                    if side == 0:
                        if p < 0:
                            continue
                        old_k, new_k = syms[p] * PAIR_BASE + a, syms[p] * PAIR_BASE + c
                    else:
                        if n < 0:
                            continue
                        old_k, new_k = b * PAIR_BASE + syms[n], c * PAIR_BASE + syms[n]
                    count[slot_of[old_k]] -= wc
                    if new_k in slot_of:
                        t = slot_of[new_k]
                    else:
                        t = n_slots
                        n_slots += 1
                        key = _grown(key, n_slots)
                        count = _grown(count, n_slots)
                        head = _grown(head, n_slots)
                        key[t], count[t], head[t] = new_k, 0, -1
                        slot_of[new_k] = t
                    count[t] += wc
                    node_word = _grown(node_word, n_nodes + 1)
                    node_next = _grown(node_next, n_nodes + 1)
                    node_word[n_nodes], node_next[n_nodes] = w, head[t]
                    head[t] = n_nodes
                    n_nodes += 1
                    touched = _grown(touched, n_touched + 1)
                    touched[n_touched] = t
                    n_touched += 1
                count[s] -= wc
                syms[i] = c
                nxt[i] = n
                if n >= 0:
                    prv[n] = np.int32(i)
                i = n
        count[s] = 0
        for q in range(n_touched):
            t = touched[q]
            if count[t] > 0:
                heapq.heappush(heap, (-count[t], key[t]))
        done += 1
    return merges[:done], done


@njit(cache=True)
def _pair_rank(pair_keys, a, b):
    """Index of pair (a, b) in the sorted `pair_keys`, or -1."""
    k = a * PAIR_BASE + b
    i = np.searchsorted(pair_keys, k)
    if i < pair_keys.shape[0] and pair_keys[i] == k:
        return i
    return -1


@njit(cache=True)
def bpe_encode(ids, offsets, pair_keys, pair_rank, pair_new, out, out_offsets):
    """Apply merges to every word, GPT-2's way; returns the number of ids written to out.

    ids/offsets: each word's initial (byte) token ids. pair_keys: sorted int64 pair keys;
    pair_rank / pair_new: the merge rank and resulting id of each key. Within a word, the
    adjacent pair of lowest rank is merged everywhere (left to right, non-overlapping),
    until no adjacent pair has a merge. out needs room for ids.shape[0] tokens;
    out_offsets (n_words + 1,) receives each word's range in out.
    """
    n_words = offsets.shape[0] - 1
    big = np.iinfo(np.int64).max
    work = np.empty(0, dtype=np.int32)
    rank = np.empty(0, dtype=np.int64)
    o = 0
    out_offsets[0] = 0
    for w in range(n_words):
        lo, hi = offsets[w], offsets[w + 1]
        n = hi - lo
        work = _grown(work, n)
        rank = _grown(rank, n)
        for i in range(n):
            work[i] = ids[lo + i]
        for i in range(n - 1):
            r = _pair_rank(pair_keys, work[i], work[i + 1])
            rank[i] = pair_rank[r] if r >= 0 else big
        while n > 1:
            best = big
            for i in range(n - 1):
                if rank[i] < best:
                    best = rank[i]
            if best == big:
                break
            # merge every occurrence of the best pair, compacting in place
            a, b = work[0], work[0]
            for i in range(n - 1):
                if rank[i] == best:
                    a, b = work[i], work[i + 1]
                    break
            new = pair_new[_pair_rank(pair_keys, a, b)]
            m = 0
            i = 0
            while i < n:
                if i + 1 < n and work[i] == a and work[i + 1] == b:
                    work[m] = new
                    i += 2
                else:
                    work[m] = work[i]
                    i += 1
                m += 1
            n = m
            for i in range(n - 1):  # ranks of the shortened word (pairs with `new` changed)
                r = _pair_rank(pair_keys, work[i], work[i + 1])
                rank[i] = pair_rank[r] if r >= 0 else big
        for i in range(n):
            out[o + i] = work[i]
        o += n
        out_offsets[w + 1] = o
    return o
