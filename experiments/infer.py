"""Load a model, prefill a long prompt, generate; report prefill/decode tokens/s, memory and a passkey check.

    python experiments/infer.py --config experiments/configs/infer.yaml --set init.path=runs/x/checkpoints
"""

from selmerge_jax.training.cli import experiment_parser, load_from_args, print_summary
from selmerge_jax.training.experiment import InferConfig
from selmerge_jax.training.inference import run_infer


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/infer.yaml").parse_args()
    print_summary(run_infer(load_from_args(InferConfig, args)))


if __name__ == "__main__":
    main()
