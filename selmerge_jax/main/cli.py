"""The command line: the console scripts of ``pyproject.toml`` and the ``experiments/*.py`` wrappers.

=====================  ==================================================================================
console script         what it runs
=====================  ==================================================================================
``selmerge-pretrain``  :func:`pretrain`: ``main.pretrain.main`` on a :class:`PretrainConfig`
``selmerge-finetune``  :func:`finetune`: ``main.finetune.main`` (LoRA, CRD NTK; shapes from ``init.path``)
``selmerge-infer``     :func:`infer`: ``main.infer.main``
``selmerge-eval``      :func:`evaluate`: one study per task (``selmerge-eval passkey``, ``perplexity``...)
``selmerge-bench``     :func:`bench`: a benchmark script of a source checkout (``experiments/benchmarks``)
``selmerge-export``    ``main.export.main``: a checkpoint as a Hugging Face directory (LoRA merged)
=====================  ==================================================================================

Every command takes ``--config`` (a YAML path relative to the working directory, or the name of a config
shipped with the package; each command has a packaged default), ``--set key.path=value`` and
``--print-config`` (the resolved config, every default filled in, usable as a ``--config`` file). Commands
that write a run also write that resolved config as ``config.yaml`` into their output directory before they
start; the training commands refuse to start a fresh run (``checkpoint.resume=false``) in a directory that
holds another run unless ``--overwrite`` clears it, and ``--allow-change`` names the config fields a resumed
run may change.

Errors: :func:`run_cli` is the one place that turns a :class:`~selmerge_jax.validation.UserError` (a bad
path or value, missing data, a refused run, a corrupted checkpoint, a diverged loss) into one line on stderr
and a non-zero exit (2 for a config error, 1 otherwise). Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Sequence

import yaml

import selmerge_jax
from selmerge_jax.config_io import ConfigError
from selmerge_jax.evaluation.fidelity import FidelityEvalConfig
from selmerge_jax.evaluation.memory_report import MemoryReportConfig
from selmerge_jax.evaluation.passkey import PasskeyEvalConfig
from selmerge_jax.evaluation.perplexity import PerplexityEvalConfig
from selmerge_jax.main import evaluate as evaluate_main
from selmerge_jax.main import finetune as finetune_main
from selmerge_jax.main import infer as infer_main
from selmerge_jax.main import loss_curve_sweep, reproduce
from selmerge_jax.main import pretrain as pretrain_main
from selmerge_jax.main.config import (
    FinetuneConfig,
    InferConfig,
    PretrainConfig,
    config_to_dict,
    configure_logging,
    load_experiment,
    packaged_configs,
    print_summary,
    with_checkpoint_model,
)
from selmerge_jax.sharding import distributed
from selmerge_jax.validation import UserError

__all__ = ["BENCHMARKS_DIR", "EVAL_TASKS", "bench", "claim_output_dir", "evaluate", "finetune",
           "infer", "pretrain", "run_cli"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Command:
    """One runnable config: its schema, what runs it, its packaged default config, and how to report."""

    schema: type
    run: Callable
    default_config: str | None
    description: str
    report: Callable[[dict], None] = print_summary


def _table_then_summary(result: dict) -> None:
    print(result.pop("table"))
    print_summary(result)


def _reproduction_report(status: dict) -> None:
    print(status.get("fidelity_table", ""))
    print_summary({k: status[k] for k in ("acceptance", "passkey", "family", "elapsed_s") if k in status})


PRETRAIN = _Command(PretrainConfig, pretrain_main.main, "pretrain", """\
Pretrain a Llama-family model (dense or select-and-merge attention) from a YAML config. Re-running with the
same train.output_dir resumes from its newest checkpoint; checkpoint.resume=false starts over and refuses a
directory that holds another run (--overwrite clears it). Writes metrics.jsonl, TensorBoard scalars,
loss_curve.png, checkpoints/ and the resolved config.yaml into train.output_dir.""")

FINETUNE = _Command(FinetuneConfig, finetune_main.main, "finetune", """\
Fine-tune from one of our checkpoints, a local Hugging Face model or scratch: all weights or LoRA adapters,
optionally with CRD NTK positions (the scale in use is logged every step). With init.kind=checkpoint the model
shapes come from the checkpoint; a model section without a preset changes only the fields it names
(e.g. --set model.attention=dense).""")

INFER = _Command(InferConfig, infer_main.main, "infer", """\
Load a trained model, prefill a long prompt, generate; report prefill and decode speed, memory and a passkey
check (one JSON line appended to `output`).""")

# selmerge-eval's tasks: the evaluation studies of ``main.evaluate`` (and the sweeps that train first).
EVAL_TASKS = {
    "passkey": _Command(PasskeyEvalConfig, evaluate_main.main, "eval_passkey", """\
