"""Whole-model memory planner: the device bytes of one training step, estimated before anything compiles.

A 7B model at 128K tokens either fits on one GPU or fails after minutes of compilation; this module answers
first, from the config alone. The estimate is a sum of named parts (``TrainMemory``), each a closed form:

* ``weights``: every parameter at ``param_dtype``;
* ``trainable``: the trained tensors' float32 copies: gradients and AdamW's two moments (LoRA adapters only
  for a LoRA step; every parameter for full training, plus a compute-dtype copy of the weights);
* ``saved``: what the scanned layers keep on the device for the backward pass. Under ``remat="full"`` that is
  each layer's input ``[B, T, D]`` (L of them; MS's selection plan, a few MiB, is left out); ``"offload"``
  keeps the inputs in host memory instead (none on the device); ``"save"`` also keeps what the backward
  reads (q/k/v, the attention output and its log-sum-exp, the mid-layer residual, the MLP's gate and up:
  ~86 KB a token per layer at the 7B shape); ``"dots"`` keeps every matmul output of the layer;
* ``transient``: the largest working set of one layer's recomputation and backward (q/k/v/o, the SwiGLU's
  gate/up/product and their gradients, attention's own buffers), which exists once, not per layer; with
  ``ModelConfig.mlp_chunk`` the SwiGLU's arrays are one slice's;
* ``logits``: one cross-entropy chunk of float32 logits and their gradient (``loss_chunk`` tokens).

The coefficients of ``transient`` were fitted to the measured peaks of the Llama-2-7B LoRA step on an H200 at
16K-128K (``experiments/results/model_h200``): there the transient is ~170 KB a token, (4F + qkvo + 6D) bf16
values. Against those runs the estimate is 0-15% high (Llama-3-8B +15%: its 128K vocabulary's logits), so it
refuses only what clearly does not fit.

The inference plan (``inference_memory``, used by ``generate.prefill`` before it compiles and by
``bench_inference.py`` to refuse cells) has four parts: ``weights``; ``cache``: every layer's KV cache, full
(prompt + new tokens) or compressed (``budget + slack`` slots), at bf16/fp16 or int8/int4 (with their scales),
plus the per-slot metadata (position, count, score: 12 bytes) and SnapKV's window rows; ``activations``: one
layer's prefill working set (the prompt's residual, q/k/v/o, the SwiGLU's three ``[T, F]`` arrays, the
select-and-merge region scores, a chunked or compressing prefill's ``[chunk, slots]`` probabilities);
``logits``: the last token's; ``decode``: the decode loop's second copy of the layer weights, sliced once
out of the stacked ``[L]`` axis before the loop (``Llama.layer_states``), which replaces the prefill's
activations at the peak when larger. The one-pass prefill's per-token arrays are counted as XLA plans them
on an H200 (``_PREFILL_ARRAYS``, from ``experiments/results/inference_h200``); the chunked prefill's are the
closed form.
"""

import dataclasses

from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.kvcache.prefill import KEY_CHUNK, one_shot, scored_rows
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.llama import MLP_CHUNK
from selmerge_jax.validation import check_choice, check_int

__all__ = ["InferenceMemory", "TrainMemory", "check_fits", "check_inference_fits", "inference_memory",
           "largest_fitting_prompt", "largest_fitting_seq_len", "train_memory"]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Live [B, T, F]-sized and [B, T, D]-sized arrays at the peak of one layer's backward (fitted, see docstring).
_TRANSIENT_F = 4.0
_TRANSIENT_D = 6.0
# The one-pass prefill's working set per prompt token: this many [T, width] arrays of the compute dtype for
# each width D (the residual, its normed copy), N*H (q, its rotated copy or the attention output) and K*H
# (k, v).
# Fitted to the H200 runs of experiments/results/inference_h200 (jax 0.11.2, Llama-3-8B, 32 layers): a
# 1M-token prompt into a 4K budget peaked at 48.2 GiB (this form: 55.8), 512K with a full cache at 96.9 GiB
# (this form: 101.1). The MLP's [chunk, F] slices are llama.MLP_CHUNK tokens whatever the prompt.
_PREFILL_ARRAYS = 2
_HEADROOM = 1.5 * 2**30  # allocator fragmentation, cuBLAS/cuDNN workspaces, the runtime itself


