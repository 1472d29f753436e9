"""Where datasets live and how to open them: local builds of our corpora and the TFDS catalog by name.

Everything returns a random-access view (``len`` + ``[i]`` -> ``str``) over TFDS array_record files, which is
what the grain pipeline shuffles and shards without reading the whole dataset. Catalog datasets are prepared
by TFDS itself (``download=True``, or ``tfds build NAME --file_format=array_record`` on a machine that can
reach the data); some catalog builders (``pg19`` reads ``gs://deepmind-gutenberg`` through ``tf.io.gfile``)
need TensorFlow to *prepare*, never to read.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from selmerge_jax.data.documents import StdlibOptions, TextFolderOptions

__all__ = ["default_data_dir", "build_stdlib_corpus", "build_text_folder", "text_source", "TextView",
           "TEXT_KEYS"]

# The feature holding the running text, per catalog dataset (the part of the name before "/").
TEXT_KEYS = {
    "pg19": "book_text",
    "scientific_papers": "article",
    "big_patent": "description",
    "billsum": "text",
    "wikipedia": "text",
    "c4": "text",
    "lm1b": "text",
    "stdlib_corpus": "text",
    "text_folder": "text",
}


def default_data_dir() -> str:
    """``$SELMERGE_DATA_DIR``, else ``~/.cache/selmerge_jax/tensorflow_datasets`` (kept apart from the TFDS
    default so our builds never shadow or clobber a user's catalog datasets)."""
    env = os.environ.get("SELMERGE_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "selmerge_jax", "tensorflow_datasets")


def _prepare(builder, overwrite: bool):
    if overwrite and os.path.isdir(builder.data_dir):
        shutil.rmtree(builder.data_dir)  # only this builder's version dir, e.g. .../stdlib_corpus/py311/1.0.0
    builder.download_and_prepare()
    return builder


def build_stdlib_corpus(data_dir: str | os.PathLike | None = None, *, options: StdlibOptions | None = None,
                        name: str | None = None, include_tests: bool = False, overwrite: bool = False):
    """Builds (or finds) the embedded corpus; returns the TFDS builder (``.as_data_source()``, ``.info``).

    ``options=None`` gives the standard config of the running Python (``py311`` or ``py311_tests``); custom
    ``options`` need a ``name`` so differently-built corpora never share a directory.
    """
    # optional dependency: the builder imports tensorflow_datasets (the .npy path needs none)
    from selmerge_jax.data.stdlib_corpus import StdlibCorpus, StdlibCorpusConfig, default_stdlib_config

    if options is None:
        config = default_stdlib_config(include_tests).name  # by name: TFDS refuses a copy of a class config
        if name is not None:
            raise ValueError(f"name={name!r} only applies with custom options; the default config is "
                             f"{config}")
    else:
        if not isinstance(options, StdlibOptions):
            raise TypeError(f"options must be StdlibOptions, got {type(options).__name__}")
        if not name:
            raise ValueError("name= is required with custom options (it names the dataset directory)")
        config = StdlibCorpusConfig(name=name, options=options)
    builder = StdlibCorpus(config=config, data_dir=os.fspath(data_dir or default_data_dir()),
                           file_format="array_record")
    return _prepare(builder, overwrite)


def build_text_folder(root: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                      options: TextFolderOptions = TextFolderOptions(), name: str | None = None,
                      overwrite: bool = False):
    """Builds (or finds) a dataset of the text files under ``root``; pass ``overwrite=True`` after the folder
    changed (the dataset is keyed by path and options, not by content)."""
    # optional dependency: the builder imports tensorflow_datasets (the .npy path needs none)
    from selmerge_jax.data.text_folder import TextFolder, text_folder_config

    config = text_folder_config(root, options, name)
    builder = TextFolder(config=config, data_dir=os.fspath(data_dir or default_data_dir()),
                         file_format="array_record")
    return _prepare(builder, overwrite)


class TextView(Sequence):
    """Random-access ``str`` view of one text feature of a TFDS data source (bytes decoded as UTF-8).

    Plain attributes only, so it pickles into grain worker processes.
    """

    def __init__(self, source, key: str = "text"):
        self.source, self.key = source, key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        # array_record raises ValueError out of range; Sequence's iteration and callers expect IndexError.
        if not -len(self) <= index < len(self):
            raise IndexError(f"index={index} out of range for {len(self)} records")
        record = self.source[index % len(self)]
        if self.key not in record:
            raise KeyError(f"key={self.key!r} is not a feature of this dataset; it has {sorted(record)}")
        value = record[self.key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"TextView({self.source!r}, key={self.key!r})"


def text_source(name: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
                text_key: str | None = None, download: bool = False) -> TextView:
    """A TFDS dataset by name (``"stdlib_corpus"``, ``"stdlib_corpus/py311"``, ``"pg19"``,
    ``"scientific_papers/arxiv"``, ...) or by a prepared directory path, as a ``TextView`` of one split.

    ``download=False`` (the default) only opens data already prepared under ``data_dir``, so nothing touches
    the network unless asked; ``split`` may be any TFDS split string (``"train[:90%]"``).
    """
    import tensorflow_datasets as tfds  # optional dependency: only catalog datasets need it

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a dataset name or a directory, got {name!r}")
    data_dir = os.fspath(data_dir or default_data_dir())
    if os.path.isdir(name):  # e.g. .../pg19/0.1.1, prepared anywhere
        builder = tfds.builder_from_directory(name)
        source, base = builder.as_data_source(split=split), builder.name
    else:
        if name == "stdlib_corpus":
            name = f"stdlib_corpus/py{sys.version_info.major}{sys.version_info.minor}"
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError as err:  # its message lists the whole catalog
            raise ValueError(f"name={name!r}: no TFDS builder or prepared dataset of that name under "
                             f"data_dir={data_dir!r} ({str(err).splitlines()[0]})") from None
        if download:
            builder.download_and_prepare(file_format="array_record")
        elif not builder.is_prepared():
            raise FileNotFoundError(
                f"dataset {name!r} is not prepared under data_dir={data_dir!r}; pass download=True, or run "
                f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` where the data is "
                "reachable")
        source, base = builder.as_data_source(split=split), builder.name
    key = text_key or TEXT_KEYS.get(base, "text")
    return TextView(source, key)
