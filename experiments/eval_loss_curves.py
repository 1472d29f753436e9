"""Train a family of attention configs on the same tokens; overlay loss curves; table of final validation loss
vs attended fraction, FLOPs and memory (JSON + PNG + a markdown table on stdout).

    python experiments/eval_loss_curves.py --config experiments/configs/eval_loss_curves.yaml
    python experiments/eval_loss_curves.py --config ... --set base_config=experiments/configs/gpu_25m_ms.yaml
"""

from selmerge_jax.main import loss_curve_sweep
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0],
                             "experiments/configs/eval_loss_curves.yaml").parse_args()
    result = loss_curve_sweep.main(load_from_args(loss_curve_sweep.LossCurveSweepConfig, args))
    print(result.pop("table"))
    print_summary(result)


if __name__ == "__main__":
    main()
