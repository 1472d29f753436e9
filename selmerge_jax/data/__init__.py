"""Data: the embedded stdlib corpus and text folders as TFDS datasets, catalog access, the grain pipeline,
synthetic long-context tasks (passkey, key-value recall), tokenizers and ``DataConfig`` (a run's data
section).

Names resolve lazily: ``import selmerge_jax.data`` costs nothing, ``selmerge_jax.data.stdlib_documents``
needs neither tfds nor grain, the builders need tfds (no TensorFlow), the pipeline needs grain.

    from selmerge_jax import data
    from selmerge_jax.data.tokenizer import load_tokenizer

    data.build_stdlib_corpus()                        # ~1 s, into $SELMERGE_DATA_DIR or ~/.cache/selmerge_jax
    docs = data.text_source("stdlib_corpus", "train")
    cfg = data.PipelineConfig(seq_len=4096, batch_size=8, seed=0)
    batches = data.lm_iterator(docs, load_tokenizer(None), cfg)   # next(batches)["inputs"]: int32 [8, 4096]
    state = data.state_to_json(batches)                           # exact resume: data.state_from_json(...)

Without tfds/grain (the GPU box): ``data.tokenize_documents`` + ``data.TokenWindows`` (numpy only).
From a shell: ``python -m selmerge_jax.data stdlib`` / ``folder ROOT`` / ``stats NAME``.
"""

import importlib

_EXPORTS = {
    "documents": ("StdlibOptions", "TextFolderOptions", "stdlib_documents", "text_folder_documents",
                  "split_documents"),
    "catalog": ("default_data_dir", "build_stdlib_corpus", "build_text_folder", "text_source", "TextView",
                "TEXT_KEYS"),
    "stdlib_corpus": ("StdlibCorpus", "StdlibCorpusConfig"),
    "text_folder": ("TextFolder", "TextFolderConfig", "text_folder_config"),
    "pipeline": ("PipelineConfig", "lm_dataset", "lm_iterator", "lm_example", "state_to_json",
                 "state_from_json"),
    "synthetic": ("PasskeyConfig", "KVRecallConfig", "PasskeySource", "KVRecallSource", "passkey_example",
                  "kv_recall_example", "passkey_grid"),
    "arrays": ("TokenWindows", "tokenize_documents", "unigram_entropy"),
    "tokenizer": ("Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"),
    "config": ("DataConfig",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
