"""TFDS builder for the embedded default corpus: the running Python's standard library as long documents.

Builds locally from files every CPython install has (no download, no TensorFlow: TFDS writes array_record
files with its own serializer), so ``tfds.data_source`` can hand grain a random-access view of it. The stdlib
differs between Python versions, so the default config is named after the running one (``py311``, ``py312``):
datasets built by different interpreters never mix in one directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from selmerge_jax.data.documents import StdlibOptions, split_documents, stdlib_documents

__all__ = ["StdlibCorpus", "StdlibCorpusConfig", "default_stdlib_config", "document_features",
           "LocalDocumentBuilder"]

_PY = f"py{sys.version_info.major}{sys.version_info.minor}"


def document_features() -> tfds.features.FeaturesDict:
    """Shared by the text-folder builder: the pipeline reads ``text``; the rest is for inspection."""
    return tfds.features.FeaturesDict({
        "name": tfds.features.Text(),
        "kind": tfds.features.Text(),
        "text": tfds.features.Text(),
        "num_files": tfds.features.Scalar(dtype=np.int32),
    })


@dataclasses.dataclass(eq=False)
class StdlibCorpusConfig(tfds.core.BuilderConfig):
    """A named choice of :class:`StdlibOptions`; the name keys the directory the dataset is written to."""

    options: StdlibOptions = dataclasses.field(default_factory=StdlibOptions)

    def __post_init__(self):
        if not isinstance(self.options, StdlibOptions):
            raise TypeError("StdlibCorpusConfig.options must be StdlibOptions, got "
                            f"{type(self.options).__name__}")


def default_stdlib_config(include_tests: bool = False) -> StdlibCorpusConfig:
    name = f"{_PY}_tests" if include_tests else _PY
    return StdlibCorpusConfig(name=name, options=StdlibOptions(include_tests=include_tests),
                              description=f"Python {sys.version.split()[0]} stdlib"
                              f"{' with its test suite' if include_tests else ''} + pydoc_data topics")


class LocalDocumentBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders that read local documents: nothing to download, one example per document."""

    # tfds 4.9 locates a builder's source (to find its download checksums) through a test on
    # importlib_resources.abc.Traversable, a backport that it only declares for Python < 3.9, so on a clean
    # 3.11 install every builder outside __main__ fails with ModuleNotFoundError. Ours download nothing: name
    # the file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _generate_examples(self, docs):
        for doc in docs:
            yield doc["name"], doc


class StdlibCorpus(LocalDocumentBuilder):
    """Python standard library source grouped per package into 100K+ character documents, plus the
    language reference text from ``pydoc_data``; deterministic train/validation split by document name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list] = [default_stdlib_config(False), default_stdlib_config(True)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=document_features(),
            homepage="https://docs.python.org/3/library/",
            metadata=tfds.core.MetadataDict(python_version=sys.version.split()[0],
                                            options=dataclasses.asdict(self.builder_config.options)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        opts = self.builder_config.options
        splits = split_documents(stdlib_documents(opts), opts.validation_fraction)
        return {name: self._generate_examples(docs) for name, docs in splits.items() if docs}
