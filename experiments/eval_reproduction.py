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
    status = reproduce.main(load_from_args(reproduce.ReproductionConfig, args))
    print(status.get("fidelity_table", ""))
    print_summary({k: status[k] for k in ("acceptance", "passkey", "family", "elapsed_s") if k in status})


if __name__ == "__main__":
    main()
