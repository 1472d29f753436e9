"""Load a model, prefill a long prompt, generate; report prefill/decode tokens/s, memory and a passkey check:
the same command as `selmerge-infer` (see its --help).

    python experiments/infer.py --config infer --set init.path=runs/x/checkpoints
"""

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.infer())


if __name__ == "__main__":
    main()
