"""Passkey retrieval over a grid of context lengths x key depths: accuracy per cell, JSON + heat map PNG.

    python experiments/eval_passkey.py --config experiments/configs/eval_passkey.yaml \
        --set init.kind=checkpoint --set init.path=runs/demo/checkpoints
    # the CRD NTK inference rule (fixed base' = base * A^(d/(d-2))) with A = 16:
    python experiments/eval_passkey.py ... --set rope='{rope_type: ntk, factor: 16}'
"""

from selmerge_jax.evaluation.passkey import PasskeyEvalConfig
from selmerge_jax.main import evaluate
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/eval_passkey.yaml").parse_args()
    print_summary(evaluate.main(load_from_args(PasskeyEvalConfig, args)))


if __name__ == "__main__":
    main()
