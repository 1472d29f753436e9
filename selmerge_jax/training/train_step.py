"""A jitted train step on ``nnx.split`` state: next-token loss, grad accumulation, bf16 compute, optax update.

The model lives as ``(graphdef, TrainState)``: ``params`` are the trainable variables (all ``nnx.Param`` or
only the LoRA adapters), ``rest`` everything else (a frozen base, RNG counters). Every step is a pure function
of ``(state, batch)``, so the step, the optimizer and the RNG all live in one pytree that a checkpoint saves
and restores bit-for-bit.

Batches are dicts of host or device arrays: either ``tokens int[B, T+1]`` (inputs are ``tokens[:, :-1]``,
targets ``tokens[:, 1:]``) or ``inputs``/``targets int[B, T]`` (the grain pipeline's format); optional
``loss_mask`` (or ``mask``) ``[B, T]`` (1 = count the target in the loss; other values weight it), and
``positions``/``segment_ids`` ``int[B, T]``, which are handed to the model (e.g. CRD NTK's cycled positions,
packed-document masking).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.extend
import jax.numpy as jnp
import optax
from flax import nnx

from selmerge_jax.validation import check_choice, check_positive_int

# optax.global_norm is deprecated in newer optax; older releases only have it.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

__all__ = [
    "HiddenStates",
    "StepContext",
    "TrainState",
    "chunked_cross_entropy",
    "default_forward",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "split_batch",
    "token_cross_entropy",
    "trainable_filter",
]



class StepContext(NamedTuple):
    """What a forward may need besides the batch: the optimizer step (traced) and a key unique to this step
    and micro-batch (e.g. CRD NTK's stage and random offsets), both replayed exactly on resume."""

    step: jax.Array
    key: jax.Array


class HiddenStates(NamedTuple):
    """What a forward may return instead of logits: final hidden states ``[B, T, D]`` and the output head
    ``head(h [b, c, D]) -> float32 logits [b, c, V]``, so the loss never holds full-length logits
    (``chunked_cross_entropy``)."""

    h: jax.Array
    head: Callable[[jax.Array], jax.Array]  # traced once per call: a pure function of h, one array out


# (model, {"tokens", ...}, ctx) -> logits [B, T, V] or HiddenStates
Forward = Callable[[nnx.Module, dict, StepContext], "jax.Array | HiddenStates"]
DEFAULT_LOSS_CHUNK = 4096  # tokens per cross-entropy chunk: 4096 x 128K vocab x 4 B = 2 GiB of f32 logits


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a checkpoint is exactly this pytree (plus the data state)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: Any  # nnx.State of the trainable variables (float32 master copy)
    rest: Any  # nnx.State of everything else
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw key; per-step keys are fold_in(rng, step), so resuming replays them


def trainable_filter(trainable):
    """``"all"`` -> every ``nnx.Param``; ``"lora"`` -> only ``nnx.LoRAParam``; any other NNX filter as is."""
    if not isinstance(trainable, str):
        return trainable
    if trainable == "all":
        return nnx.Param
    check_choice("trainable", trainable, ("all", "lora"))
    return nnx.LoRAParam


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, trainable="all",
                     seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, rest = nnx.split(model, trainable_filter(trainable), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"trainable={trainable!r} selects no parameters of {type(model).__name__} "
                         "(for 'lora', apply LoRA adapters to the model first)")
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, state


def split_batch(batch) -> tuple[dict, jax.Array, jax.Array]:
    """``(model_inputs, targets [B,T], mask float32 [B,T])``; model_inputs holds ``tokens`` and, when the
    batch has them, ``positions`` and ``segment_ids``."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
    if "tokens" in batch:
        tokens = batch["tokens"]
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"batch['tokens'] must be int [B, T+1] with T >= 1, got shape {tokens.shape}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    elif "inputs" in batch and "targets" in batch:
        inputs, targets = batch["inputs"], batch["targets"]
        if inputs.shape != targets.shape or inputs.ndim != 2:
            raise ValueError(f"batch inputs/targets must both be [B, T], "
                             f"got {inputs.shape} / {targets.shape}")
    else:
        raise ValueError(f"batch needs 'tokens' or 'inputs' + 'targets', got keys {sorted(batch)}")
    mask = batch.get("loss_mask", batch.get("mask"))
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if mask.shape != targets.shape:
        raise ValueError(f"batch['loss_mask'] must be {targets.shape}, got {mask.shape}")
    model_inputs = {"tokens": inputs}
    for key in ("positions", "segment_ids"):
        if batch.get(key) is not None:
            if batch[key].shape != inputs.shape:
                raise ValueError(f"batch[{key!r}] must be {inputs.shape}, got {batch[key].shape}")
            model_inputs[key] = batch[key]
    return model_inputs, targets, mask


def token_cross_entropy(logits, targets, mask) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, number of counted tokens)`` in float32; logits ``[B, T, V]``.

    A counted target (mask != 0) outside ``[0, V)`` gives a NaN loss; a masked one counts nothing, whatever
    its value (e.g. an ignore index of -100). The target's logit is picked by comparing the vocabulary index
    with the target, not gathered, so the gradient is elementwise (the one-hot is subtracted inside the
    softmax's fusion) instead of a scatter into a float32 ``[B, T, V]`` buffer and a conversion pass.
    """
    if not jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got dtype {jnp.asarray(targets).dtype}")
    logits = logits.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    targets = targets.astype(jnp.int32)
    picked = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    valid = (targets >= 0) & (targets < logits.shape[-1])
    losses = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, jnp.nan)
    return jnp.sum(jnp.where(mask != 0, losses * mask, 0.0)), jnp.sum(mask)


