"""Pretrain a Llama-family model (dense or select-and-merge attention): the same command as
`selmerge-pretrain` (see its --help), run from a checkout.

    python experiments/pretrain.py --config pretrain --set train.steps=200
    python experiments/pretrain.py --config demo --export-npy data/npy   # tokens for TFDS-less boxes

Re-running with the same ``train.output_dir`` resumes from its newest checkpoint.
"""

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.pretrain())


if __name__ == "__main__":
    main()
