"""Perplexity against context length on the held-out split: `selmerge-eval perplexity` (see its --help).

    python experiments/eval_perplexity.py --set init.kind=checkpoint --set init.path=runs/demo/checkpoints \
        --set 'lengths=[1024, 4096, 16384]'
"""

import sys

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.evaluate(["perplexity", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
