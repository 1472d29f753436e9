"""The block-sparse attention backends' shared test base (tokamax ``test_base`` style).

Every backend test file (``test_kernels_triton.py``, ``test_kernels_mosaic_gpu.py``, ``test_kernels_tpu.py``)
subclasses ``BackendCases`` with a ``Backend`` adapter and so runs the same cases, in interpret mode on CPU,
against the pure-jnp reference:

* ``test_forward`` / ``test_gradients``: out and LSE, then dQ/dK/dV (with an LSE cotangent too: merging
  partial results differentiates it) on every problem of ``PROBLEMS`` the backend supports;
* ``test_gqa``: on the problems in ``GQA`` (G > 1), the same outputs equal the reference of the MHA problem
  with each kv head repeated G times (dK/dV summed over the group);
* ``test_deterministic``: a second run of the same executable is bitwise equal (problems in ``DETERMINISM``);
* ``test_nan_in_padding``: NaN in what nobody may read stays out of every real output (problems with padding:
  NaN K/V in regions no group selected, or a NaN query group appended as sequence padding);
* ``test_declines``: every problem the backend does not support raises ``NotImplementedError`` (so dispatch
  falls through) with the reason the adapter names; the matrix is total, nothing is silently skipped;
* ``test_dispatch_declines_off_platform_and_falls_back``: off its platform the backend declines through
  ``block_sparse_attention`` and ``(name, "xla")`` falls back to the reference.

Interpret-mode cost is almost all compilation for the Pallas interpreter (one program per kernel) and, for
Mosaic GPU, simulation (several seconds per simulated CTA). So one jitted function returns the output, LSE and
the three gradients, it runs once per (backend, problem) and every test reads that cached run, and the tests
of one problem are grouped (class-scoped parametrisation) so an xdist worker tends to get them together.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
)
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec, get_spec

NAMES = ("out", "lse", "dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A spec drawn with ``seed``, then edited.

    Attributes:
      empty_rows: ``(b, p, g)`` plan rows set to all padding (-1).
      nan_unselected: NaN K/V in every region no group selected (region 0 excepted: the reference gathers it
        for padding entries, then masks it). Only meaningful without the local block.
      nan_tail: one query group of NaN q/k/v/dO appended after the sequence (padding; its plan row selects
        nothing). Causal, so the real part must equal the reference of the problem without the tail.
      short_rows: batch rows whose last query group is padding (ragged lengths in one batch): NaN q/k/v/dO
        there and an empty plan row. Their padded tokens' outputs are not compared (zeroed on both sides);
        the reference runs with that padding zeroed.
      rel: tolerance relative to the largest reference magnitude (bf16 problems); else ``rtol = atol = tol``.
    """

    name: str
    spec: AttentionSpec
    seed: int = 0
    empty_rows: tuple[tuple[int, int, int], ...] = ()
    nan_unselected: bool = False
    nan_tail: bool = False
    short_rows: tuple[int, ...] = ()
    tol: float = 2e-5
    rel: float | None = None

    @property
    def gqa(self) -> int:
        return self.spec.q_heads // self.spec.kv_heads

    @property
    def has_padding(self) -> bool:
        return self.nan_unselected or self.nan_tail or bool(self.short_rows)

    @property
    def tolerance(self) -> dict:
        return {"tol": self.tol, "rel": self.rel}


def _mosaic_family(g, w, t, kv_heads=2, **kw):
    """The shapes all three backends take (Mosaic GPU: bf16, H = 64, W in {64, 128}, P = K, causal, local)."""
    return AttentionSpec(name="bf16", seq_len=t, q_heads=kv_heads * g, kv_heads=kv_heads, head_dim=64,
                         block_size=w, selected=2, dtype="bfloat16", ragged=0.3, **kw)


PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    # float32, tight tolerances: G = 4/1/8/2, H = 64/128/32, W = 64/128/32, merge 2, P = K and P = N, ragged,
    # non-causal, no local block.
    Problem("tiny_g4_h64_w64", get_spec("tiny_g4_h64_w64")),
    Problem("tiny_g1_h128_w128", get_spec("tiny_g1_h128_w128")),
    Problem("tiny_g8_merge2_per_head", get_spec("tiny_g8_merge2_per_head")),
    Problem("tiny_noncausal_g2", get_spec("tiny_noncausal_g2")),
    # Without the local block: group 2 attends to nothing (output 0, LSE -inf), unselected regions hold NaN.
    Problem("tiny_no_local_nan", get_spec("tiny_no_local"), seed=1, empty_rows=((0, 0, 2), (0, 1, 2)),
            nan_unselected=True),
    # H = 256 and G = 16 (one kv head, P = K), B = 2 with ragged lengths: row 1's last group is padding.
    Problem("tiny_g16_h256_b2_ragged", get_spec("tiny_g16_h256_b2"), seed=3, short_rows=(1,)),
    # bfloat16 in the Mosaic GPU family. G = 2 (two Mosaic compute warpgroups), W = 128 (two dK/dV warpgroups,
    # the second skipping its hidden local chunks), a row with no valid entry, and a NaN padding group: 5
    # dK/dV items (one kv head, 4 + 1 regions) over 2 persistent Mosaic CTAs, so the snake order ends in a
    # partial round.
    Problem("bf16_g2_w128_nan_tail", _mosaic_family(2, 128, 512, kv_heads=1), seed=7, empty_rows=((0, 0, 2),),
            nan_tail=True, tol=0.0, rel=2e-2),
    # G = 3 (one Mosaic warpgroup; Triton packs power-of-two head counts only), two kv heads and B = 2 (batch
    # and kv head decoded from the sorted dK/dV item ids), W = 64.
    Problem("bf16_g3_b2", _mosaic_family(3, 64, 256, batch=2), seed=9, empty_rows=((1, 1, 2),), tol=0.0,
            rel=2e-2),
)}

# The GQA oracle costs one more reference compile per problem, so it runs on three groupings: G = 8 with one
# selection per query head (P = N, merge 2, float32), G = 2 sharing a kv head's plan row (P = K, bfloat16,
# the Mosaic GPU family) and G = 16 sharing one (P = K, H = 256, float32).
GQA = ("tiny_g8_merge2_per_head", "bf16_g2_w128_nan_tail", "tiny_g16_h256_b2_ragged")
DETERMINISM = ("tiny_g4_h64_w64", "tiny_g8_merge2_per_head", "bf16_g3_b2",
               "tiny_g16_h256_b2_ragged")


@dataclasses.dataclass(frozen=True)
class Backend:
    """How the shared cases call one backend.

    Attributes:
      name: the ``implementation`` name in ``api``.
      attention: ``attention(problem_name, plan) -> fn(q, k, v)`` returning ``(out, lse)`` in interpret mode.
      native: the entry point run natively (no interpreter), for the off-platform decline.
      declines: ``{problem name: regex}`` of the problems the backend must refuse with NotImplementedError.
      on_platform: whether this process runs on the backend's own hardware (then the decline test is skipped).
    """

    name: str
    attention: Callable
    native: Callable
    declines: dict[str, str]
    on_platform: Callable[[], bool]


# ------------------------------------------------------------------------------------------- inputs, oracle


@functools.cache
def inputs(name: str):
    """``(q, k, v, plan, do)`` of a problem, and ``real``: the number of tokens before the padding tail."""
    problem = PROBLEMS[name]
    q, k, v, plan, do = problem.spec.make_inputs(jax.random.PRNGKey(problem.seed))
    regions = plan.kv_regions
    for b, p, g in problem.empty_rows:
        regions = regions.at[b, p, g, :].set(-1)
    plan = dataclasses.replace(plan, kv_regions=regions)
    real = q.shape[1]
    if problem.nan_unselected:
        used = np.zeros(plan.num_regions, bool)
        used[np.asarray(regions)[np.asarray(plan.valid_mask())]] = True
        used[0] = True
        bad = jnp.repeat(jnp.asarray(~used), plan.block_size)[None, :, None, None]
        k, v = jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)
    for b in problem.short_rows:
        lt = plan.group_tokens
        q, k, v, do = (x.at[b, -lt:].set(jnp.nan) for x in (q, k, v, do))
        regions = regions.at[b, :, -1, :].set(-1)
        plan = dataclasses.replace(plan, kv_regions=regions)
    if problem.nan_tail:
        lt = plan.group_tokens
        q, k, v, do = (jnp.concatenate([x, jnp.full((x.shape[0], lt, *x.shape[2:]), jnp.nan, x.dtype)],
                                       axis=1)
                       for x in (q, k, v, do))
        tail_row = jnp.full((*regions.shape[:2], 1, regions.shape[3]), -1, regions.dtype)
        plan = dataclasses.replace(plan, kv_regions=jnp.concatenate([regions, tail_row], axis=2))
    return (q, k, v, plan, do), real


