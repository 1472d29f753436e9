"""``MSAttentionConfig()`` is causal: the paper's within-group selection (``selection_source="group"``) is
opt-in and logged when chosen, and ``load_hf(..., attention="ms")`` gets the causal default."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig, ms_attention
from selmerge_jax.models import Llama, load_hf, preset, save_hf


def _changes_before(cfg: MSAttentionConfig, t: int = 64, cut: int = 44) -> float:
    """Largest change of the outputs before ``cut`` when only the queries from ``cut`` on change."""
    kq, kk, kv, kn = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (1, t, 2, 8))
    k, v = jax.random.normal(kk, (1, t, 1, 8)), jax.random.normal(kv, (1, t, 1, 8))
    q2 = q.at[:, cut:].set(jax.random.normal(kn, (1, t - cut, 2, 8)) * 10)
    attend = jax.jit(ms_attention, static_argnums=3)
    a, b = attend(q, k, v, cfg), attend(q2, k, v, cfg)
    return float(np.abs(np.asarray(a[:, :cut]) - np.asarray(b[:, :cut])).max())


def test_default_is_causal_and_the_paper_mode_is_not():
    default = MSAttentionConfig(block_size=4, top_k=4, merge=2)  # groups of 8 tokens; cut=44 is mid-group
    assert default.selection_source == "previous" and default.causal
    assert _changes_before(default) == 0.0
    paper = MSAttentionConfig(block_size=4, top_k=4, merge=2, selection_source="group")
    assert _changes_before(paper) > 1e-3  # why it is opt-in: earlier outputs see later queries


def test_paper_mode_is_logged_when_chosen(caplog):
    with caplog.at_level(logging.WARNING, logger="selmerge_jax.attention.config"):
        MSAttentionConfig(block_size=12, top_k=6, merge=3)
        assert not caplog.records
        MSAttentionConfig(block_size=12, top_k=6, merge=3, selection_source="group")
    assert "within-group selection is not causal" in caplog.text and "36-token group" in caplog.text
    assert "NOT causal" in MSAttentionConfig.__doc__ and "opt-in" in MSAttentionConfig.__doc__


def test_load_hf_as_ms_is_causal(tmp_path):
    save_hf(Llama(preset("tiny", d_model=32, ffn_dim=64, num_layers=1), rngs=nnx.Rngs(0)), str(tmp_path))
    model = load_hf(str(tmp_path), attention="ms")
    assert model.config.ms.selection_source == "previous" and model.config.ms.causal


@pytest.mark.parametrize("path", ["experiments/configs/gpu_25m_ms.yaml",
                                  "selmerge_jax/main/configs/demo.yaml",
                                  "selmerge_jax/main/configs/pretrain.yaml"])
# finetune.yaml has no model section: it takes the model, its selection included, from the checkpoint.
def test_result_configs_pin_the_selection_source(path):
    """The configs behind README figures and results/INDEX.md rows say which selection they used, so the
    default can never change what they mean."""
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / path).read_text()
    assert "selection_source: previous" in text
