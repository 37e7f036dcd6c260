"""What the benchmark commands share: the profile they read (``--params``, ``--set``) and where they work.

``python -m benchmarks.tune``, ``.ablate``, ``.teacher``, ``.curve``, ``.runtime`` and ``.run`` take a params
file with dotted overrides the way ``python -m flows.pipeline --set`` does (:mod:`flexkd.overrides`); a
malformed ``--set`` or a missing file is a usage error naming it, before anything runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SET_HELP = "override a param (YAML value), e.g. --set distill.train.epochs=1 (repeatable)"


def add_profile_args(parser: argparse.ArgumentParser, default_params: str | Path | None = None,
                     params_help: str = "the profile (default: params.yaml)") -> None:
    """``--params FILE`` and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("--params", default=str(default_params or REPO / "params.yaml"), help=params_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_teacher_from(parser: argparse.ArgumentParser) -> None:
    """``--teacher-from WORKSPACE``: reuse a finished run's teacher (``benchmarks.tune.adopt_shared``)."""
    parser.add_argument("--teacher-from", default=None, metavar="WORKSPACE",
                        help="reuse the prepared data, tuned teacher, relevance index and teacher cache of a finished "
                             "run of the same profile and seed (a project, or a benchmarks.run workspace such as "
                             "benchmarks/work/sst2-bench-seed42) instead of running those stages again")


def overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The ``--set`` items as ``{dotted key: value}``; a malformed one is a usage error (exit status 2)."""
    from flexkd.errors import ConfigError
    from flexkd.overrides import parse_set

    try:
        return parse_set(args.set)
    except ConfigError as err:
        parser.error(str(err))


def read_profile(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The ``--params`` file as a dict with the ``--set`` overrides applied (validated later, by the run)."""
    from flexkd.errors import ConfigError
    from flexkd.overrides import load_profile

    sets = overrides(parser, args)
    if not Path(args.params).is_file():
        parser.error(f"--params {args.params}: no such file (a profile is profiles/<name>.yaml)")
    try:
        return load_profile(args.params, sets)
    except ConfigError as err:
        parser.error(str(err))


def work_dir(args: argparse.Namespace, raw: dict, kind: str) -> Path:
    """``--work-dir``, else ``benchmarks/work/<kind>-<task>-seed<seed>`` for the profile's task and seed."""
    if args.work_dir:
        return Path(args.work_dir)
    seed = raw.get("project", {}).get("seed", 42)
    return REPO / "benchmarks" / "work" / f"{kind}-{raw['data']['task']}-seed{seed}"
