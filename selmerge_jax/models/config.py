"""``ModelConfig``: the frozen description of a Llama/Mistral-family decoder, with named presets.

One dataclass covers Llama 2, Llama 3 and Mistral shapes: they differ only in GQA head counts, vocabulary,
RoPE rule and Mistral's sliding window. Dtypes are stored as names (``"float32"``, ``"bfloat16"``) so configs
stay hashable (they are static arguments of jitted functions) and print/serialise cleanly.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.layers.attention import DENSE_KERNELS, AttentionSpec
from selmerge_jax.positional import RopeConfig
from selmerge_jax.validation import check_choice, check_positive_int, check_positive_number, fail

__all__ = ["PRESETS", "ModelConfig", "parameter_shape_changes", "preset"]

AttentionKind = Literal["dense", "ms", "ring", "ring_ms"]
RematPolicy = Literal["none", "full", "save", "dots", "dots_no_batch", "offload"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ATTENTION = ("dense", "ms", "ring", "ring_ms")

# What a layer's backward reads, named in the model (llama.py, layers/attention.py, attention/ms.py): the
# attention inputs after RoPE, the selection plan, the residual stream between attention and MLP, the MLP's
# gate and up projections. With these and the attention kernels' own outputs saved, the backward recomputes
# only norms, elementwise work and the rank-r LoRA products, never a d x d matmul or an attention.
SAVED_NAMES = ("attn_q", "attn_k", "attn_v", "ms_plan", "attn_mid", "mlp_gate", "mlp_up",
               "attn_kernel_out", "attn_kernel_lse")  # the last two: kernels' _common.RESIDUAL_NAMES
# cuDNN flash's forward (jax.nn.dot_product_attention, implementation="cudnn"), whose outputs (out and
# log-sum-exp) are its backward's residuals; it names nothing, so the policy knows it by primitive. The
# project's kernels name theirs (the last two SAVED_NAMES).
_ATTENTION_KERNELS = ("dot_product_attention_fwd_wrapper",)


def _save_policy(prim, *_, **params) -> bool:
    """``remat="save"``: the outputs of matmuls and attention that the backward needs (``SAVED_NAMES``)."""
    if prim.name == "name":
        return params["name"] in SAVED_NAMES
    return prim.name in _ATTENTION_KERNELS


# remat policies ModelConfig.mlp_chunk accepts: the layer's policy applies inside the slices' loop too, so
# each runs the same matmuls sliced. Without remat every slice's residuals are kept anyway and the slices add
# buffers (CPU, a 2-layer F = 4096 model at 1K tokens: 395 -> 431 MB of temporaries), so "none" is refused.
MLP_CHUNK_REMATS = ("full", "offload", "save", "dots", "dots_no_batch")

# "full" and "offload" keep one thing on the device besides the layer input ("offload" moves that to the
# host): MS's selection plan (int32 region indices, ~2 MiB a layer for the 7B shape at 128K tokens against the
# layer input's 1 GiB). Without it the backward's recomputed forward scores every region again only to
# rebuild the same integers. Only attention="ms" with position_mode "before_selection" or "selected_original"
# names its plan (ring_ms and "selected_compact" do not, so they re-score as before); dense names nothing.
_PLAN_ONLY = ("ms_plan",)

_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.save_only_these_names(*_PLAN_ONLY),
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Like "full", but each layer's input [B, T, D] (the scan's saved carry, L of them) lives in pinned host
    # memory between forward and backward: at 128K tokens that is 32 GiB off a 7B model's device peak.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=_PLAN_ONLY, names_which_can_be_offloaded=("layer_input",),
        offload_src="device", offload_dst="pinned_host"),
    "save": _save_policy,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes, numerics and attention choice of a decoder-only Llama/Mistral-family transformer.

    Attributes:
      vocab_size: V.
      d_model: D, residual width (HF ``hidden_size``).
      num_layers: L.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads (GQA when K < N); must divide N.
      head_dim: H; default ``d_model // num_heads``.
      ffn_dim: SwiGLU hidden width (HF ``intermediate_size``).
      norm_eps: RMSNorm epsilon.
      rope: the RoPE rule and its scaling (``selmerge_jax.positional.RopeConfig``).
      max_seq_len: HF ``max_position_embeddings``; informational except for rules that read it.
      sliding_window: Mistral's window (a query sees itself and the ``sliding_window - 1`` keys before it).
      tie_embeddings: the output projection reuses the input embedding (no ``lm_head`` parameter).
      attention_bias: biases on q/k/v/o projections (HF ``attention_bias``).
      attention: ``"dense"`` (kernel ``dense_kernel``), ``"ms"`` (select-and-merge, ``ms`` below), or their
        sequence-parallel versions ``"ring"`` / ``"ring_ms"`` (``selmerge_jax.sharding``, same results).
        Every kind goes through ``selmerge_jax.layers.attend``, which honours ``ms.position_mode``.
      ms: the select-and-merge configuration used when ``attention == "ms"``.
      ms_kernel: ``"reference"`` (pure-JAX block-sparse op) or ``"pallas"`` (best kernel, falls back).
      dense_kernel: dense attention's kernel: ``"auto"`` (cuDNN flash on a GPU with bf16/fp16 activations, XLA
        otherwise), ``"cudnn"`` (an error where unavailable) or ``"xla"`` (materialises ``T x T`` scores).
      sequence_axis: mesh axis that ``attention="ring"`` (dense) / ``"ring_ms"`` shard the sequence over; the
        mesh is the ambient one (``with jax.set_mesh(mesh):``), the batch goes over its other axes.
      param_dtype: storage dtype of parameters (f32 master weights by default).
      dtype: compute dtype of activations and matmuls (e.g. ``"bfloat16"``); norms and softmax stay f32.
      remat: per-layer rematerialisation: ``none``, ``full`` (save each layer's input, and MS's selection
        plan where it is named, see ``_PLAN_ONLY``), ``offload`` (as
        full, with the layer inputs in pinned host memory; GPU/TPU), ``save`` (save what the backward reads,
        ``SAVED_NAMES`` and the attention kernels' outputs: no matmul or attention runs twice, at ~86 KB per
        token per layer for a 7B MHA model), ``dots`` or ``dots_no_batch``.
      mlp_chunk: tokens per slice of each layer's MLP block (post-attention norm, SwiGLU, residual add) in a
        forward without a KV cache, None for the whole sequence at once. Each slice runs under the layer's
        remat policy, so the backward of ``remat="full"``/``"offload"`` holds one slice's ``[B, c, F]``
        intermediates instead of the sequence's (the 7B shape at 128K tokens: four ``[T, F]`` bf16 arrays,
        10.7 GiB, become 1.3 GiB at 16K-token slices) with the same matmuls. ``"save"`` and the ``"dots"``
        policies keep gate/up for the whole sequence, so less comes back there. Refused without remat
        (``MLP_CHUNK_REMATS``) and with ring attention, whose sequence axis is sharded over devices (a loop
        over its slices would move them between devices; each device holds ``T / devices`` tokens already).
        Trained MLP weights in a bfloat16 step get their gradient summed over the slices in bfloat16 (a
        LoRA step on the attention projections has none).
      fuse_projections: compute q/k/v as one matmul over their kernels side by side, and gate/up as one
        (``llama.project_together``): wider GEMMs, and one dX GEMM each in the backward instead of a sum of
        three or two. Parameters, checkpoints and HF names are unchanged; results equal the unfused model's
        up to the matmuls' summation order. Training/scoring path only (a KV-cache forward runs unfused).
        Under ``remat="full"`` the fused q/k/v output adds a ``[T, (N + 2K) H]`` buffer (the planner counts
        it). Measured on an H100 it gains at most 0.4% (results R55: the GEMM and copy time it saves goes
        mostly to more fusion time, concatenations among it), so it stays off.
      init_std: std of the normal initialiser of every matrix (HF ``initializer_range``).
      bos_token_id, eos_token_id: special ids carried to and from HF ``config.json``.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_seq_len: int = 4096
    sliding_window: int | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    attention: AttentionKind = "dense"
    ms: MSAttentionConfig = dataclasses.field(default_factory=MSAttentionConfig)
    ms_kernel: Literal["reference", "pallas"] = "reference"
    dense_kernel: Literal["auto", "xla", "cudnn"] = "auto"
    sequence_axis: str = "seq"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: RematPolicy = "none"
    mlp_chunk: int | None = None
    fuse_projections: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
                     "max_seq_len"):
            check_positive_int(f"ModelConfig.{name}", getattr(self, name))
        for name in ("head_dim", "sliding_window", "mlp_chunk"):
            check_positive_int(f"ModelConfig.{name}", getattr(self, name), allow_none=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}; "
                             "set head_dim explicitly")
        if self.head_size % 2:
            raise ValueError(f"ModelConfig head dim {self.head_size} must be even for RoPE")
        for name in ("norm_eps", "init_std"):
            check_positive_number(f"ModelConfig.{name}", getattr(self, name))
        self._check_choices()

    def _check_choices(self):
        check_choice("ModelConfig.attention", self.attention, _ATTENTION)
        if self.attention != "dense" and self.sliding_window is not None:
            raise ValueError(f"ModelConfig: attention={self.attention!r} with "
                             "sliding_window set is not supported; "
                             "set sliding_window=None (only dense attention has a window)")
        if not isinstance(self.sequence_axis, str) or not self.sequence_axis:
            raise ValueError(f"ModelConfig.sequence_axis must be a mesh axis name, "
                             f"got {self.sequence_axis!r}")
        check_choice("ModelConfig.ms_kernel", self.ms_kernel, ("reference", "pallas"))
        check_choice("ModelConfig.dense_kernel", self.dense_kernel, DENSE_KERNELS)
        for name in ("param_dtype", "dtype"):
            check_choice(f"ModelConfig.{name}", getattr(self, name), _DTYPES)
        check_choice("ModelConfig.remat", self.remat, _REMAT)
        if not isinstance(self.fuse_projections, bool):
            fail("ModelConfig.fuse_projections", self.fuse_projections, "a bool", "True, False")
        if self.mlp_chunk is not None and self.remat not in MLP_CHUNK_REMATS:
            raise ValueError(f"ModelConfig.mlp_chunk={self.mlp_chunk} needs remat in {MLP_CHUNK_REMATS}, got "
                             f"remat={self.remat!r}: without remat every slice's intermediates are kept, so "
                             "slicing frees nothing and adds buffers; set mlp_chunk=None or a remat policy")
        if self.mlp_chunk is not None and self.attention in ("ring", "ring_ms"):
            raise ValueError(f"ModelConfig.mlp_chunk={self.mlp_chunk} with attention={self.attention!r}: the "
                             f"sequence axis is sharded over {self.sequence_axis!r}, and a loop over its "
                             "slices would move them between devices; set mlp_chunk=None")
        if not isinstance(self.rope, RopeConfig) or not isinstance(self.ms, MSAttentionConfig):
            raise TypeError(f"ModelConfig.rope must be a RopeConfig and .ms an MSAttentionConfig, got "
                            f"{type(self.rope).__name__} and {type(self.ms).__name__}")

    @property
    def attention_spec(self) -> AttentionSpec:
        """What every layer's ``layers.attend`` computes (kind, MS config, kernels, window, ring axis)."""
        return AttentionSpec(kind=self.attention, ms=self.ms, ms_kernel=self.ms_kernel,
                             dense_kernel=self.dense_kernel, window=self.sliding_window,
                             sequence_axis=self.sequence_axis)

    @property
    def head_size(self) -> int:
        """H, the head dim (explicit or ``d_model // num_heads``)."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def remat_policy(self):
        """The ``jax.checkpoint`` policy for ``remat`` (None when ``remat == "none"``)."""
        return _REMAT[self.remat]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids as a tuple (Llama 3 checkpoints list several)."""
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def _tiny() -> ModelConfig:
    # Byte-level vocab (259 ids, see data/tokenizer.py); small enough for CPU tests, GQA on, long context.
    return ModelConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=176,
                       max_seq_len=32768,
                       ms=MSAttentionConfig(block_size=16, top_k=4, selection_source="previous",
                                            selection_heads="kv"))


