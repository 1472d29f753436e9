"""The issue #7 reproduction in one time-bounded command: loss-curve family, CRD NTK run and its plain twin,
passkey grid on both, KV-compression fidelity; JSON/PNG/MD as each stage finishes, study.json with (a)(b)(c).

    python experiments/eval_reproduction.py --config experiments/configs/eval_reproduction_h100.yaml \
        --set output_dir=$OUT/study
"""

from selmerge_jax.main import reproduce
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0],
                             "experiments/configs/eval_reproduction_h100.yaml").parse_args()
    try:
        status = reproduce.main(load_from_args(reproduce.ReproductionConfig, args))
    except FileNotFoundError as e:  # missing data: one line, not a traceback
        raise SystemExit(f"eval_reproduction: error: {e}") from None
    print(status.get("fidelity_table", ""))
    print_summary({k: status[k] for k in ("acceptance", "passkey", "family", "elapsed_s") if k in status})
    reason = reproduce.failure(status)
    if reason:  # exit 1 with the reason after the summary of what did finish
        raise SystemExit(f"eval_reproduction: {reason}")


if __name__ == "__main__":
    main()
