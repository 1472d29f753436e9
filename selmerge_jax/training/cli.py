"""The command line every experiment script shares: ``--config x.yaml --set a.b=value [--set ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from selmerge_jax.training.config_loader import ConfigError
from selmerge_jax.training.experiment import load_experiment

__all__ = ["experiment_parser", "load_from_args", "print_summary"]


def experiment_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (YAML syntax), e.g. --set train.steps=100; repeatable")
    return parser


def load_from_args(cls, args: argparse.Namespace):
    """The validated config, or exit code 2 with the offending key path (no traceback for a typo)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return load_experiment(cls, args.config, args.set)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def print_summary(summary: dict):
    print("SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
