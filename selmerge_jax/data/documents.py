"""Long documents from local text, in pure Python: the stdlib corpus and text folders, before any TFDS.

Kept free of tfds and grain so the GPU box (which has neither) and the TFDS builders share one definition of
what the documents are. A document is ``{"name", "kind", "text", "num_files"}``; ``split_documents`` assigns
each one to train or validation by a hash of its name, so the split never depends on traversal order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from pydoc_data import topics  # the language reference as text; shipped with every CPython

from selmerge_jax.validation import check_choice, check_fraction, check_positive_int

__all__ = ["StdlibOptions", "TextFolderOptions", "stdlib_documents", "text_folder_documents",
           "split_documents", "file_header"]

# Not the library as users read it: third-party code, bytecode caches, and (by default) the 30 MB test suite.
# (``config-3.x-<platform>`` build directories are skipped by prefix in _walk_files.)
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class StdlibOptions:
    """What goes into the embedded corpus.

    Attributes:
      include_tests: also the stdlib's own ``test`` package (~4x the size; off for a quick build).
      include_docs: the ``pydoc_data`` topics (the language reference as plain text) as "docs" documents.
      min_document_chars: packages smaller than this are packed together, in name order, until a document
        reaches it (the point of the corpus is long, repository-level documents).
      max_document_chars: a package larger than this is cut at file boundaries into several documents.
      max_files: stop after this many source files (tests and quick demos use a subset); None = all.
      max_bytes: stop after this many source bytes; None = all.
      validation_fraction: share of each kind's characters held out (whole documents, by hash of name);
        at least one document per kind when the kind has two or more.
    """

    include_tests: bool = False
    include_docs: bool = True
    min_document_chars: int = 100_000
    max_document_chars: int = 1_000_000
    max_files: int | None = None
    max_bytes: int | None = None
    validation_fraction: float = 0.1

    def __post_init__(self):
        for name in ("min_document_chars", "max_document_chars"):
            check_positive_int(f"StdlibOptions.{name}", getattr(self, name))
        for name in ("max_files", "max_bytes"):
            check_positive_int(f"StdlibOptions.{name}", getattr(self, name), allow_none=True)
        if self.max_document_chars < self.min_document_chars:
            raise ValueError(f"StdlibOptions.max_document_chars={self.max_document_chars} must be >= "
                             f"min_document_chars={self.min_document_chars}")
        check_fraction("StdlibOptions.validation_fraction", self.validation_fraction)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextFolderOptions:
    """A local folder of text files as documents.

    Attributes:
      suffixes: file name endings to read (case-insensitive); empty = every file that decodes as UTF-8.
      group_by: ``"file"`` (one document per file) or ``"directory"`` (the files of each top-level
        subdirectory concatenated, like the stdlib corpus: repository-level documents).
      validation_fraction: share of characters held out (whole documents, by hash of name).
      max_files: read at most this many files; None = all.
    """

    suffixes: tuple[str, ...] = (".txt", ".md", ".rst", ".py")
    group_by: str = "file"
    validation_fraction: float = 0.05
    max_files: int | None = None

    def __post_init__(self):
        if isinstance(self.suffixes, str) or not all(isinstance(s, str) for s in self.suffixes):
            raise TypeError(f"TextFolderOptions.suffixes must be a tuple of str, got {self.suffixes!r}")
        check_choice("TextFolderOptions.group_by", self.group_by, ("file", "directory"))
        check_fraction("TextFolderOptions.validation_fraction", self.validation_fraction)
        check_positive_int("TextFolderOptions.max_files", self.max_files, allow_none=True)


def file_header(relpath: str) -> str:
    """The line that separates files inside a document: the model can tell where it is in the 'repository'."""
    return f"# ===== file: {relpath} =====\n"


def _walk_files(root: str, suffixes: Sequence[str], skip: frozenset[str]) -> Iterator[str]:
    """Relative paths under root in a sorted, platform-independent order (the corpus must be reproducible)."""
    lowered = tuple(s.lower() for s in suffixes)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith((".", "config-")))
        for fname in sorted(filenames):
            if not lowered or fname.lower().endswith(lowered):
                yield os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/")


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):  # binary or unreadable files are not text documents
        return None


def _group_key(relpath: str) -> str:
    """Top-level package for files in a directory; a shared bucket for loose top-level modules."""
    head, sep, _ = relpath.partition("/")
    return head if sep else "(modules)"


def _pack(units: Sequence[tuple[str, list[tuple[str, str]]]], kind: str, min_chars: int,
          max_chars: int) -> Iterator[dict]:
    """Units are (group name, [(relpath, text)]). Large groups become their own document(s), cut at file
    boundaries above ``max_chars``; groups below ``min_chars`` are packed together in order."""
    out: list[tuple[list[str], list[tuple[str, str]]]] = []
    pending_names, pending_files, last_packed = [], [], None
    for group, files in units:
        if sum(len(t) for _, t in files) < min_chars:
            pending_names.append(group)
            pending_files += files
            if sum(len(t) for _, t in pending_files) >= min_chars:
                last_packed = len(out)
                out.append((pending_names, pending_files))
                pending_names, pending_files = [], []
            continue
        part, part_size, index = [], 0, 0
        for path, text in files:
            if part and part_size + len(text) > max_chars:
                out.append(([f"{group}#{index}"], part))
                part, part_size, index = [], 0, index + 1
            part.append((path, text))
            part_size += len(text)
        out.append(([group if index == 0 else f"{group}#{index}"], part))
    if pending_files and last_packed is not None:  # a short tail joins the previous pack: no tiny documents
        out[last_packed] = (out[last_packed][0] + pending_names, out[last_packed][1] + pending_files)
    elif pending_files:
        out.append((pending_names, pending_files))
    for names, files in out:
        text = "".join(file_header(p) + t + ("" if t.endswith("\n") else "\n") for p, t in files)
        yield {"name": f"{kind}:{'+'.join(names)}", "kind": kind, "text": text, "num_files": len(files)}


def _stdlib_files(opts: StdlibOptions) -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    skip = _STDLIB_SKIP | ({"test", "tests", "idle_test"} - ({"test", "tests", "idle_test"}
                                                             if opts.include_tests else set()))
    files, total = [], 0
    for rel in _walk_files(root, (".py",), skip):
        if rel.startswith("pydoc_data/"):
            continue  # topics.py is one huge string literal; it enters as prose through include_docs
        text = _read_text(os.path.join(root, rel))
        if text is None:
            continue
        if (opts.max_files is not None and len(files) >= opts.max_files) or \
                (opts.max_bytes is not None and total + len(text) > opts.max_bytes and files):
            break
        files.append((rel, text))
        total += len(text)
    return files


def _grouped(files: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for rel, text in files:
        groups.setdefault(_group_key(rel), []).append((rel, text))
    return sorted(groups.items())


def stdlib_documents(opts: StdlibOptions = StdlibOptions()) -> list[dict]:
    """The running interpreter's standard library as long code documents, plus its documentation topics."""
    sizes = (opts.min_document_chars, opts.max_document_chars)
    docs = list(_pack(_grouped(_stdlib_files(opts)), "code", *sizes))
    if opts.include_docs:
        units = [(name, [(f"pydoc_data/topics/{name}", body)])
                 for name, body in sorted(topics.topics.items())]
        docs += _pack(units, "docs", *sizes)
    return docs