Passkey retrieval over a grid of context lengths x key depths: accuracy per cell, JSON + heat map PNG. Any
position rule at inference, e.g. the CRD NTK fixed base: --set 'rope={rope_type: ntk, factor: 16}'."""),
    "perplexity": _Command(PerplexityEvalConfig, evaluate_main.main, "eval_perplexity", """\
Perplexity against context length on the held-out split (chunked prefill): JSON + line plot PNG."""),
    "fidelity": _Command(FidelityEvalConfig, evaluate_main.main, "eval_fidelity", """\
The same prompts decoded with each KV-compression setting and without: kept ratio, token Jaccard,
exact-prefix length, ROUGE-L per prompt; a summary table on stdout, JSON + PNG.""", _table_then_summary),
    "memory": _Command(MemoryReportConfig, evaluate_main.main, "eval_memory", """\
Memory and speed of a model config across prompt lengths: prefill time, decode tokens/s, compiled and
measured peak memory; JSON + PNG."""),
    "loss-curves": _Command(loss_curve_sweep.LossCurveSweepConfig, loss_curve_sweep.main, "eval_loss_curves",
                            """\
Train a family of attention configs on the same tokens, overlay their loss curves, and tabulate the final
validation loss against attended fraction, FLOPs and memory (JSON + PNG + a markdown table on stdout).""",
                            _table_then_summary),
    "reproduction": _Command(reproduce.ReproductionConfig, reproduce.main, None, """\
The paper-claims reproduction in one time-bounded command: loss-curve family, CRD NTK run and its plain
twin, passkey grid on both, KV-compression fidelity. Needs --config (in a checkout:
experiments/configs/eval_reproduction_cpu.yaml or eval_reproduction_h100.yaml).""", _reproduction_report),
}

_EPILOG = """\
--config takes a YAML file (relative to the working directory) or a packaged config: {packaged}.
--set key.path=value overrides one value (YAML syntax), e.g. --set train.steps=100; repeatable.
"""


# ---- the one place that turns user mistakes into one line -------------------------------------------------

def _quiet_aborted_reads(unraisable) -> None:
    """Drops the aftermath of an unreadable checkpoint: orbax's reads still in flight finish after its event
    loop was closed (``RuntimeError: Event loop is closed``) or are garbage-collected as coroutines holding
    their read error, and Python reports each as unraisable, a screenful of tracebacks around the one-line
    error that already names the step and directory. Everything else goes to Python's default hook."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    if not _from_orbax(unraisable.exc_traceback):
        sys.__unraisablehook__(unraisable)


def _from_orbax(tb) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


# asyncio names the class of the future it reports: "Future", "Task", "_GatheringFuture" (the outer future of
# the gather over a step's reads: a CI run printed its traceback when only the first two were matched)
_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved(\n|$)")


class _AbortedReadLogs(logging.Filter):
    """The same aftermath through asyncio's logger: a read future that held its error when the restore gave up
    is garbage-collected ("Future exception was never retrieved"), possibly after the one-line error. Only
    checkpoint reads (an orbax frame, or tensorstore's OCDBT error) are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not _NEVER_RETRIEVED.match(message):
            return True
        tb = record.exc_info[2] if record.exc_info else None
        return not ("OCDBT" in message or _from_orbax(tb))


_ABORTED_READ_LOGS = _AbortedReadLogs()


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Runs ``body``; a :class:`UserError` becomes ``<prog>: error: <message>`` on stderr and exit code 1
    (``config error`` and 2 for a :class:`ConfigError`). Anything else propagates with its traceback."""
    sys.unraisablehook = _quiet_aborted_reads
    logging.getLogger("asyncio").addFilter(_ABORTED_READ_LOGS)
    try:
        return body() or 0
    except ConfigError as error:
        print(f"{prog}: config error: {error}", file=sys.stderr, flush=True)
        return 2
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1


# ---- parsing ----------------------------------------------------------------------------------------------

