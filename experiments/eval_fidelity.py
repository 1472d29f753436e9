"""The same prompts decoded with each KV-compression setting and without: kept ratio, token Jaccard,
exact-prefix length, ROUGE-L per prompt; summary table on stdout, JSON + PNG.

    python experiments/eval_fidelity.py --config experiments/configs/eval_fidelity.yaml \
        --set init.kind=checkpoint --set init.path=runs/demo/checkpoints
"""

from selmerge_jax.evaluation.fidelity import FidelityEvalConfig, run_fidelity
from selmerge_jax.training.cli import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/eval_fidelity.yaml").parse_args()
    result = run_fidelity(load_from_args(FidelityEvalConfig, args))
    print(result.pop("table"))
    print_summary(result)


if __name__ == "__main__":
    main()
