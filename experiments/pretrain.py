"""Pretrain a Llama-family model (dense or select-and-merge attention) from a YAML config.

    python experiments/pretrain.py --config experiments/configs/pretrain.yaml --set train.steps=200
    python experiments/pretrain.py --config ... --export-npy data/npy   # tokenized corpus for TFDS-less boxes

Re-running with the same ``train.output_dir`` resumes from its newest checkpoint.
"""

from selmerge_jax.main import pretrain
from selmerge_jax.main.config import PretrainConfig, experiment_parser, load_from_args, print_summary


def main():
    parser = experiment_parser(__doc__.splitlines()[0], "experiments/configs/pretrain.yaml")
    parser.add_argument("--export-npy", metavar="DIR", help="only write the tokenized splits as .npy to DIR")
    args = parser.parse_args()
    cfg = load_from_args(PretrainConfig, args)
    if args.export_npy:
        print_summary(pretrain.export_npy(cfg, args.export_npy))
        return
    print_summary(pretrain.main(cfg))


if __name__ == "__main__":
    main()