def _parser(prog: str, command: _Command, *, trains: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=command.description,
                                     epilog=_EPILOG.format(packaged=", ".join(packaged_configs())),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = command.default_config
    parser.add_argument("--config", default=default, metavar="NAME_OR_PATH",
                        help="YAML config file or packaged config name "
                             f"(default: {default or 'none, required'})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (YAML syntax); repeatable")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every default filled in) as YAML and exit")
    if trains:
        parser.add_argument("--overwrite", action="store_true",
                            help="delete train.output_dir (and checkpoint.directory) before starting")
        parser.add_argument("--allow-change", action="append", default=[], metavar="FIELD[,FIELD...]",
                            help="config fields a resumed run may change (e.g. steps,learning_rate); every "
                                 "accepted difference is logged; repeatable")
    return parser


def _load(command: _Command, args: argparse.Namespace, prog: str):
    if args.config is None:
        raise UserError(f"{prog} needs --config (no packaged default)")
    overrides = list(args.set)
    allowed = [f.strip() for item in getattr(args, "allow_change", []) for f in item.split(",") if f.strip()]
    if allowed:
        overrides.append(f"checkpoint.allow_changes=[{', '.join(allowed)}]")
    cfg = load_experiment(command.schema, args.config, overrides)
    if isinstance(cfg, FinetuneConfig):
        cfg = with_checkpoint_model(cfg)  # the printed and stored config shows the model that trains
    return cfg


def _config_yaml(cfg, prog: str) -> str:
    return (f"# the resolved config of {prog} (every default filled in); usable as --config\n"
            + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=110))


