"""Train a family of attention configs on the same tokens; overlay loss curves: `selmerge-eval loss-curves`.

    python experiments/eval_loss_curves.py
    python experiments/eval_loss_curves.py --config experiments/configs/eval_loss_curves_gpu.yaml
"""

import sys

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.evaluate(["loss-curves", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
