"""Every command in the README runs as written: the README cannot drift from the CLI, the Makefile and dvc.yaml.

Each fenced shell block, and each inline command (`make ...`, `.venv/bin/...`, `python -m ...`), is split into
commands and checked against the real thing:

- ``make <target>``: the target exists and ``make -n`` accepts the line; ``make profile`` is run for real (in a
  copy) and must leave params.yaml equal to the profile;
- ``python -m <module> <args>``: the module's own argparse parses exactly these arguments (the module runs up to
  ``parse_args`` and stops there), from the project root, with the venv's interpreter or a bare ``python``;
- ``dvc ...``: ``dvc repro <stage>`` names a stage of dvc.yaml; every ``dvc exp run -S key=value`` is a valid
  param (through the same override engine and schema as the pipeline); every option is one the subcommand has;
- ``prefect ...`` / ``mlflow ...``: every option is one the subcommand has, deployments named exist in
  prefect.yaml, files named exist;
- the deploy walkthrough block is run command by command by tests/services (not again here).

A command that no rule knows fails the test, so a new kind of command cannot be added unchecked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
WALKTHROUGH = ("<!-- deploy-walkthrough:start -->", "<!-- deploy-walkthrough:end -->")
INLINE_PREFIXES = ("make ", ".venv/bin/", "python -m ", "dvc ")
# subcommand words of each CLI the README uses (so that options are checked against the right --help)
SUBCOMMANDS = {
    ("dvc", "exp"): 2, ("dvc", "metrics"): 2, ("dvc", "repro"): 1,
    ("prefect", "work-pool"): 2, ("prefect", "worker"): 2, ("prefect", "deployment"): 2, ("prefect", "deploy"): 1,
    ("prefect", "server"): 2, ("mlflow", "server"): 1, ("mlflow", "ui"): 1,
}
GLOBAL_OPTIONS = {"prefect": {"--no-prompt"}}
SHELL = {"export", "mkdir", "timeout", "git", "kill", "cd", "curl"}  # POSIX tools and git, as written


@dataclass(frozen=True)
class Command:
    line: int
    argv: tuple[str, ...]
    walkthrough: bool
    fenced: bool = True  # in a shell block (what a user copies); else an inline mention in the prose

    def __str__(self) -> str:
        return f"README.md:{self.line}: {' '.join(self.argv)}"


def _split(text: str, first_line: int, walkthrough: bool, fenced: bool = True) -> list[Command]:
    commands, buffer, start = [], "", None
    for offset, raw in enumerate(text.splitlines()):
        if start is None:
            start = first_line + offset
        buffer += raw[:-1] + " " if raw.endswith("\\") else raw
        if raw.endswith("\\"):
            continue
        words = shlex.split(buffer, comments=True)
        buffer, line, start = "", start, None
        while words and words[-1] == "&":
            words = words[:-1]
        if words and words[-1].endswith("&") and not words[-1].endswith("&&"):
            words[-1] = words[-1][:-1]
        part: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if part:
                    commands.append(Command(line, tuple(part), walkthrough, fenced))
                part = []
            else:
                part.append(word)
    return commands


def readme_commands() -> list[Command]:
    text = README.read_text(encoding="utf-8")
    start, end = (text.index(marker) for marker in WALKTHROUGH)
    commands = []
    for match in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        line = text[: match.start()].count("\n") + 2
        commands += _split(match.group(1), line, start < match.start() < end)
    fenced = [(m.start(), m.end()) for m in re.finditer(r"```.*?```", text, re.S)]
    for match in re.finditer(r"`([^`\n]+)`", text):
        inside = any(a <= match.start() < b for a, b in fenced)
        if not inside and match.group(1).startswith(INLINE_PREFIXES) and " " in match.group(1):
            commands += _split(match.group(1), text[: match.start()].count("\n") + 1, False, fenced=False)
    return commands


COMMANDS = readme_commands()


def _tool(argv: tuple[str, ...]) -> tuple[str, list[str]]:
    words = list(argv)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
        words.pop(0)
    tool = words[0]
    if tool.startswith(".venv/bin/"):
        tool = tool[len(".venv/bin/"):]
    return tool, words[1:]


def _env() -> dict:
    env = dict(os.environ, COLUMNS="250", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", NO_COLOR="1")
    env.pop("PYTHONPATH", None)
    return env


@lru_cache(maxsize=None)
def _help(tool: str, subcommand: tuple[str, ...]) -> str:
    completed = subprocess.run([str(BIN / tool), *subcommand, "--help"], cwd=REPO, env=_env(), capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, f"{tool} {' '.join(subcommand)} --help failed: {completed.stderr[-2000:]}"
    return completed.stdout + completed.stderr


def _check_options(tool: str, words: list[str], command: Command) -> tuple[list[str], list[str]]:
    words = [w for w in words if w not in GLOBAL_OPTIONS.get(tool, set())]
    depth = SUBCOMMANDS.get((tool, words[0] if words else ""))
    assert depth is not None, f"{command}: no rule for `{tool} {words[0] if words else ''}`: add it to SUBCOMMANDS"
    subcommand, rest = words[:depth], words[depth:]
    text = _help(tool, tuple(subcommand))
    for word in rest:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                f"{command}: `{tool} {' '.join(subcommand)}` has no option {option}"
    return subcommand, rest


def _check_python(argv: list[str], command: Command) -> None:
    assert argv[0] == "-m", f"{command}: run modules with -m"
    module, args = argv[1], argv[2:]
    probe = (
        "import argparse, runpy, sys\n"
        "def parse(self, args=None, namespace=None):\n"
        "    ns, extra = self.parse_known_args(args, namespace)\n"
        "    if extra: self.error('unrecognized arguments: ' + ' '.join(extra))\n"
        "    print('PARSED', sorted(vars(ns).items())); sys.exit(0)\n"
        "argparse.ArgumentParser.parse_args = parse\n"
        f"sys.argv = [{module!r}] + sys.argv[1:]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "print('NO ARGPARSE'); sys.exit(3)\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, env=_env(), capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0 and "PARSED" in completed.stdout, (
        f"{command}: the module's CLI refuses it:\n{completed.stdout[-1500:]}{completed.stderr[-1500:]}")


def _check_make(words: list[str], command: Command) -> None:
    variables = [w for w in words if "=" in w]
    targets = [w for w in words if "=" not in w]
    makefile = (REPO / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{command}: no make target {target!r}"
    completed = subprocess.run(["make", "-n", *words], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"{command}: make -n failed: {completed.stderr[-1500:]}"
    profile = dict(v.split("=", 1) for v in variables).get("PROFILE")
    if targets == ["profile"] and profile:  # quick: run it for real, in a copy
        return _run_make_profile(profile, command)
    if profile:
        assert (REPO / "profiles" / f"{profile}.yaml").is_file(), f"{command}: no profile {profile!r}"


def _run_make_profile(profile: str, command: Command) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        shutil.copy(REPO / "Makefile", copy / "Makefile")
        shutil.copytree(REPO / "profiles", copy / "profiles")
        shutil.copy(REPO / "params.yaml", copy / "params.yaml")
        completed = subprocess.run(["make", "profile", f"PROFILE={profile}"], cwd=copy, env=_env(),
                                   capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, f"{command}: {completed.stderr}"
        assert (copy / "params.yaml").read_text() == (REPO / "profiles" / f"{profile}.yaml").read_text()


def _check_dvc(words: list[str], command: Command) -> None:
    subcommand, rest = _check_options("dvc", words, command)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    if subcommand == ["repro"]:
        for target in (w for w in rest if not w.startswith("-")):
            assert target.split("@")[0] in stages, f"{command}: no dvc stage {target!r}"
    if subcommand == ["exp", "run"]:
        from flexkd.config import parse_config
        from flexkd.overrides import parse_set, set_dotted

        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        settings = [rest[i + 1] for i, w in enumerate(rest[:-1]) if w in ("-S", "--set-param")]
        if not settings and not command.fenced:  # the prose naming the option, not a command to run
            return
        for key, value in parse_set(settings).items():
            set_dotted(raw, key, value)
        parse_config(raw, source=str(command))  # a wrong key or value fails, naming it


def _check_prefect(words: list[str], command: Command) -> None:
    subcommand, rest = _check_options("prefect", words, command)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    names = {d["name"] for d in deployments}
    flows = {f"{d['entrypoint'].split(':')[1]}" for d in deployments}
    for i, word in enumerate(rest):
        if word == "--base-job-template":
            assert (REPO / rest[i + 1]).is_file(), f"{command}: no file {rest[i + 1]}"
        if subcommand == ["deploy"] and word == "--name":
            assert rest[i + 1] in names, f"{command}: prefect.yaml has no deployment named {rest[i + 1]!r}"
    if subcommand == ["deployment", "run"]:
        flow_name, _, name = rest[0].partition("/")
        assert name in names and any(d["name"] == name for d in deployments), f"{command}: no deployment {rest[0]!r}"
        assert flows, f"{command}: prefect.yaml names no flows"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}-{c.argv[0]}-{'-'.join(c.argv[1:3])}" for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command):
    if command.walkthrough:  # run for real, command by command, by tests/services/test_services.py
        assert "walkthrough" in (REPO / "tests" / "services" / "test_services.py").read_text()
        return
    tool, words = _tool(command.argv)
    if tool in ("python", "python3"):
        _check_python(words, command)
    elif tool == "make":
        _check_make(words, command)
    elif tool == "dvc":
        _check_dvc(words, command)
    elif tool == "prefect":
        _check_prefect(words, command)
    elif tool in ("mlflow", "pytest"):
        if tool == "mlflow":
            _check_options("mlflow", words, command)
        else:
            assert (BIN / "pytest").exists() and all(m in ("slow", "services", "not", "and", "or")
                                                     for m in " ".join(words[1:]).split()), str(command)
    elif tool in SHELL:
        assert shutil.which(tool) or tool in ("export", "cd"), f"{command}: {tool} is not installed"
    else:
        pytest.fail(f"{command}: no rule checks `{tool}` commands; add one to tests/unit/test_readme.py")


def test_the_readme_has_the_commands_a_user_needs():
    lines = {" ".join(c.argv) for c in COMMANDS}
    assert {"make run", "make test"} <= lines
    assert any(c.argv[:3] == (".venv/bin/python", "-m", "flows.distill") for c in COMMANDS)
    assert sum(c.walkthrough for c in COMMANDS) >= 10
    bare = [str(c) for c in COMMANDS if c.fenced and not c.walkthrough and c.argv[0] in ("python", "python3", "dvc")
            and c.line < _walkthrough_line()]
    assert not bare, f"write .venv/bin/... so that these run without an activated venv: {bare}"


def _walkthrough_line() -> int:
    text = README.read_text(encoding="utf-8")
    return text[: text.index(WALKTHROUGH[0])].count("\n") + 1


def test_readme_links_point_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" in target:
            continue
        path = (REPO / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"README links to {target}, which is not in the repository"
