"""Load a model, prefill a long prompt, generate; report prefill/decode tokens/s, memory and a passkey check.

    python experiments/infer.py --config experiments/configs/infer.yaml --set init.path=runs/x/checkpoints
"""

from selmerge_jax.main import infer
from selmerge_jax.main.config import InferConfig, experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/infer.yaml").parse_args()
    print_summary(infer.main(load_from_args(InferConfig, args)))


if __name__ == "__main__":
    main()
