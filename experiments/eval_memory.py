"""Memory/speed of a model config across prompt lengths: prefill time, decode tokens/s, compiled and measured
peak memory; JSON + PNG.

    python experiments/eval_memory.py --config experiments/configs/eval_memory.yaml \
        --set 'lengths=[4096, 65536]'
"""

from selmerge_jax.evaluation.memory_report import MemoryReportConfig
from selmerge_jax.main import evaluate
from selmerge_jax.main.config import experiment_parser, load_from_args, print_summary


def main():
    args = experiment_parser(__doc__.splitlines()[0], "experiments/configs/eval_memory.yaml").parse_args()
    print_summary(evaluate.main(load_from_args(MemoryReportConfig, args)))


if __name__ == "__main__":
    main()
