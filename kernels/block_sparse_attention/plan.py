"""The selection plan: which KV regions each group of queries attends to.

A plan is the contract between selection (``selmerge_jax.attention.selection`` builds it) and the block-sparse
attention op (the reference and the Pallas kernels consume it). Shape letters follow ``selmerge_jax.typing``.

Layout of the sequence as the plan sees it::

    tokens   |<------------------------ T = Q * merge * W ------------------------->|
    regions  | r0 | r1 | r2 | ...                                                     |   W tokens each
    groups   |<- group 0: merge regions ->|<- group 1 ->| ...                         |   Q groups

For query group ``q`` (regions ``[q*merge, (q+1)*merge)``), the plan lists up to ``M`` KV region indices in
``kv_regions[b, p, q, :]``. Queries of the group attend

* fully to every token of each listed region (the "selected" part), and
* to the group's own ``merge`` regions (the "local" block), causally when ``causal`` (bottom-right aligned:
  query token t of the group sees local tokens <= t), fully otherwise; skipped when ``include_local=False``.

An entry is *valid* iff ``0 <= idx < R``, it is not inside the group's own local regions, and (when
``causal``) it lies strictly before the group: ``idx < q*merge``. Invalid entries (``-1`` is the canonical
padding) are ignored; their K/V are never read. With ``include_local=False`` the keys are another sequence (a
ring step visiting another shard), so entries inside the group's own index range are valid too. Rows may hold
fewer valid entries than ``M`` (ragged plans). Valid entries must be distinct: a region listed twice is
attended twice. Ordering inside a row does not change the result.

Packed documents: with ``segment_ids`` ``int [B, T]`` (an optional argument of the op, not part of the plan)
a query token additionally sees only keys of its own segment, in the selected regions and in the local block
alike; a query whose every attended key is masked attends to nothing (output 0, LSE ``-inf``).

The selection axis ``P`` equals ``N`` (one selection per query head) or ``K`` (one per kv head, shared by its
``G`` query heads: what GQA-native kernels and caches want); with ``N == K`` the two coincide.
"""

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.typing import Array, Int
from selmerge_jax.validation import check_value_shape

__all__ = ["SelectionPlan", "check_plan_inputs", "check_segment_ids", "dense_causal_plan"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionPlan:
    """Per batch, selection head and query group: the KV regions to attend (see module docstring).

    Attributes:
      kv_regions: ``int32 [B, P, Q, M]`` region indices, ``-1`` for padding.
      block_size: ``W``, tokens per region.
      merge: query regions per query group.
      causal: causal local block and "strictly earlier" validity rule.
      include_local: attend the group's own regions (turn off for a ring step visiting another shard).
    """

    kv_regions: Int[Array, "B P Q M"]
    block_size: int = dataclasses.field(metadata=dict(static=True))
    merge: int = dataclasses.field(metadata=dict(static=True))
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    include_local: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def __post_init__(self):
        for name in ("block_size", "merge"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SelectionPlan.{name} must be a positive int, got {value!r}")

    @property
    def num_groups(self) -> int:
        return self.kv_regions.shape[2]

    @property
    def max_selected(self) -> int:
        return self.kv_regions.shape[3]

    @property
    def group_tokens(self) -> int:
        return self.block_size * self.merge

    @property
    def num_regions(self) -> int:
        return self.num_groups * self.merge

    def valid_mask(self) -> jax.Array:
        """``bool [B, P, Q, M]``: which entries are valid under the rule in the module docstring."""
        idx = self.kv_regions
        start = (jnp.arange(self.num_groups, dtype=idx.dtype) * self.merge)[None, None, :, None]
        in_range = (idx >= 0) & (idx < self.num_regions)
        in_local = (idx >= start) & (idx < start + self.merge)
        # Without the local block the keys belong to another shard: its region q*merge is not "local".
        ok = in_range & ~in_local if self.include_local else in_range
        return ok & (idx < start) if self.causal else ok

    def attended_tokens(self) -> jax.Array:
        """``int32 [B, P, Q]``: tokens attended per query group from the selected part (local excluded)."""
        return self.valid_mask().sum(-1).astype(jnp.int32) * self.block_size


def check_plan_inputs(q, k, v, plan: SelectionPlan, *, value_dim: bool = False) -> tuple[int, int]:
    """Validates q/k/v against a plan; returns ``(K, G)``. Raises ValueError/TypeError naming the argument.

    ``value_dim``: v may be ``[B, S, K, Hv]`` with a head dim of its own (the reference and ``api`` take it;
    the kernels see equal head dims, ``api`` pads); otherwise v must have k's shape.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be rank 4 ([B, T, N, H] / [B, S, K, H]), got shape {x.shape}")
    check_value_shape(k, v, value_dim)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, n, h = q.shape
    bk, s, kh, hk = k.shape
    if bk != b or hk != h:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim")
    if s != t:
        raise ValueError(f"block-sparse attention is self-attention: q length {t} != k length {s}")
    if kh <= 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
    if t != plan.num_groups * plan.group_tokens:
        raise ValueError(
            f"q length {t} != plan groups {plan.num_groups} x merge {plan.merge} x "
            f"block_size {plan.block_size}"
        )
    pb, p = plan.kv_regions.shape[:2]
    if pb != b or p not in (n, kh):
        raise ValueError(f"plan.kv_regions {plan.kv_regions.shape} must be [B={b}, P "
                         f"in (N={n}, K={kh}), Q, M]")
    if not jnp.issubdtype(plan.kv_regions.dtype, jnp.integer):
        raise TypeError(f"plan.kv_regions must be integer, got {plan.kv_regions.dtype}")
    return kh, n // kh


def check_segment_ids(segment_ids, q) -> None:
    """``segment_ids`` must be None or an integer ``[B, T]`` array matching q ``[B, T, N, H]``."""
    if segment_ids is None:
        return
    shape, dtype = jnp.shape(segment_ids), jnp.result_type(segment_ids)
    if shape != q.shape[:2] or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids={shape} {dtype}: must be an integer array of shape [B, T]="
                         f"{tuple(q.shape[:2])}")


def dense_causal_plan(batch: int, heads: int, seq_len: int, block_size: int, merge: int = 1) -> SelectionPlan:
    """The plan that selects every earlier region: block-sparse attention with it equals dense causal."""
    group_tokens = block_size * merge
    if seq_len % group_tokens:
        raise ValueError(f"seq_len={seq_len} must be a multiple of block_size*merge={group_tokens}")
    num_groups = seq_len // group_tokens
    m = max((num_groups - 1) * merge, 1)
    idx = jnp.arange(m, dtype=jnp.int32)[None, :]
    start = (jnp.arange(num_groups, dtype=jnp.int32) * merge)[:, None]
    regions = jnp.where(idx < start, idx, -1)
    regions = jnp.broadcast_to(regions, (batch, heads, num_groups, m))
    return SelectionPlan(regions, block_size=block_size, merge=merge, causal=True)
