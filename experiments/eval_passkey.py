"""Passkey retrieval over a grid of context lengths x key depths: `selmerge-eval passkey` (see its --help).

    python experiments/eval_passkey.py --set init.kind=checkpoint --set init.path=runs/demo/checkpoints
    # the CRD NTK inference rule (fixed base' = base * A^(d/(d-2))) with A = 16:
    python experiments/eval_passkey.py ... --set rope='{rope_type: ntk, factor: 16}'
"""

import sys

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.evaluate(["passkey", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
