"""What every nt language model shares: the nanoGPT-style call, backward, sampling,
train/eval modes and flat weight loading. A model supplies `config` (with block_size and
vocab_size), `tape`, `params` and `forward(idx, targets) -> (logits, loss)` tensors."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Iterable, Optional, Union

import numpy as np

from .. import bitnet, ops
from ..tensor import Arena, Tensor


class LanguageModel:
    """Mixin: the model interface built on `forward`."""

    loss: Optional[Tensor] = None
    tokenizer = None   # a tokenizer (encode/decode/token_bytes) when the model file carried one
    quantized = MappingProxyType({})  # matrix name -> ggml block format kept for inference (Llama)
    bitlinear = frozenset()  # matrix names run as BitNet b1.58 BitLinear (nt.bitnet)
    adapters = None    # the nt.lora.LoRA attached to this model, if any
    # forward with targets runs the classifier and its loss as one op (ops.classifier_xent):
    # the logits get no gradient memory and hold their gradient after backward(). Set False
    # when another loss differentiates the logits too (distillation's KL term). A frozen
    # classifier in training mode goes further: the logits are never formed (None returned).
    fuse_classifier = True

    def forward(self, idx: np.ndarray, targets: Optional[np.ndarray] = None):
        raise NotImplementedError

    def _linear(self, x: Tensor, name: str, l: Optional[int] = None, bias: Optional[Tensor] = None) -> Tensor:
        """x @ W^T (+ bias) for the matrix `name` (of layer l): float weights from params, or
        a quantised matmul on the blocks when the matrix is kept quantised (BitLinear for the
        names in `bitlinear`, nt.bitnet; "T2" rows: the packed ternary matmul); then the LoRA
        adapters attached to that matrix, if any, add their low-rank term in place."""
        if name in self.quantized:
            wq = self.qweights[name] if l is None else self.qweights[name][l]
            if self.quantized[name] == "T2":
                out = bitnet.linear_t2(self.tape, x, wq)
            else:
                out = ops.linear_q(self.tape, x, wq, self.quantized[name])
        else:
            w = self.params[name] if l is None else self.params[name][l]
            out = bitnet.bitlinear(self.tape, x, w) if name in self.bitlinear else ops.linear(self.tape, x, w, bias)
        if self.adapters is not None:
            self.adapters.apply(self.tape, x, out, name, l)
        return out

    def _check_batch(self, idx, targets) -> None:
        """(B, T) ids and targets in the real vocabulary [0, vocab_size) (targets: or -1),
        checked before any cast; the padded rows of the embedding are not tokens."""
        cfg = self.config
        if not isinstance(idx, np.ndarray) or idx.ndim != 2:
            raise ValueError(f"idx must be a (B, T) integer NumPy array, got {getattr(idx, 'shape', type(idx))}")
        if idx.shape[1] > cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's block_size {cfg.block_size}")
        ops.check_ids(idx, "idx", cfg.vocab_size, 2)
        if targets is not None:
            if getattr(targets, "shape", None) != idx.shape:
                raise ValueError(f"targets must have the same shape as idx {idx.shape}, "
                                 f"got {getattr(targets, 'shape', None)}")
            ops.check_ids(targets, "targets", cfg.vocab_size, 2, ignore_index=True)

    def __call__(self, idx: np.ndarray, targets: Optional[np.ndarray] = None) -> tuple[Optional[np.ndarray], Optional[float]]:
        """nanoGPT-style: (logits (B, T, V) as a NumPy array, mean loss or None).

        The logits are a view of the model's activation memory (on the CPU) and are
        overwritten by the next forward, and with targets by backward() too (it turns them
        into their gradient, see fuse_classifier): copy them to keep them.
        With targets, in training mode, a model whose classifier is frozen (LoRA, frozen-base
        fine-tuning) never forms the logits (ops.classifier_xent takes them a chunk of rows at
        a time): the logits are then None; call eval() first to get them.
        """
        logits, loss = self.forward(idx, targets)
        V = self.config.vocab_size
        return (logits.numpy()[..., :V] if logits is not None else None,
                float(loss.numpy()[0]) if loss is not None else None)

    def forward_inference(self, idx: np.ndarray) -> Tensor:
        """The (B, T, Vp) logits tensor of (B, T) ids, with the tape not recording (no
        backward can run through it, none is owed): for a frozen model beside the one trained,
        e.g. a distillation teacher or a reference model, each with its own tape. Runs in
        the current mode (call eval() for no dropout). The logits live in the tape's memory
        until its next forward."""
        self._check_batch(idx, None)
        self.tape.reset(recording=False)
        return self._head(self._trunk(idx))

    def backward(self) -> None:
        """Backpropagate the last forward's loss; parameter grads accumulate."""
        if self.loss is None:
            raise RuntimeError("backward() needs a forward with targets first")
        self.tape.backward(self.loss)

    def zero_grad(self) -> None:
        """Zero the trainable parameters' grads (the model's and its adapters')."""
        self.params.zero_grad()
        if self.adapters is not None:
            self.adapters.params.zero_grad()

    @property
    def trainable_params(self):
        """The Params an optimizer should update: the LoRA adapters when attached (the base
        is frozen then), else the model's own (its trainable part, see freeze())."""
        return self.adapters.params if self.adapters is not None else self.params

    def train(self, mode: bool = True) -> "LanguageModel":
        """Training mode: dropout active. Returns the model."""
        self.tape.training = bool(mode)
        return self

    def eval(self) -> "LanguageModel":
        """Evaluation mode: dropout is the identity. Returns the model."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.tape.training

    def load_flat(self, values: np.ndarray) -> None:
        """Set every parameter from one flat array in this model's layout (params.offsets)."""
        self.params.load_flat(values)

    @property
    def num_params(self) -> int:
        """Every parameter, trainable or frozen."""
        return self.params.numel

    def save_pretrained(self, path, max_shard_size: Union[int, str] = "5GB", dtype=None) -> None:
        """Write a Hugging Face model folder (config.json + safetensors weights in `dtype`,
        e.g. "bfloat16", default the model's; sharded with an index past max_shard_size)
        that transformers' AutoModelForCausalLM and nt.models.from_pretrained load. See
        nt.models.hf.save_pretrained."""
        from .hf import save_pretrained
        save_pretrained(self, path, max_shard_size, dtype)

    def freeze(self, trainable: Iterable[str] = ()) -> "LanguageModel":
        """Make every parameter not named in `trainable` frozen: no grad memory, no weight
        gradient computed in the backward (a linear with a frozen weight runs only its
        input-gradient gemm), never touched by an optimizer. The trainable ones stay one
        flat buffer, `model.params.flat`. Build the optimizer after freezing. Returns the model."""
        self.params = self.params.with_trainable(trainable)
        return self

    def unfreeze(self) -> "LanguageModel":
        """Make every parameter trainable again (grads start at zero). Returns the model."""
        self.params = self.params.with_trainable(None)
        return self

    # ------------------------------------------------------------------ generation with a KV cache
    # A model with a cache calls _init_kv_cache in __init__, runs attention through
    # _attention, and provides _trunk(idx, pos0, caches) -> final hidden rows (B, T, C)
    # (the residual stream, or already normed, as GPT-2's) and _head(x) -> logits tensor;
    # both are row-wise, so _next_logits may run _head on the newest rows alone.

    use_kv_cache = True
    _kv: Optional[Arena] = None

    def _init_kv_cache(self, n_layers: int, width: int) -> None:
        """Per layer, the (rotated) qkv rows of the positions seen so far: `width` wide."""
        self._kv = Arena(self.tape.device, self.tape.dtype, with_grad=False, name="kv_cache")
        self._kv_shape = (n_layers, width)
        self._kv_layers: list[Tensor] = []
        self._kv_len = 0     # positions held in the cache
        self._kv_start = 0   # index in the token rows of the first cached position

    def _attention(self, qkv: Tensor, NH: int, NKV: int, window: int, pos0: int, cache: Optional[Tensor]) -> Tensor:
        """Causal attention of qkv (B, T, W) at positions pos0..; with a cache (B, capacity,
        W) each batch row's qkv rows are stored at pos0.. of its cache and its queries attend
        to its keys 0..pos0+T-1."""
        t = self.tape
        if cache is None:
            return ops.attention(t, qkv, NH, NKV, window)
        B, T, W = qkv.shape
        capacity = cache.shape[1]
        out = None
        for b in range(B):
            # rows 0..pos0+T-1 of batch row b are contiguous: one attention call per row
            rows = Tensor(cache.arena, cache.offset + b * capacity * W, (1, pos0 + T, W))
            t.k.copy_(rows.data[:, pos0:], qkv.data[b:b + 1])
            o = ops.attention(t, rows, NH, NKV, window, q0=pos0)
            if B == 1:
                return o
            if out is None:
                out = t.new((B, T, o.shape[2]))
            t.k.copy_(out.data[b:b + 1], o.data)
        return out

    def _begin_generation(self, capacity: int, batch: int) -> None:
        """Size the KV cache for `batch` rows of `capacity` positions (at most block_size)
        and empty it."""
        if self._kv is None:
            return
        n_layers, width = self._kv_shape
        self._kv.reset()
        # one block (L, B, capacity, W): the per-layer caches are views of it, so a fused
        # decoding step (_decode_one) can take every layer's cache as one array
        self._kv_all = self._kv.alloc((n_layers, batch, capacity, width))
        step = batch * capacity * width
        self._kv_layers = [Tensor(self._kv, self._kv_all.offset + l * step, (batch, capacity, width))
                           for l in range(n_layers)]
        self._kv_len = self._kv_start = 0

    def _next_logits(self, rows: np.ndarray) -> np.ndarray:
        """The float64 next-token logits (B, V) after the token rows (B, L). With the KV
        cache: the newest token of each row alone through the cached blocks when it extends
        the cached positions; otherwise (the first call, or a full cache) a prefill of the
        last tokens (the cache's capacity at first, half of it when it overflowed). Without:
        a full forward over the last block_size tokens."""
        V = self.config.vocab_size
        if self._kv is None or not self.use_kv_cache:
            logits, _ = self.forward(np.ascontiguousarray(rows[:, -self.config.block_size:]))
            return logits.numpy()[:, -1, :V].astype(np.float64)
        B, L = rows.shape
        capacity = self._kv_layers[0].shape[1]
        if L == self._kv_start + self._kv_len + 1 and 0 < self._kv_len < capacity:
            new, pos0 = rows[:, -1:], self._kv_len
        else:
            keep = min(L, capacity if self._kv_len == 0 else max(1, capacity // 2))
            new, pos0 = rows[:, -keep:], 0
            self._kv_start = L - keep
        T = new.shape[1]
        if B == 1 and T == 1 and pos0 > 0:   # one token: the model's fused step, when it has one
            logits = self._decode_one(int(new[0, 0]), pos0)
            if logits is not None:
                self._kv_len = pos0 + 1
                return logits[None, :V].astype(np.float64)
        self.tape.reset(recording=False)
        x = self._trunk(np.ascontiguousarray(new, dtype=np.int32), pos0, self._kv_layers)
        C = x.shape[-1]
        if B == 1:
            last = Tensor(x.arena, x.offset + (T - 1) * C, (1, 1, C))
        else:  # each row's newest position, gathered so the head runs on B rows only
            last = self.tape.new((B, 1, C))
            for b in range(B):
                self.tape.k.copy_(last.data[b], x.data[b, T - 1:])
        logits = self._head(last)
        self._kv_len = pos0 + T
        return logits.numpy()[:, 0, :V].astype(np.float64)

    def _decode_one(self, token: int, pos: int) -> Optional[np.ndarray]:
        """The logits row after `token` at position `pos` of a batch of one, its qkv rows
        appended to the KV cache, in one fused step; None where the model has none (then
        _next_logits runs the tape path)."""
        return None

    def generate(self, idx: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None,
                 on_token: Optional[Callable[[int], None]] = None, top_p: Optional[float] = None,
                 stop: Iterable[Union[int, str]] = ()) -> np.ndarray:
        """Sample up to `max_new_tokens` continuations of a (T,) prompt; returns prompt + new
        ids. A (B, T) batch of equal-length prompts (as nanoGPT's generate takes) samples B
        continuations side by side and returns (B, T + max_new_tokens); `on_token` and
        `stop` need a single prompt.

        temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the
        top_k largest logits and then to the top_p nucleus (the smallest set of most likely
        tokens whose probabilities sum to >= top_p). `seed` makes sampling reproducible.
        on_token(id) is called with each new token as soon as it is chosen (streaming).
        stop: token ids and/or strings; generation ends after the token that produces one
        (it is included in the result). Strings need `self.tokenizer` (attached by
        nt.models.from_gguf) and are matched on the generated text's bytes.
        The context is cropped to block_size. Runs in eval mode (no dropout) and restores
        the previous mode.
        """
        prompts = np.asarray(idx)
        if prompts.ndim not in (1, 2) or prompts.size == 0 or not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(f"generate() needs a non-empty (T,) or (B, T) integer prompt, got "
                             f"{prompts.dtype} {prompts.shape}")
        ops.check_ids(prompts, "prompt", self.config.vocab_size)
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        single = prompts.ndim == 1
        rows = prompts.reshape(1, -1) if single else prompts
        stop = list(stop)
        if not single and (stop or on_token is not None):
            raise ValueError("stop and on_token need a single (T,) prompt; generate a batch without them")
        stop_ids = {int(s) for s in stop if not isinstance(s, str)}
        stop_strs = [s.encode("utf-8") for s in stop if isinstance(s, str) and s]
        if stop_strs and getattr(self, "tokenizer", None) is None:
            raise ValueError("stop strings need a tokenizer (model.tokenizer); pass token ids instead")
        tail_len = max((len(s) for s in stop_strs), default=0)
        rng = np.random.default_rng(seed)
        B, T0 = rows.shape
        out = np.empty((B, T0 + max_new_tokens), dtype=np.int32)
        out[:, :T0] = rows
        n = T0
        text_tail = b""   # the last bytes generated, enough to see a stop string end
        was_training = self.training
        self.eval()
        try:
            self._begin_generation(min(T0 + max_new_tokens, self.config.block_size), B)
            for _ in range(max_new_tokens):
                logits = self._next_logits(out[:, :n])
                for b in range(B):
                    out[b, n] = sample_logits(logits[b], temperature, top_k, rng, top_p)
                n += 1
                nxt = int(out[0, n - 1])
                if on_token is not None:
                    on_token(nxt)
                if nxt in stop_ids:
                    break
                if stop_strs:
                    text_tail = (text_tail + self.tokenizer.token_bytes(nxt))[-(tail_len + 64):]
                    if any(s in text_tail for s in stop_strs):
                        break
        finally:
            self.train(was_training)
            self.tape.reset()
        return out[0, :n].copy() if single else out[:, :n]


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse generation settings that would be ignored or fail deep inside (ValueError)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float, np.number)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None (no limit), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_logits(logits: np.ndarray, temperature: float, top_k: Optional[int], rng: np.random.Generator,
                  top_p: Optional[float] = None) -> int:
    """One token id from a row of logits: greedy at temperature 0, else softmax(logits/T)
    restricted to the top_k largest, then to the top_p nucleus. A row with a NaN or an
    infinity (broken weights, an overflow) raises instead of returning an arbitrary id."""
    if not np.all(np.isfinite(logits)):
        bad = int(np.count_nonzero(~np.isfinite(logits)))
        raise FloatingPointError(f"the model produced {bad} non-finite logits (NaN or inf) for the next token: "
                                 "its weights or activations are broken; nothing was sampled")
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = np.exp(z - z.max())
    p = z / z.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, top_p)) + 1   # smallest prefix with mass >= top_p
        mask = np.zeros(p.size, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
