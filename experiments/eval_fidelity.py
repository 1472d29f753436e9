"""The same prompts decoded with each KV-compression setting and without: `selmerge-eval fidelity`.

    python experiments/eval_fidelity.py --set init.kind=checkpoint --set init.path=runs/demo/checkpoints
"""

import sys

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.evaluate(["fidelity", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
