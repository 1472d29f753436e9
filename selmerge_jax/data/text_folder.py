"""TFDS builder for any local folder of text files (a book collection, a code repository, notes).

The folder is part of the config, so the config's name is derived from its absolute path: two folders never
overwrite each other under one data dir, and rebuilding the same folder finds the existing dataset.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import ClassVar

import tensorflow_datasets as tfds

from selmerge_jax.data.documents import TextFolderOptions, split_documents, text_folder_documents
from selmerge_jax.data.stdlib_corpus import LocalDocumentBuilder, document_features

__all__ = ["TextFolder", "TextFolderConfig", "text_folder_config"]


@dataclasses.dataclass(eq=False)
class TextFolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    options: TextFolderOptions = dataclasses.field(default_factory=TextFolderOptions)

    def __post_init__(self):
        if not isinstance(self.options, TextFolderOptions):
            raise TypeError("TextFolderConfig.options must be TextFolderOptions, got "
                            f"{type(self.options).__name__}")


def text_folder_config(root: str | os.PathLike, options: TextFolderOptions = TextFolderOptions(),
                       name: str | None = None) -> TextFolderConfig:
    """Config for ``root``; the default name is ``<basename>_<crc32 of path and options>``."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"root={root!r} is not a directory")
    if name is None:
        stem = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(root).lower()).strip("_") or "root"
        name = f"{stem}_{zlib.crc32(f'{root}|{options!r}'.encode()):08x}"
    return TextFolderConfig(name=name, root=root, options=options, description=f"text files under {root}")


class TextFolder(LocalDocumentBuilder):
    """UTF-8 files under a local folder, one document per file or per top-level directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    # No static configs: every folder makes its own (see text_folder_config); TFDS accepts a config instance.
    BUILDER_CONFIGS: ClassVar[list] = []

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=document_features(),
            metadata=tfds.core.MetadataDict(root=cfg.root if cfg else "",
                                            options=dataclasses.asdict(cfg.options) if cfg else {}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg is None or not cfg.root:
            raise ValueError("TextFolder needs config=text_folder_config(root): the folder to read")
        docs = text_folder_documents(cfg.root, cfg.options)
        splits = split_documents(docs, cfg.options.validation_fraction)
        return {name: self._generate_examples(docs) for name, docs in splits.items() if docs}