def _llama2_7b() -> ModelConfig:
    return ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       ffn_dim=11008, norm_eps=1e-5, max_seq_len=4096)


def _mistral_7b() -> ModelConfig:
    # Mistral-7B-v0.1 shapes: GQA 32/8 and a 4096-token sliding window.
    return ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       ffn_dim=14336, norm_eps=1e-5, max_seq_len=32768, sliding_window=4096)


def _llama3_8b() -> ModelConfig:
    return ModelConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       ffn_dim=14336, norm_eps=1e-5, max_seq_len=8192, rope=RopeConfig(theta=500000.0),
                       bos_token_id=128000, eos_token_id=128001)


def _llama32_1b() -> ModelConfig:
    # Llama-3.2-1B shapes (tied embeddings); its RoPE scaling rule is left at plain RoPE (random-weight
    # benchmarks).
    return ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                       head_dim=64,
                       ffn_dim=8192, norm_eps=1e-5, max_seq_len=131072, rope=RopeConfig(theta=500000.0),
                       tie_embeddings=True, bos_token_id=128000, eos_token_id=128001)


PRESETS = {"tiny": _tiny, "llama2-7b": _llama2_7b, "mistral-7b": _mistral_7b, "llama3-8b": _llama3_8b,
           "llama3.2-1b": _llama32_1b}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (``tiny``, ``llama2-7b``, ``mistral-7b``, ``llama3-8b``, ``llama3.2-1b``) with field
    overrides applied."""
    check_choice("preset", name, PRESETS)
    return PRESETS[name]().replace(**overrides)


_SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "head_size",
                 "tie_embeddings", "attention_bias")


def parameter_shape_changes(old: ModelConfig, new: ModelConfig) -> dict:
    """``{field: (old, new)}`` for the fields that change parameter shapes; empty when weights carry over."""
    return {f: (getattr(old, f), getattr(new, f)) for f in _SHAPE_FIELDS
            if getattr(old, f) != getattr(new, f)}
