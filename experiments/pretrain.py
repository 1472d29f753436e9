"""Pretrain a Llama-family model (dense or select-and-merge attention) from a YAML config.

    python experiments/pretrain.py --config experiments/configs/pretrain.yaml --set train.steps=200
    python experiments/pretrain.py --config ... --export-npy data/npy   # tokenized corpus for TFDS-less boxes

Re-running with the same ``train.output_dir`` resumes from its newest checkpoint.
"""

from selmerge_jax.training.cli import experiment_parser, load_from_args, print_summary
from selmerge_jax.training.experiment import PretrainConfig
from selmerge_jax.training.runner import export_npy, plot_loss_curve, run_pretrain, train_summary


def main():
    parser = experiment_parser(__doc__.splitlines()[0], "experiments/configs/pretrain.yaml")
    parser.add_argument("--export-npy", metavar="DIR", help="only write the tokenized splits as .npy to DIR")
    args = parser.parse_args()
    cfg = load_from_args(PretrainConfig, args)
    if args.export_npy:
        print_summary(export_npy(cfg, args.export_npy))
        return
    result = run_pretrain(cfg)
    plot_loss_curve(f"{cfg.train.output_dir}/metrics.jsonl", f"{cfg.train.output_dir}/loss_curve.png")
    print_summary(train_summary(cfg, result))


if __name__ == "__main__":
    main()
