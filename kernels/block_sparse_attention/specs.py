"""Named problem shapes shared by the kernel tests and ``experiments/benchmarks/bench_attention.py``.

A spec fixes shapes, dtype and how the plan is drawn; ``make_inputs`` builds q/k/v, a plan and an output
cotangent from one PRNG key, so a test and a benchmark with the same name look at the same problem. Plans are
random but realistic: each query group picks ``selected`` distinct earlier regions (fewer when fewer exist:
early groups are dense), and ``ragged`` drops a random share of the entries to ``-1``.
"""

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan

__all__ = ["SPECS", "AttentionSpec", "get_spec", "random_plan", "useful_flops"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """One block-sparse attention problem. ``per_kv_selection``: plan axis P = K (else P = N)."""

    name: str
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    selected: int
    merge: int = 1
    batch: int = 1
    dtype: str = "bfloat16"
    per_kv_selection: bool = True
    include_local: bool = True
    causal: bool = True
    ragged: float = 0.0

    def __post_init__(self):
        for name in ("seq_len", "q_heads", "kv_heads", "head_dim", "block_size", "selected", "merge",
                     "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"AttentionSpec.q_heads={self.q_heads} must be a multiple of "
                             f"kv_heads={self.kv_heads}")
        if self.seq_len % (self.block_size * self.merge):
            raise ValueError(f"AttentionSpec.seq_len={self.seq_len} must be a multiple of block_size*merge="
                             f"{self.block_size * self.merge}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"AttentionSpec.dtype={self.dtype!r}; allowed: {sorted(_DTYPES)}")
        if not 0.0 <= self.ragged < 1.0:
            raise ValueError(f"AttentionSpec.ragged={self.ragged} must be in [0, 1)")

    @property
    def num_groups(self) -> int:
        return self.seq_len // (self.block_size * self.merge)

    @property
    def sel_heads(self) -> int:
        return self.kv_heads if self.per_kv_selection else self.q_heads

    def make_inputs(self, key):
        """``(q, k, v, plan, do)``: standard-normal tensors in ``dtype`` and a random plan."""
        kq, kk, kv, kp, kd = jax.random.split(key, 5)
        dt = _DTYPES[self.dtype]
        qshape = (self.batch, self.seq_len, self.q_heads, self.head_dim)
        kshape = (self.batch, self.seq_len, self.kv_heads, self.head_dim)
        q = jax.random.normal(kq, qshape, dt)
        k = jax.random.normal(kk, kshape, dt)
        v = jax.random.normal(kv, kshape, dt)
        return q, k, v, random_plan(kp, self), jax.random.normal(kd, qshape, dt)


def random_plan(key, spec: AttentionSpec) -> SelectionPlan:
    """Each group selects ``spec.selected`` distinct random earlier regions (all of them when fewer exist)."""
    b, p, q, m, merge = spec.batch, spec.sel_heads, spec.num_groups, spec.selected, spec.merge
    r = q * merge

    def one_group(args):
        g, gkey = args
        start = g * merge
        own = (jnp.arange(r) >= start) & (jnp.arange(r) < start + merge)
        cand = (jnp.arange(r) < start) if spec.causal else ~own
        scores = jnp.where(cand, jax.random.uniform(gkey, (b, p, r)), -1.0)
        best, idx = jax.lax.top_k(scores, min(m, r))  # top_k needs k <= R; the row is padded back to M
        keep = best >= 0.0
        if spec.ragged:
            keep &= jax.random.uniform(jax.random.fold_in(gkey, 1), idx.shape) >= spec.ragged
        row = jnp.pad(jnp.where(keep, idx, r), ((0, 0), (0, 0), (0, m - idx.shape[-1])), constant_values=r)
        return jnp.sort(row, axis=-1)  # ascending, padding last

    keys = jax.random.split(key, q)
    regions = jnp.moveaxis(jax.lax.map(one_group, (jnp.arange(q), keys), batch_size=min(q, 64)), 0, 2)
    regions = jnp.where(regions == r, -1, regions).astype(jnp.int32)
    return SelectionPlan(regions, block_size=spec.block_size, merge=merge, causal=spec.causal,
                         include_local=spec.include_local)


def useful_flops(plan: SelectionPlan, q_heads: int, head_dim: int) -> float:
    """Forward matmul FLOPs of the attended blocks only (2 matmuls x 2 FLOPs per MAC).

    Selected regions count ``L x W`` scores per group and head; the causal local block counts half of its
    ``L x L`` square, the convention dense causal figures use. Multiply by 3.5 for forward + backward.
    """
    p = plan.kv_regions.shape[1]
    lt = plan.group_tokens
    selected_keys = float(plan.attended_tokens().sum()) * (q_heads // p)  # summed over batch, groups, heads
    flops = 4.0 * head_dim * lt * selected_keys
    if plan.include_local:
        local = lt * lt * (0.5 if plan.causal else 1.0)
        flops += 4.0 * head_dim * local * plan.kv_regions.shape[0] * plan.num_groups * q_heads
    return flops


def _h100(name, seq_len, **kw):
    return AttentionSpec(name=name, seq_len=seq_len, q_heads=32, kv_heads=8, head_dim=128, block_size=128,
                         selected=16, **kw)


SPECS: dict[str, AttentionSpec] = {s.name: s for s in (
    # CPU interpret-mode tests: tiny, float32 so comparisons can be tight.
    AttentionSpec(name="tiny_g4_h64_w64", seq_len=512, q_heads=4, kv_heads=1, head_dim=64, block_size=64,
                  selected=3, dtype="float32", ragged=0.3),
    AttentionSpec(name="tiny_g1_h128_w128", seq_len=512, q_heads=2, kv_heads=2, head_dim=128, block_size=128,
                  selected=2, dtype="float32"),
    AttentionSpec(name="tiny_g8_merge2_per_head", seq_len=256, q_heads=8, kv_heads=1, head_dim=64,
                  block_size=32,
                  merge=2, selected=2, dtype="float32", per_kv_selection=False, ragged=0.3),
    AttentionSpec(name="tiny_no_local", seq_len=256, q_heads=4, kv_heads=2, head_dim=64, block_size=32,
                  selected=2, dtype="float32", include_local=False, ragged=0.5),
    AttentionSpec(name="tiny_noncausal_g2", seq_len=256, q_heads=4, kv_heads=2, head_dim=32, block_size=32,
                  selected=3, dtype="float32", causal=False, ragged=0.3),
    # The widest head and largest GQA group users have (H = 256, G = 16), two batch rows.
    AttentionSpec(name="tiny_g16_h256_b2", seq_len=128, q_heads=16, kv_heads=1, head_dim=256, block_size=32,
                  selected=2, batch=2, dtype="float32", ragged=0.3),
    # GPU: correctness at a realistic tile count, then the benchmark shapes.
    _h100("gpu_check_8k", 8192, ragged=0.2),
    _h100("h100_16k", 16384),
    _h100("h100_64k", 65536),
    _h100("h100_128k", 131072),
    _h100("h100_1m", 1048576),
    # Llama-2-7B's attention (multi-head: G = 1) at the 32K training length of the model benchmark.
    AttentionSpec(name="llama2_7b_32k", seq_len=32768, q_heads=32, kv_heads=32, head_dim=128, block_size=128,
                  selected=16),
)}


def get_spec(name: str) -> AttentionSpec:
    if name not in SPECS:
        raise ValueError(f"unknown spec {name!r}; known: {sorted(SPECS)}")
    return SPECS[name]
