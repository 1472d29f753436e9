"""Fine-tune from our checkpoint, a local Hugging Face model or scratch, full or LoRA, optionally with CRD
NTK: the same command as `selmerge-finetune` (see its --help).

    python experiments/finetune.py --config finetune --set init.path=runs/x/checkpoints
"""

from selmerge_jax.main import cli


def main():
    raise SystemExit(cli.finetune())


if __name__ == "__main__":
    main()
