"""The same prompts decoded with each KV-compression setting and without: kept ratio, token Jaccard,
exact-prefix length, ROUGE-L per prompt; summary table on stdout, JSON + PNG.

    python experiments/eval_fidelity.py --config experiments/configs/eval_fidelity.yaml \
        --set init.kind=checkpoint --set init.path=runs/demo/checkpoints
"""

from selmerge_jax.evaluation.fidelity import FidelityEvalConfig
from selmerge_jax.main import evaluate
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/eval_fidelity.yaml").parse_args()
    result = evaluate.main(load_from_args(FidelityEvalConfig, args))
    print(result.pop("table"))
    print_summary(result)


if __name__ == "__main__":
    main()