def _write_config(cfg, directory: str, prog: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(_config_yaml(cfg, prog))


# ---- output directories -----------------------------------------------------------------------------------

def _run_dirs(cfg: PretrainConfig) -> list[str]:
    dirs = [cfg.train.output_dir]
    if cfg.checkpoint.directory:
        dirs.append(cfg.checkpoint.directory)
    return [os.path.abspath(os.path.expanduser(d)) for d in dirs]


def _safe_to_delete(path: str) -> None:
    here = os.path.abspath(os.getcwd())
    home = os.path.abspath(os.path.expanduser("~"))
    if here == path or here.startswith(path + os.sep) or path in (home, os.path.abspath(os.sep)) or (
            os.path.exists(os.path.join(path, ".git"))):
        raise UserError(f"--overwrite would delete {path}, which holds the working directory, a home or a "
                        "git repository; choose another train.output_dir")


def claim_output_dir(cfg: PretrainConfig, overwrite: bool, *, delete: bool = True) -> None:
    """``--overwrite`` deletes the run's directories; otherwise a fresh run (``checkpoint.resume=false``)
    refuses directories that already hold files (its checkpoints, metrics and plots would mix with theirs).

    ``delete=False`` checks only: the other processes of a multi-process job refuse what the primary refuses
    and leave the deleting to it, so processes sharing a disk never race over one directory."""
    for path in _run_dirs(cfg):
        if not os.path.isdir(path) or not os.listdir(path):
            continue
        if overwrite:
            _safe_to_delete(path)
            if delete:
                _log.warning("--overwrite: deleting %s", path)
                shutil.rmtree(path)
        elif not cfg.checkpoint.resume:
            raise UserError(f"{path} is not empty and checkpoint.resume=false: a fresh run there would mix "
                            "its checkpoints, metrics and plots with the earlier run's. Write to a new "
                            "directory (--set train.output_dir=...) or pass --overwrite to delete it first")


# ---- the commands -----------------------------------------------------------------------------------------

def _untrained_warning(cfg) -> None:
    init = getattr(cfg, "init", None)
    if init is not None and init.kind == "scratch":
        print("WARNING: init.kind=scratch: this evaluates an UNTRAINED, randomly initialised model; its "
              "numbers describe no trained model. Pass --set init.kind=checkpoint "
              "--set init.path=<run>/checkpoints.",
              file=sys.stderr, flush=True)


def _load_unless_printed(command: _Command, args: argparse.Namespace, prog: str):
    """The resolved config, or None once ``--print-config`` printed it (the command then stops there)."""
    cfg = _load(command, args, prog)
    if args.print_config:
        print(_config_yaml(cfg, prog), end="")
        return None
    return cfg


def _training(prog: str, command: _Command, argv: Sequence[str] | None,
              extend: Callable[[argparse.ArgumentParser], None] | None = None,
              before: Callable[[argparse.Namespace, object], bool] | None = None) -> int:
    parser = _parser(prog, command, trains=True)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    configure_logging()

    def body() -> int:
        cfg = _load_unless_printed(command, args, prog)
        if cfg is None:
            return 0
        if before is not None and before(args, cfg):
            return 0
        cfg.data.require_files()  # before a model is built
        primary = distributed.is_primary()
        claim_output_dir(cfg, args.overwrite, delete=primary)
        if primary:
            _write_config(cfg, cfg.train.output_dir, prog)
        distributed.barrier("output directory claimed")  # nobody writes there before the primary deleted it
        command.report(command.run(cfg))
        return 0

    return run_cli(prog, body)


def _study(prog: str, command: _Command, args: argparse.Namespace) -> int:
    configure_logging()

    def body() -> int:
        cfg = _load_unless_printed(command, args, prog)
        if cfg is None:
            return 0
        _untrained_warning(cfg)
        data = getattr(cfg, "data", None)
        if data is not None and hasattr(data, "require_files"):
            data.require_files(train=False)
        out = cfg.output_dir if hasattr(cfg, "output_dir") else os.path.dirname(os.path.abspath(cfg.output))
        _write_config(cfg, out, prog)
        command.report(command.run(cfg))
        return 0

    return run_cli(prog, body)


def pretrain(argv: Sequence[str] | None = None) -> int:
    """``selmerge-pretrain``; ``--export-npy DIR`` only writes the tokenized splits (for TFDS-less boxes)."""
    def extend(parser):
        parser.add_argument("--export-npy", metavar="DIR",
                            help="only write the tokenized train/validation splits as .npy files to DIR")

    def export(args, cfg) -> bool:
        if args.export_npy:
            print_summary(pretrain_main.export_npy(cfg, args.export_npy))
        return bool(args.export_npy)

    return _training("selmerge-pretrain", PRETRAIN, argv, extend, export)


def finetune(argv: Sequence[str] | None = None) -> int:
    """``selmerge-finetune``."""
    return _training("selmerge-finetune", FINETUNE, argv)


def infer(argv: Sequence[str] | None = None) -> int:
    """``selmerge-infer``."""
    prog = "selmerge-infer"
    return _study(prog, INFER, _parser(prog, INFER).parse_args(argv))


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``selmerge-eval TASK [--config ...] [--set ...]``: the study of one task."""
    prog = "selmerge-eval"
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model: one study per task, each with its packaged default config. Weights "
                    "come from init (kind: checkpoint, path: <run>/checkpoints), a local Hugging Face "
                    "directory (kind: hf) or scratch (an untrained model, said loudly).")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, command in EVAL_TASKS.items():
        sub = _parser(f"{prog} {name}", command)
        summary = re.split(r"[:.;] ", command.description)[0]
        tasks.add_parser(name, parents=[sub], add_help=False, help=summary, description=command.description,
                         epilog=sub.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    return _study(f"{prog} {args.task}", EVAL_TASKS[args.task], args)


# ---- benchmarks -------------------------------------------------------------------------------------------

# The benchmarks are scripts of a source checkout (floor 9: they may pin env vars before JAX starts, pull in
# torch, write result files under experiments/results), not part of the installed package.
BENCHMARKS_DIR = pathlib.Path(selmerge_jax.__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _benchmarks(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("*.py"))}


def bench(argv: Sequence[str] | None = None) -> int:
    """``selmerge-bench NAME [ARGS...]``: runs ``experiments/benchmarks/[bench_]NAME.py ARGS`` of the checkout
    this package is installed from (``pip install -e .``), or of ``$SELMERGE_CHECKOUT``."""
    prog = "selmerge-bench"
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        checkout = os.environ.get("SELMERGE_CHECKOUT")
        directory = pathlib.Path(checkout) / "experiments" / "benchmarks" if checkout else BENCHMARKS_DIR
        if not directory.is_dir():
            raise UserError(f"no benchmarks at {directory}: they are scripts of a source checkout; clone the "
                            "repository and `pip install -e .` there (or set SELMERGE_CHECKOUT)")
        found = _benchmarks(directory)
        if not argv or argv[0] in ("-h", "--help", "--list"):
            print(f"usage: {prog} NAME [ARGS...]   (NAME --help shows a benchmark's own options)\n"
                  f"benchmarks in {directory}:\n" + "\n".join(f"  {n}" for n in found))
            return 0 if argv else 2
        if argv[0] not in found:
            raise UserError(f"NAME={argv[0]!r}: no such benchmark; allowed: {', '.join(found)}")
        script = str(found[argv[0]])
        sys.stdout.flush()
        # the script's own process (it may set env vars before JAX starts) and its exit code
        os.execv(sys.executable, [sys.executable, script, *argv[1:]])
        return 0  # not reached

    return run_cli(prog, body)
