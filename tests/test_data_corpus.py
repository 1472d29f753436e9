"""The embedded corpus and text folders: documents, split, TFDS array_record builds, catalog access."""

import os
import subprocess
import sys
import time

import pytest

from selmerge_jax.data import catalog
from selmerge_jax.data.documents import (
    StdlibOptions,
    TextFolderOptions,
    file_header,
    split_documents,
    stdlib_documents,
    text_folder_documents,
)

TINY = StdlibOptions(max_files=40, min_document_chars=20_000, max_document_chars=200_000)


def test_stdlib_documents_are_long_packages_and_deterministic():
    docs = stdlib_documents()  # the full default corpus: a fraction of a second
    assert docs == stdlib_documents()
    names = [d["name"] for d in docs]
    assert len(set(names)) == len(names)
    assert {d["kind"] for d in docs} == {"code", "docs"}
    assert min(len(d["text"]) for d in docs) >= 100_000  # repository-level documents
    assert sum(len(d["text"]) for d in docs) > 5_000_000
    asyncio = next(d for d in docs if d["name"] == "code:asyncio")  # a package is one document
    assert asyncio["text"].startswith(file_header("asyncio/__init__.py"))
    assert asyncio["num_files"] == asyncio["text"].count("# ===== file: asyncio/")
    assert not any("site-packages/" in d["text"][:10_000] for d in docs)


def test_stdlib_options_limit_and_split_large_packages():
    docs = stdlib_documents(TINY)
    code = [d for d in docs if d["kind"] == "code"]
    assert sum(d["num_files"] for d in code) == 40
    assert all(d["num_files"] == 1 or len(d["text"]) <= 200_000 + 100_000 for d in code)
    limited = stdlib_documents(StdlibOptions(max_bytes=300_000, include_docs=False))
    assert sum(len(d["text"]) for d in limited) < 320_000 and {d["kind"] for d in limited} == {"code"}