def text_folder_documents(root: str | os.PathLike,
                          opts: TextFolderOptions = TextFolderOptions()) -> list[dict]:
    """Every matching UTF-8 file under root, one document per file or per top-level directory."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"root={root!r} is not a directory")
    files = []
    for rel in _walk_files(root, opts.suffixes, frozenset({"__pycache__"})):
        if opts.max_files is not None and len(files) >= opts.max_files:
            break
        text = _read_text(os.path.join(root, rel))
        if text:
            files.append((rel, text))
    if not files:
        raise ValueError(f"root={root!r} holds no UTF-8 files ending in {opts.suffixes}")
    if opts.group_by == "file":
        return [{"name": rel, "kind": "text", "text": text, "num_files": 1} for rel, text in files]
    return list(_pack(_grouped(files), "text", 1, sys.maxsize))


def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))  # stable across processes, unlike hash()


def _held_out(indices: list[int], docs: Sequence[dict], fraction: float) -> list[int]:
    """Documents in name-hash order until they hold ``fraction`` of the characters (never all of them)."""
    if fraction == 0 or len(indices) < 2:
        return []
    budget = fraction * sum(len(docs[i]["text"]) for i in indices)
    held, chars = [], 0
    for i in sorted(indices, key=lambda i: (_name_hash(docs[i]["name"]), i))[:-1]:
        if held and chars + len(docs[i]["text"]) > budget:
            continue  # too big for what is left of the budget; a smaller one later may fit
        held.append(i)
        chars += len(docs[i]["text"])
    return held


def split_documents(docs: Sequence[dict], validation_fraction: float) -> dict[str, list[dict]]:
    """Deterministic train/validation split, per kind (code and docs both get held-out documents): documents
    in name-hash order are held out until they hold ``validation_fraction`` of the kind's characters; at least
    one per kind that has two or more documents."""
    if not docs:
        raise ValueError("docs is empty: nothing to split")
    check_fraction("validation_fraction", validation_fraction)
    by_kind: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_kind.setdefault(doc["kind"], []).append(i)
    held = {i for idx in by_kind.values() for i in _held_out(idx, docs, validation_fraction)}
    return {"train": [d for i, d in enumerate(docs) if i not in held],
            "validation": [d for i, d in enumerate(docs) if i in held]}