def chunked_cross_entropy(hidden: HiddenStates, targets, mask, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``token_cross_entropy`` of ``hidden.head(hidden.h)`` computed ``chunk`` tokens at a time.

    A ``lax.scan`` over sequence chunks that holds one chunk's float32 logits (``[B, chunk, V]``), never the
    ``[B, T, V]`` of the whole sequence (16 GiB at T = 128K with a 32K vocabulary). Under reverse-mode
    differentiation the scan computes each chunk's logits once, with the loss *and* its gradient in the
    forward pass (``_head_loss``): for the hidden states, the mask and the head's parameters, each where it is
    differentiated; the backward only scales them by the incoming cotangent. Recomputing the logits in the
    backward (``jax.checkpoint`` per chunk) ran the head's matmul twice: 14.8 ms of the 7B LoRA step at 32K
    (the 8 logits matmuls after the layers' backward in R50's kernel trace). Forward-mode differentiation
    (``jax.jvp``, Hessians) of the loss is not supported.
    """
    h = hidden.h
    b, t, _ = h.shape
    c = min(chunk, t)
    pad = -t % c
    if pad:  # padded targets carry zero weight
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // c

    def to_chunks(x):
        return x.reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)  # [n, B, c, ...]

    h_chunks = to_chunks(h)
    # The head's parameters become explicit inputs (a custom VJP may not close over what is differentiated).
    head = jax.make_jaxpr(hidden.head)(jax.ShapeDtypeStruct(h_chunks.shape[1:], h.dtype))
    out = head.out_avals
    if len(out) != 1 or out[0].ndim != 3 or out[0].shape[:2] != (b, c):
        raise ValueError(f"HiddenStates.head must map h [B, c, D] = {h_chunks.shape[1:]} to one array of "
                         f"logits [B, c, V], got {[a.str_short() for a in out]}")
    total = _head_loss(head.jaxpr, h_chunks, to_chunks(targets), to_chunks(mask), *head.consts)
    return total, jnp.sum(mask)


def _chunk_loss(jaxpr, h_c, t_c, m_c, consts):
    logits = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, list(consts)))(h_c)[0]
    return token_cross_entropy(logits, t_c, m_c)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_loss(jaxpr, h_chunks, t_chunks, m_chunks, *consts):
    """Summed loss over chunks ``[n, B, c, ...]``; the head is ``jaxpr`` applied to ``(h_c, *consts)``."""
    def body(total, xs):
        return total + _chunk_loss(jaxpr, *xs, consts), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_chunks, t_chunks, m_chunks))[0]


def _differentiated(primal) -> bool:
    return primal.perturbed and jnp.issubdtype(primal.value.dtype, jnp.inexact)


def _head_loss_fwd(jaxpr, h_chunks, t_chunks, m_chunks, *consts):
    """One pass: per chunk the loss and its gradient for a unit cotangent, for each differentiated
    (``perturbed``) input: ``dh`` and the mask's per chunk, the head parameters' summed over chunks in float32
    and stored at their own dtype."""
    want_h, want_m = _differentiated(h_chunks), _differentiated(m_chunks)
    want = [_differentiated(c) for c in consts]
    values = [c.value for c in consts]

    def body(carry, xs):
        total, acc = carry
        h_c, t_c, m_c = xs

        def loss(*diff):
            it = iter(diff)
            pick = lambda x, w: next(it) if w else x
            h, m = pick(h_c, want_h), pick(m_c, want_m)
            return _chunk_loss(jaxpr, h, t_c, m, [pick(v, w) for v, w in zip(values, want, strict=True)])

        diff = [x for x, w in ((h_c, want_h), (m_c, want_m), *zip(values, want, strict=True)) if w]
        value, vjp = jax.vjp(loss, *diff)
        grads = iter(vjp(jnp.ones((), jnp.float32)))
        dh = next(grads).astype(h_c.dtype) if want_h else None
        dm = next(grads).astype(m_c.dtype) if want_m else None
        acc = [a + d.astype(jnp.float32) for a, d in zip(acc, grads, strict=True)]
        return (total + value, acc), (dh, dm)

    acc0 = [jnp.zeros(v.shape, jnp.float32) for v, w in zip(values, want, strict=True) if w]
    xs = (h_chunks.value, t_chunks.value, m_chunks.value)
    (total, acc), (dh, dm) = jax.lax.scan(body, (jnp.zeros((), jnp.float32), acc0), xs)
    it = iter(acc)
    d_consts = [next(it).astype(_held_dtype(v.dtype)) if w else None
                for v, w in zip(values, want, strict=True)]
    return total, (dh, dm, d_consts)


def _held_dtype(dtype):
    """What a head weight's summed gradient waits in until the backward: its own dtype, except float16, whose
    range an unnormalised sum over a long sequence could overflow (float32 then)."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def _head_loss_bwd(jaxpr, res, g):
    dh, dm, d_consts = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return (None,) * (3 + len(d_consts))

    def scale(d, dtype=None):  # to the primal's dtype: a custom VJP's cotangents must match it
        return None if d is None else (d * g).astype(dtype or d.dtype)

    dtypes = [v.aval.dtype for v in jaxpr.constvars]  # the head's weights, in the order of their gradients
    return (scale(dh), None, scale(dm), *map(scale, d_consts, dtypes))


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd, symbolic_zeros=True)


