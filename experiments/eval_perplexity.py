"""Perplexity against context length on the held-out split (chunked prefill): JSON + line plot PNG.

    python experiments/eval_perplexity.py --config experiments/configs/eval_perplexity.yaml \
        --set init.kind=checkpoint --set init.path=runs/demo/checkpoints --set 'lengths=[1024, 4096, 16384]'
"""

from selmerge_jax.evaluation.perplexity import PerplexityEvalConfig
from selmerge_jax.main import evaluate
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/eval_perplexity.yaml").parse_args()
    print_summary(evaluate.main(load_from_args(PerplexityEvalConfig, args)))


if __name__ == "__main__":
    main()