def cotangent_run(attn, q, k, v, do):
    """A jitted ``(q, k, v) -> (out, lse, dq, dk, dv)`` of ``attn``, with an LSE cotangent where it is
    finite."""

    @jax.jit
    def run(q, k, v):
        (out, lse), vjp = jax.vjp(attn, q, k, v)
        return (out, lse, *vjp((do, jnp.where(jnp.isfinite(lse), 0.25, 0.0).astype(lse.dtype))))

    return run


def _host(xs):
    return tuple(np.asarray(x) for x in xs)


def reference_attention(plan):
    return lambda q, k, v: block_sparse_attention_reference(q, k, v, plan, return_lse=True)


def _real_part(x, real, short_rows=(), group_tokens=0):
    """The tokens before the padding tail; the padded last group of each of ``short_rows`` zeroed."""
    x = np.array(x[:, :real])
    for b in short_rows:
        x[b, real - group_tokens:real] = 0
    return x


@functools.cache
def reference(name: str, expand_gqa: bool = False):
    """The reference's ``(out, lse, dq, dk, dv)`` on the problem's real tokens (the tail cut off: causal, so
    nothing real depends on it). ``expand_gqa``: each kv head repeated G times (plan rows too when P = K), and
    dK/dV summed back over each group, so the result is what GQA must equal."""
    (q, k, v, plan, do), real = inputs(name)
    q, k, v, do = (jnp.asarray(_real_part(x, real, PROBLEMS[name].short_rows, plan.group_tokens))
                   for x in (q, k, v, do))
    regions = plan.kv_regions[:, :, :real // plan.group_tokens]
    g = q.shape[2] // k.shape[2]
    if expand_gqa:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        if regions.shape[1] != q.shape[2]:
            regions = jnp.repeat(regions, g, axis=1)
    plan = dataclasses.replace(plan, kv_regions=regions)
    got = _host(cotangent_run(reference_attention(plan), q, k, v, do)(q, k, v))
    if expand_gqa:
        b, t, n, h = got[3].shape
        got = (*got[:3], *(x.astype(np.float32).reshape(b, t, n // g, g, h).sum(3) for x in got[3:]))
    return tuple(_real_part(x, real, PROBLEMS[name].short_rows, plan.group_tokens) for x in got)


_RUNS: dict[tuple[str, str], tuple] = {}


def backend_run(backend: Backend, name: str):
    """``(run, outputs)``: the backend's jitted function on the problem and its first outputs (cached)."""
    key = (backend.name, name)
    if key not in _RUNS:
        (q, k, v, plan, do), _ = inputs(name)
        run = cotangent_run(backend.attention(name, plan), q, k, v, do)
        _RUNS[key] = (run, _host(run(q, k, v)))
    return _RUNS[key]


def assert_close(got, want, *, tol: float = 0.0, rel: float | None = None, names=NAMES):
    """``got`` NaN-free and within ``rtol = atol = tol``, or (``rel``) within ``rel`` times the largest finite
    reference magnitude with the same non-finite entries."""
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert not np.isnan(a).any(), f"{name} has NaN"
        if rel is None:
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)
        else:
            finite = np.isfinite(b)
            np.testing.assert_array_equal(np.isfinite(a), finite,
                                          err_msg=f"{name}: non-finite entries differ")
            err, scale = np.max(np.abs(a - b), where=finite, initial=0.0), np.max(np.abs(b), where=finite,
                                                                                  initial=0.0)
            assert err <= rel * scale, (name, err, scale)


def real_outputs(outputs, name: str):
    (_, _, _, plan, _), real = inputs(name)
    return tuple(_real_part(x, real, PROBLEMS[name].short_rows, plan.group_tokens) for x in outputs)


# ------------------------------------------------------------------------------------------------- the base


def _kind(kind: str):
    """Marks a test method with the problems it runs on (see ``BackendCases.pytest_generate_tests``)."""

    def mark(fn):
        fn.problem_kind = kind
        return fn

    return mark


class BackendCases:
    """The shared cases; subclass as ``Test<Backend>Cases`` with ``backend = Backend(...)``."""

    backend: Backend

    def pytest_generate_tests(self, metafunc):
        kind = getattr(metafunc.function, "problem_kind", None)
        if kind is None:
            return
        declines = self.backend.declines
        unknown = set(declines) - set(PROBLEMS)
        assert not unknown, f"{self.backend.name} declines unknown problems {sorted(unknown)}"
        assert all(PROBLEMS[n].gqa > 1 for n in GQA)
        if kind == "declined":
            names = [n for n in PROBLEMS if n in declines]
        else:
            names = [n for n in PROBLEMS if n not in declines and {
                "all": True,
                "gqa": n in GQA,
                "determinism": n in DETERMINISM,
                "padding": PROBLEMS[n].has_padding,
            }[kind]]
        if not names:  # say why instead of pytest's "got empty parameter set"
            names = [pytest.param(None, id="none",
                                  marks=pytest.mark.skip(reason=f"{self.backend.name}: no {kind} problem"))]
        # Class scope groups the tests of one problem together (they share one cached kernel run).
        metafunc.parametrize("problem", names, scope="class")

    @_kind("all")
    def test_forward(self, problem):
        _, got = backend_run(self.backend, problem)
        assert_close(real_outputs(got, problem)[:2], reference(problem)[:2], **PROBLEMS[problem].tolerance)

    @_kind("all")
    def test_gradients(self, problem):
        _, got = backend_run(self.backend, problem)
        assert_close(real_outputs(got, problem)[2:], reference(problem)[2:], names=NAMES[2:],
                     **PROBLEMS[problem].tolerance)

    @_kind("gqa")
    def test_gqa(self, problem):
        _, got = backend_run(self.backend, problem)
        assert_close(real_outputs(got, problem), reference(problem, expand_gqa=True),
                     **PROBLEMS[problem].tolerance)

    @_kind("determinism")
    def test_deterministic(self, problem):
        run, got = backend_run(self.backend, problem)
        (q, k, v, _, _), _ = inputs(problem)
        for name, a, b in zip(NAMES, got, _host(run(q, k, v))):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between two runs")

    @_kind("padding")
    def test_nan_in_padding(self, problem):
        _, got = backend_run(self.backend, problem)
        real = real_outputs(got, problem)
        for name, x in zip(NAMES, real):
            bad = np.isnan(np.asarray(x, np.float32))
            assert not bad.any(), f"{name}: NaN from the padding leaked into {bad.sum()} real entries"
        (_, _, _, plan, _), _ = inputs(problem)
        if not plan.include_local:  # rows with no valid entry attend to nothing: output 0, LSE -inf
            lt = plan.group_tokens
            for b, p, g in PROBLEMS[problem].empty_rows:
                heads = slice(p * (real[0].shape[2] // plan.kv_regions.shape[1]),
                              (p + 1) * (real[0].shape[2] // plan.kv_regions.shape[1]))
                np.testing.assert_array_equal(real[0][b, g * lt:(g + 1) * lt, heads].astype(np.float32), 0.0)
                assert np.all(np.isneginf(real[1][b, g * lt:(g + 1) * lt, heads]))

    @_kind("declined")
    def test_declines(self, problem):
        (q, k, v, plan, _), _ = inputs(problem)
        with pytest.raises(NotImplementedError, match=self.backend.declines[problem]):
            self.backend.attention(problem, plan)(q, k, v)

    def test_dispatch_declines_off_platform_and_falls_back(self):
        if self.backend.on_platform():
            pytest.skip(f"runs on {self.backend.name}'s own platform")
        name = next(n for n in PROBLEMS if n not in self.backend.declines and not PROBLEMS[n].has_padding)
        (q, k, v, plan, _), _ = inputs(name)
        with pytest.raises(NotImplementedError, match=self.backend.name):
            self.backend.native(q, k, v, plan)
        with pytest.raises(NotImplementedError, match=self.backend.name):
            block_sparse_attention(q, k, v, plan, implementation=self.backend.name)
        fallback = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, plan, return_lse=True,
                                                                  implementation=(self.backend.name, "xla")))
        out, lse = fallback(q, k, v)
        np.testing.assert_array_equal(np.asarray(out, np.float32), reference(name)[0].astype(np.float32))
        np.testing.assert_array_equal(np.asarray(lse), reference(name)[1])
