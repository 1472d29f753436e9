"""``python -m selmerge_jax.data``: build the local datasets and print what is in them.

    python -m selmerge_jax.data stdlib [--include-tests] [--data-dir DIR]
    python -m selmerge_jax.data folder ROOT [--group-by directory] [--data-dir DIR]
    python -m selmerge_jax.data stats NAME [--split validation] [--tokenizer tokenizer.json]
"""

from __future__ import annotations

import argparse
import json
import time

from selmerge_jax.data import catalog
from selmerge_jax.data.arrays import unigram_entropy
from selmerge_jax.data.documents import TextFolderOptions
from selmerge_jax.data.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m selmerge_jax.data", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="default: $SELMERGE_DATA_DIR or ~/.cache/selmerge_jax")
    sub = p.add_subparsers(dest="command", required=True)
    std = sub.add_parser("stdlib", help="build the embedded corpus (this Python's standard library)")
    std.add_argument("--include-tests", action="store_true")
    std.add_argument("--overwrite", action="store_true")
    fol = sub.add_parser("folder", help="build a dataset from a folder of text files")
    fol.add_argument("root")
    fol.add_argument("--group-by", choices=("file", "directory"), default="file")
    fol.add_argument("--suffixes", default=".txt,.md,.rst,.py", help="comma separated; empty = every file")
    fol.add_argument("--overwrite", action="store_true")
    st = sub.add_parser("stats", help="documents, chars, tokens, unigram entropy of a prepared split")
    st.add_argument("name", help='e.g. "stdlib_corpus", "text_folder/<config>", "pg19", or a directory')
    st.add_argument("--split", default="train")
    st.add_argument("--tokenizer", default=None, help="tokenizer.json (default: bytes)")
    return p


def _summary(builder) -> dict:
    return {"name": f"{builder.name}/{builder.builder_config.name}", "dir": str(builder.data_dir),
            "splits": {k: v.num_examples for k, v in builder.info.splits.items()}}


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "stdlib":
        out = _summary(catalog.build_stdlib_corpus(args.data_dir, include_tests=args.include_tests,
                                                   overwrite=args.overwrite))
    elif args.command == "folder":
        suffixes = tuple(s for s in args.suffixes.split(",") if s)
        opts = TextFolderOptions(group_by=args.group_by, suffixes=suffixes)
        out = _summary(catalog.build_text_folder(args.root, args.data_dir, options=opts,
                                                 overwrite=args.overwrite))
    else:
        docs = catalog.text_source(args.name, args.split, args.data_dir)
        tokenizer = load_tokenizer(args.tokenizer)
        texts = list(docs)
        out = {"name": args.name, "split": args.split, "documents": len(texts),
               "chars": sum(map(len, texts)), "min_doc_chars": min(map(len, texts)),
               "tokens": sum(len(tokenizer.encode(t, add_bos=True, add_eos=True)) for t in texts),
               "unigram_entropy_nats": round(unigram_entropy(texts, tokenizer), 4)}
    out["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