def _loss_sum(out, targets, mask, loss_chunk: int):
    if isinstance(out, HiddenStates):
        return chunked_cross_entropy(out, targets, mask, loss_chunk)[0]
    return token_cross_entropy(out, targets, mask)[0]


def default_forward(model, inputs: dict, ctx: StepContext | None = None):
    """``model(tokens, **rest)``; ``rest`` = the batch's positions / segment_ids.

    A model with ``hidden_states`` and ``output_logits`` (``Llama``) returns ``HiddenStates``, so the loss is
    chunked; any other model returns its logits ``[B, T, V]``.
    """
    rest = {k: v for k, v in inputs.items() if k != "tokens"}
    if hasattr(model, "hidden_states") and hasattr(model, "output_logits"):
        return HiddenStates(model.hidden_states(inputs["tokens"], **rest)[0], model.output_logits)
    return model(inputs["tokens"], **rest)


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _micro_loss(params, rest, graphdef, micro, ctx, total_count, compute_dtype, forward, loss_chunk):
    """Summed loss of one micro-batch divided by the whole step's token count, so micro-grads simply add."""
    inputs, targets, mask = micro
    model = nnx.merge(graphdef, _cast_floating(params, compute_dtype), _cast_floating(rest, compute_dtype))
    loss_sum = _loss_sum(forward(model, inputs, ctx), targets, mask, loss_chunk)
    return loss_sum / total_count, loss_sum


def _microbatches(parts, accumulation_steps: int):
    """``[A*b, ...]`` -> ``[A, b, ...]`` for a scan over micro-batches."""
    def split(x):
        if x.shape[0] % accumulation_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                             f"accumulation_steps={accumulation_steps}")
        return x.reshape(accumulation_steps, x.shape[0] // accumulation_steps, *x.shape[1:])
    return jax.tree.map(split, parts)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, schedule: optax.Schedule | None = None,
                    accumulation_steps: int = 1, compute_dtype=jnp.float32,
                    forward: Forward = default_forward,
                    loss_chunk: int = DEFAULT_LOSS_CHUNK, donate: bool = True):
    """Returns ``step(state, batch) -> (state, metrics)``, jitted; metrics are float32 scalars.

    ``loss_chunk``: tokens per cross-entropy chunk when ``forward`` returns ``HiddenStates``.
    """
    compute_dtype = jnp.dtype(compute_dtype)
    _check_loss_chunk(loss_chunk)
    grad_fn = jax.grad(_micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        inputs, targets, mask = split_batch(batch)
        total = jnp.maximum(jnp.sum(mask), 1.0)
        micro = _microbatches((inputs, targets, mask), accumulation_steps)

        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def body(carry, xs):
            grads, loss_sum = carry
            index, mb = xs
            ctx = StepContext(state.step, jax.random.fold_in(step_key, index))
            g, ls = grad_fn(state.params, state.rest, graphdef, mb, ctx, total, compute_dtype, forward,
                            loss_chunk)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + ls), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        xs = (jnp.arange(accumulation_steps), micro)
        (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), xs)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Tokens counted, not summed weights: a weighted loss_mask (passkey answers) must not inflate
        # tokens/s.
        metrics = {"loss": loss_sum / total, "grad_norm": _global_norm(grads), "tokens": jnp.sum(mask > 0)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef, *, compute_dtype=jnp.float32, forward: Forward = default_forward,
                   loss_chunk: int = DEFAULT_LOSS_CHUNK):
    """Returns ``eval_step(state, batch) -> (loss_sum, token_count)``, jitted."""
    compute_dtype = jnp.dtype(compute_dtype)
    _check_loss_chunk(loss_chunk)

    def eval_step(state: TrainState, batch):
        inputs, targets, mask = split_batch(batch)
        model = nnx.merge(graphdef, _cast_floating(state.params, compute_dtype),
                          _cast_floating(state.rest, compute_dtype))
        ctx = StepContext(state.step, jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
        return _loss_sum(forward(model, inputs, ctx), targets, mask, loss_chunk), jnp.sum(mask)

    return jax.jit(eval_step)


def _check_loss_chunk(loss_chunk) -> None:
    check_positive_int("loss_chunk", loss_chunk)
