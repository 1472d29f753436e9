"""Fine-tune from our checkpoint, a local Hugging Face model or scratch: full or LoRA, optionally with CRD NTK.

    python experiments/finetune.py --config experiments/configs/finetune.yaml --set init.path=runs/x/checkpoints
"""

from selmerge_jax.training.cli import experiment_parser, load_from_args, print_summary
from selmerge_jax.training.experiment import FinetuneConfig
from selmerge_jax.training.runner import plot_loss_curve, run_finetune, train_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/finetune.yaml").parse_args()
    cfg = load_from_args(FinetuneConfig, args)
    result = run_finetune(cfg)
    plot_loss_curve(f"{cfg.train.output_dir}/metrics.jsonl", f"{cfg.train.output_dir}/loss_curve.png")
    print_summary(train_summary(cfg, result))


if __name__ == "__main__":
    main()