@pytest.mark.parametrize("kwargs, match", [
    ({"min_document_chars": 0}, "min_document_chars"),
    ({"max_files": -1}, "max_files"),
    ({"min_document_chars": 10, "max_document_chars": 5}, "max_document_chars=5"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
])
def test_stdlib_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StdlibOptions(**kwargs)


def test_split_is_deterministic_disjoint_per_kind_and_order_free():
    docs = stdlib_documents(TINY)
    split = split_documents(docs, 0.1)
    again = split_documents(list(reversed(docs)), 0.1)
    names = {k: {d["name"] for d in v} for k, v in split.items()}
    assert names == {k: {d["name"] for d in v} for k, v in again.items()}
    assert not names["train"] & names["validation"]
    assert names["train"] | names["validation"] == {d["name"] for d in docs}
    assert {d["kind"] for d in split["validation"]} == {"code", "docs"}
    held = sum(len(d["text"]) for d in split["validation"]) / sum(len(d["text"]) for d in docs)
    assert 0.02 < held < 0.35
    assert split_documents(docs, 0.0)["validation"] == []


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "books"
    (root / "austen").mkdir(parents=True)
    (root / "melville").mkdir()
    (root / "austen" / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n" * 50)
    (root / "austen" / "persuasion.txt").write_text("Sir Walter Elliot, of Kellynch Hall.\n" * 50)
    (root / "melville" / "moby.txt").write_text("Call me Ishmael.\n" * 80)
    (root / "notes.md").write_text("# notes\nnothing here\n")
    (root / "cover.txt").write_bytes(b"\xff\xfe\x00binary")  # not UTF-8: skipped
    (root / "data.csv").write_text("a,b\n")  # suffix not selected
    return root


def test_text_folder_documents(text_dir):
    per_file = text_folder_documents(text_dir)
    # walk order: a folder's own files, then its subfolders
    assert [d["name"] for d in per_file] == ["notes.md", "austen/emma.txt", "austen/persuasion.txt",
                                             "melville/moby.txt"]
    per_dir = text_folder_documents(text_dir, TextFolderOptions(group_by="directory"))
    assert [(d["name"], d["num_files"]) for d in per_dir] == [("text:(modules)", 1), ("text:austen", 2),
                                                              ("text:melville", 1)]
    assert per_dir[1]["text"].startswith(file_header("austen/emma.txt") + "Emma")
    with pytest.raises(ValueError, match="root="):
        text_folder_documents(text_dir / "missing")
    with pytest.raises(ValueError, match="group_by"):
        TextFolderOptions(group_by="book")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = catalog.build_stdlib_corpus(data_dir, options=TINY, name="tiny")
    return data_dir, builder


def test_stdlib_builder_writes_array_record_matching_documents(built):
    data_dir, builder = built
    split = split_documents(stdlib_documents(TINY), TINY.validation_fraction)
    assert os.path.isdir(os.path.join(data_dir, "stdlib_corpus", "tiny", "1.0.0"))
    assert any(".array_record-00000-of-" in f for f in os.listdir(builder.data_dir))
    sources = builder.as_data_source()
    for name, docs in split.items():
        texts = sorted(catalog.TextView(sources[name])[:])
        assert texts == sorted(d["text"] for d in docs)
    assert builder.info.metadata["python_version"] == sys.version.split()[0]
    assert "tensorflow" not in sys.modules  # TFDS wrote and read it without TensorFlow


def test_text_source_by_name_path_and_errors(built, tmp_path):
    data_dir, builder = built
    view = catalog.text_source("stdlib_corpus/tiny", "validation", data_dir)
    assert isinstance(view[0], str) and len(view) == builder.info.splits["validation"].num_examples
    assert list(view) == view[:] and view[-1] == view[len(view) - 1]
    with pytest.raises(IndexError):
        view[len(view)]
    half = catalog.text_source(os.fspath(builder.data_dir), "train[:50%]")
    assert 0 < len(half) < builder.info.splits["train"].num_examples
    with pytest.raises(FileNotFoundError, match="download=True"):
        catalog.text_source("pg19", "train", tmp_path)  # real catalog name, nothing prepared: no network
    with pytest.raises(ValueError, match="no TFDS builder"):
        catalog.text_source("not_a_dataset_xyz", "train", tmp_path)
    with pytest.raises(KeyError, match="book_text"):
        catalog.text_source("stdlib_corpus/tiny", "train", data_dir, text_key="book_text")[0]
    assert catalog.TEXT_KEYS["pg19"] == "book_text"


def test_full_default_corpus_builds_fast(tmp_path):
    start = time.perf_counter()
    builder = catalog.build_stdlib_corpus(tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"building the embedded corpus took {elapsed:.1f} s"
    assert builder.builder_config.name == f"py{sys.version_info.major}{sys.version_info.minor}"
    splits = builder.info.splits
    assert splits["train"].num_examples > 10 and splits["validation"].num_examples >= 2
    view = catalog.text_source("stdlib_corpus", "train", tmp_path)  # the running Python's config by default
    assert min(len(view[i]) for i in range(len(view))) >= 100_000


def test_text_folder_builder_and_overwrite(text_dir, tmp_path):
    opts = TextFolderOptions(validation_fraction=0.2)
    builder = catalog.build_text_folder(text_dir, tmp_path, options=opts)
    assert builder.builder_config.name.startswith("books_")
    counts = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sum(counts.values()) == 4 and counts["validation"] >= 1
    view = catalog.text_source(f"text_folder/{builder.builder_config.name}", "train", tmp_path)
    assert len(view) == counts["train"] and all(isinstance(t, str) and t for t in view)
    (text_dir / "melville" / "typee.txt").write_text("The sea.\n" * 30)
    same = catalog.build_text_folder(text_dir, tmp_path, options=opts)  # found, not rebuilt
    assert sum(v.num_examples for v in same.info.splits.values()) == 4
    fresh = catalog.build_text_folder(text_dir, tmp_path, options=opts, overwrite=True)
    assert sum(v.num_examples for v in fresh.info.splits.values()) == 5


def test_build_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="name= is required"):
        catalog.build_stdlib_corpus(tmp_path, options=TINY)
    with pytest.raises(TypeError, match="options"):
        catalog.build_stdlib_corpus(tmp_path, options={"max_files": 3}, name="x")
    with pytest.raises(ValueError, match="root="):
        catalog.build_text_folder(tmp_path / "nope", tmp_path)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SELMERGE_DATA_DIR", os.fspath(tmp_path))
    assert catalog.default_data_dir() == os.fspath(tmp_path)
    monkeypatch.delenv("SELMERGE_DATA_DIR")
    assert catalog.default_data_dir().endswith(os.path.join(".cache", "selmerge_jax", "tensorflow_datasets"))


def test_numpy_path_runs_without_grain_or_tfds():
    """What the GPU box (no tfds, no grain) runs: documents -> tokens -> TokenWindows batches, passkeys."""
    code = """
import sys
for blocked in ("grain", "tensorflow_datasets", "tensorflow"):
    sys.modules[blocked] = None  # any import of them now raises
import selmerge_jax.data as d
from selmerge_jax.data.tokenizer import load_tokenizer
tok = load_tokenizer(None)
docs = d.split_documents(d.stdlib_documents(d.StdlibOptions(max_files=20)), 0.1)
tokens = d.tokenize_documents([x["text"] for x in docs["train"]], tok)
batch = next(d.TokenWindows(tokens, seq_len=128, batch_size=2, bos_id=tok.bos_id))
ex = d.PasskeySource(d.PasskeyConfig(length=512), tok)[0]
print(batch["inputs"].shape, len(ex["tokens"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(2,", "128)", "512"]


def test_command_line_builds_and_reports(text_dir, tmp_path, capsys):
    from selmerge_jax.data.__main__ import main

    data_dir = ["--data-dir", os.fspath(tmp_path)]
    built = main(data_dir + ["folder", os.fspath(text_dir), "--group-by", "directory"])
    assert sum(built["splits"].values()) == 3
    stats = main(data_dir + ["stats", built["name"], "--split", "train"])
    assert stats["tokens"] == stats["chars"] + 2 * stats["documents"]  # ASCII: a byte per char, + bos/eos
    assert 0 < stats["unigram_entropy_nats"] < 5.6  # below log(259)
    assert '"splits"' in capsys.readouterr().out
