"""`make demo`: build the embedded corpus, pretrain a tiny select-and-merge model on CPU for a few minutes,
restore it, generate, check passkeys, plot the loss curve and print the final loss vs the unigram entropy.

    python experiments/demo.py [--config demo] [--set train.steps=100]
"""

import sys

from selmerge_jax.main import demo
from selmerge_jax.main.config import PretrainConfig, experiment_parser, load_from_args


def main():
    cfg = load_from_args(PretrainConfig,
                         experiment_parser(__doc__.split("\n\n")[0], "demo")
                         .parse_args())
    result = demo.main(cfg)
    # The demo's promise: context helps, i.e. on held-out text the model beats the best context-free predictor
    # (the unigram distribution of that same text) by a clear margin. Train loss swings with the document in
    # the shuffle buffer, so the fixed validation batches decide.
    if result["final_val_loss"] > 0.75 * result["val_unigram_entropy"]:
        print("demo FAILED: the validation loss is not well below the unigram entropy", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
