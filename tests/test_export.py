"""``selmerge-export`` and ``save_hf``: what has no Hugging Face form is refused before anything is written,
select-and-merge weights with true positions export, and the command line fails in one line. (The export of a
LoRA + CRD NTK fine-tune, reloaded here and in ``transformers``, is checked in ``tests/test_chain.py``.)"""

import pathlib
import tomllib

import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.main import export
from selmerge_jax.models import Llama, load_hf, preset, save_hf
from selmerge_jax.models.lora import LoRAConfig, apply_lora
from selmerge_jax.positional import RopeConfig

ROOT = pathlib.Path(__file__).parents[1]


def _tiny(**changes) -> Llama:
    return Llama(preset("tiny", d_model=32, ffn_dim=64, num_layers=1, **changes), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("changes, message", [
    ({"rope": RopeConfig(logn_length=64)}, r"logn_length=64: log-n query scaling has no Hugging Face form"),
    ({"rope": RopeConfig(layout="interleaved")}, r"layout='interleaved': has no Hugging Face Llama form"),
    ({"attention": "ms", "ms": MSAttentionConfig(block_size=16, top_k=4, selection_source="previous",
                                                 position_mode="selected_compact")},
     r"position_mode='selected_compact': has no Hugging Face form"),
])
def test_save_hf_refuses_what_has_no_hf_form_before_writing(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        save_hf(_tiny(**changes), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_ms_model_with_true_positions_exports(tmp_path):
    """Select-and-merge weights are a Llama's: exported (transformers runs them densely), logits checked."""
    model = _tiny(attention="ms")
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    save_hf(export.merge_lora(model), str(tmp_path))
    tokens = export.check_tokens_for(model, 32)
    np.testing.assert_allclose(export.logits_for_check(load_hf(str(tmp_path)), tokens),
                               export.logits_for_check(model, tokens), atol=1e-5)


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "nowhere"), str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "ExportConfig.checkpoint=" in err and "nowhere" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(SystemExit):
        export.main([str(tmp_path), str(tmp_path / "busy")])  # the output is checked before any loading
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path), str(tmp_path / "x"), "--dtype", "int8"])  # argparse choices
    assert exit_info.value.code == 2 and "float32" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["selmerge-export"].split(":")
    assert module == "selmerge_jax.main.export" and func == "main"
