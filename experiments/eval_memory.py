"""Memory/speed of a model config across prompt lengths: `selmerge-eval memory` (see its --help).

    python experiments/eval_memory.py --set 'lengths=[4096, 65536]'
"""

import sys

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.evaluate(["memory", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
