"""Fine-tune from our checkpoint, a local Hugging Face model or scratch: full or LoRA, optionally with CRD
NTK.

    python experiments/finetune.py --config experiments/configs/finetune.yaml \
        --set init.path=runs/x/checkpoints
"""

from selmerge_jax.main import finetune
from selmerge_jax.main.config import FinetuneConfig, experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/finetune.yaml").parse_args()
    print_summary(finetune.main(load_from_args(FinetuneConfig, args)))


if __name__ == "__main__":
    main()