@dataclasses.dataclass(frozen=True)
class TrainMemory:
    """Estimated bytes of one training step, by part (see the module docstring)."""

    weights: int
    trainable: int
    saved: int
    transient: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.saved + self.transient + self.logits + int(_HEADROOM)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in dataclasses.asdict(self).items())
        return f"{self.total / 2**30:.1f} GiB ({parts}, headroom {_HEADROOM / 2**30:.1f})"


def _matmul_params(config: ModelConfig) -> tuple[int, int]:
    """``(per-layer params, embedding + head params)``."""
    d, h, n, k, f = config.d_model, config.head_size, config.num_heads, config.num_kv_heads, config.ffn_dim
    layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
    outer = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d
    return layer, outer


def _lora_params(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    d, h, n, k, f = config.d_model, config.head_size, config.num_heads, config.num_kv_heads, config.ffn_dim
    shapes = {"q_proj": (d, n * h), "k_proj": (d, k * h), "v_proj": (d, k * h), "o_proj": (n * h, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    per_layer = sum(rank * (a + b) for name, (a, b) in shapes.items() if name in targets)
    head = rank * (d + config.vocab_size) if "lm_head" in targets else 0
    return per_layer * config.num_layers + head


def train_memory(config: ModelConfig, *, batch: int, seq_len: int, lora_rank: int | None = 16,
                 lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 loss_chunk: int = 4096, trainable_params: int | None = None) -> TrainMemory:
    """The estimate for one step of ``batch`` sequences of ``seq_len`` tokens; ``lora_rank=None``: full
    training.

    ``trainable_params``: the number of trained parameters when it is known (a built train state); it replaces
    the count derived from ``lora_rank``/``lora_targets``.
    """
    layer, outer = _matmul_params(config)
    params = layer * config.num_layers + outer
    pbytes, abytes = _BYTES[config.param_dtype], _BYTES[config.dtype]
    weights = params * pbytes
    if lora_rank is None:
        # f32 grads + two f32 moments, and the compute-dtype copy of the weights the step casts to.
        trainable = params * (3 * 4 + (abytes if abytes != pbytes else 0))
    else:
        count = trainable_params if trainable_params is not None else _lora_params(config, lora_rank,
                                                                                   lora_targets)
        trainable = count * 4 * 4  # master, grad, two moments
    tokens = batch * seq_len
    d, f = config.d_model, config.ffn_dim
    qkvo = config.head_size * (2 * config.num_heads + 2 * config.num_kv_heads)
    qkv = config.head_size * (config.num_heads + 2 * config.num_kv_heads)
    per_layer_saved = tokens * d * abytes
    if config.remat == "offload":
        per_layer_saved = 0  # in pinned host memory
    elif config.remat == "none":
        per_layer_saved = tokens * (4 * d + qkvo + 3 * f) * abytes
    elif config.remat == "save":  # config.SAVED_NAMES + the attention output and its f32 log-sum-exp
        per_layer_saved = tokens * ((2 * d + qkv + config.num_heads * config.head_size + 2 * f) * abytes
                                    + 4 * config.num_heads)
    elif config.remat in ("dots", "dots_no_batch"):
        per_layer_saved = tokens * (d + qkvo + 3 * f) * abytes
    saved = per_layer_saved * config.num_layers
    # ModelConfig.mlp_chunk: the backward holds one slice's F-wide arrays, not the sequence's
    f_tokens = tokens if config.mlp_chunk is None else batch * min(seq_len, config.mlp_chunk)
    # fuse_projections under recompute: the q/k/v matmul's one [T, (N + 2K) H] output lives beside the q, k, v
    # taken from it (a deviceless gpu_plan.py compile of the 7B step at 128K, "full", 16K MLP slices: 56.9 ->
    # 59.99 GiB; no device has run it fused). Under "save" the plan did not grow. At 32K under "full" the H100
    # plan came out 0.27 GiB lower fused (results R55): the term errs on the side of refusing.
    fused_qkv = tokens * qkv if config.fuse_projections and config.remat in ("full", "offload") else 0
    transient = int((f_tokens * _TRANSIENT_F * f + tokens * (_TRANSIENT_D * d + qkvo) + fused_qkv) * abytes)
    logits = batch * min(loss_chunk, seq_len) * config.vocab_size * 4 * 2  # f32 logits and their gradient
    return TrainMemory(weights=weights, trainable=trainable, saved=saved, transient=transient, logits=logits)


def largest_fitting_seq_len(config: ModelConfig, capacity_bytes: int, *, batch: int = 1, multiple: int = 1024,
                            **kwargs) -> int:
    """The longest ``seq_len`` (a multiple of ``multiple``) whose estimate fits ``capacity_bytes``; 0 if
    none."""
    lo, hi = 0, multiple
    while train_memory(config, batch=batch, seq_len=hi, **kwargs).total <= capacity_bytes:
        lo, hi = hi, hi * 2
        if hi > 2**26:
            return lo
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if train_memory(config, batch=batch, seq_len=mid, **kwargs).total <= capacity_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def check_fits(config: ModelConfig, capacity_bytes: int, *, batch: int, seq_len: int,
               **kwargs) -> TrainMemory:
    """The estimate, or a ``ValueError`` naming it and the largest ``seq_len`` that fits
    ``capacity_bytes``."""
    estimate = train_memory(config, batch=batch, seq_len=seq_len, **kwargs)
    if estimate.total > capacity_bytes:
        fits = largest_fitting_seq_len(config, capacity_bytes, batch=batch, **kwargs)
        raise ValueError(f"seq_len={seq_len} (batch {batch}, {config.num_layers} layers, "
                         f"remat={config.remat!r}) "
                         f"needs an estimated {estimate.describe()}, more than the device's "
                         f"{capacity_bytes / 2**30:.1f} GiB; the largest seq_len that fits is {fits}")
    return estimate


@dataclasses.dataclass(frozen=True)
class InferenceMemory:
    """Estimated bytes of a prefill (and the decode after it), by part (see the module docstring)."""

    weights: int
    cache: int
    activations: int
    logits: int
    decode: int = 0  # the decode loop's own copy of the layer weights (``Llama.layer_states``)

    @property
    def total(self) -> int:
        # the prefill's working set and the decode loop's weight copy never coexist
        return (self.weights + self.cache + max(self.activations, self.decode) + self.logits
                + int(_HEADROOM))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in dataclasses.asdict(self).items())
        return f"{self.total / 2**30:.1f} GiB ({parts}, headroom {_HEADROOM / 2**30:.1f})"


_KV_BYTES = {"none": None, "int8": 1.0, "int4": 0.5}
PREFILLS = ("model", "cache")


def _cache_bytes(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                 compression: KVCompressionConfig | None) -> int:
    h, kv = config.head_size, config.num_kv_heads
    total = 0
    for layer in range(config.num_layers):
        if compression is None:
            slots = prompt_len + new_tokens
            per_value = float(_BYTES[config.dtype])
        else:
            slots = compression.capacity_for(prompt_len, layer)
            per_value = _KV_BYTES[compression.quant] or float(_BYTES[config.dtype])
            if compression.quant != "none":  # scales and zeros: keys per group of tokens, values per token
                per_value += 2 * 4 / compression.quant_group / 2 + 2 * 4 / h / 2
        meta = 12 + (4 * compression.obs_window if compression is not None and compression.policy == "snapkv"
                     else 0)
        total += int(batch * kv * slots * (2 * h * per_value + meta))
    return total


def inference_memory(config: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int = 1,
                     compression: KVCompressionConfig | None = None, prefill: str = "model",
                     chunk: int = 256) -> InferenceMemory:
    """The estimate for prefilling ``batch`` prompts of ``prompt_len`` tokens, then ``new_tokens`` decode
    steps. ``compression`` (a policy other than ``"none"``): budget-sized caches, each layer's prompt
    compressed at once (``kvcache.one_shot``: SnapKV) or streamed into them ``slack`` tokens at a time;
    ``prefill="model"``: one pass with the model's attention (MS or dense
    flash), ``"cache"``: ``chunk`` tokens at a time attending over the cache."""
    check_int("batch", batch, 1)
    check_int("prompt_len", prompt_len, 1)
    check_int("new_tokens", new_tokens, 0)
    check_choice("prefill", prefill, PREFILLS)
    if compression is not None and compression.policy == "none":
        compression = None
    layer, outer = _matmul_params(config)
    weights = (layer * config.num_layers + outer) * _BYTES[config.param_dtype]
    cache = _cache_bytes(config, batch, prompt_len, new_tokens, compression)
    abytes = _BYTES[config.dtype]
    d, f, h = config.d_model, config.ffn_dim, config.head_size
    n, kv = config.num_heads, config.num_kv_heads
    slots = (prompt_len + new_tokens if compression is None
             else max(compression.capacity_for(prompt_len, i) for i in range(config.num_layers)))
    if prefill == "model":
        tokens = batch * prompt_len
        # the per-token arrays above, and the MLP's three F-wide intermediates of one MLP_CHUNK-token slice
        # (llama.residual_chunked)
        working = (tokens * _PREFILL_ARRAYS * (d + n * h + kv * h) * abytes
                   + batch * min(prompt_len, MLP_CHUNK) * 3 * f * abytes)
        if config.attention == "ms":  # region-summary scores [B, P, R, R] float32
            regions = -(-prompt_len // config.ms.block_size)
            heads = kv if config.ms.selection_heads == "kv" else n
            working += batch * heads * regions * regions * 4
        if compression is not None and one_shot(compression):
            # snapkv_once: float32 [B, K, T] votes and their ranking, one key chunk of the window's logits
            window_rows = batch * n * compression.obs_window
            working += 4 * batch * kv * prompt_len * 4 + 3 * window_rows * min(prompt_len, KEY_CHUNK) * 4
        elif compression is not None:  # the scored queries' probabilities over budget + chunk slots
            rows = scored_rows(compression, compression.slack)
            working += 3 * batch * n * rows * slots * 4
    else:
        c = min(chunk, prompt_len)
        working = batch * c * (2 * d + 2 * n * h + 2 * kv * h + 3 * f) * abytes
        working += 3 * batch * n * c * slots * 4  # logits, probabilities, their product's operand
    logits = 2 * batch * config.vocab_size * 4
    decode = layer * config.num_layers * _BYTES[config.param_dtype]  # a decode follows the prefill
    return InferenceMemory(weights=weights, cache=cache, activations=int(working), logits=logits,
                           decode=decode)


def largest_fitting_prompt(config: ModelConfig, capacity_bytes: int, *, batch: int = 1, multiple: int = 1024,
                           **kwargs) -> int:
    """The longest prompt (a multiple of ``multiple``) whose :func:`inference_memory` fits; 0 if none."""
    fits = lambda t: inference_memory(config, batch=batch, prompt_len=t, **kwargs).total <= capacity_bytes
    lo, hi = 0, multiple
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**27:
            return lo
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_inference_fits(config: ModelConfig, capacity_bytes: int, *, batch: int, prompt_len: int,
                         **kwargs) -> InferenceMemory:
    """The estimate, or a ``ValueError`` naming it and the largest prompt that fits ``capacity_bytes``."""
    estimate = inference_memory(config, batch=batch, prompt_len=prompt_len, **kwargs)
    if estimate.total > capacity_bytes:
        fits = largest_fitting_prompt(config, capacity_bytes, batch=batch, **kwargs)
        compression = kwargs.get("compression")
        kind = ("a full cache" if compression is None or compression.policy == "none"
                else f"a {compression.policy} cache of budget {compression.budget_for(prompt_len)}")
        raise ValueError(f"prompt_len={prompt_len} (batch {batch}, {config.num_layers} layers, {kind}) needs "
                         f"an estimated {estimate.describe()}, more than the device's "
                         f"{capacity_bytes / 2**30:.1f} GiB; the largest prompt that fits is {fits} tokens")
    return estimate
