"""Run the README's deployment walkthrough step by step, as a person would type it.

The walkthrough lives in one place: the fenced ``bash`` block of README.md between ``<!-- deploy-walkthrough:start -->``
and ``<!-- deploy-walkthrough:end -->``. :func:`extract` reads it; :class:`Runner` runs it, so that the README
and the services test cannot drift apart. The rules, which the README states too:

- blank lines and lines starting with ``#`` are skipped; a line ending in ``\\`` continues on the next;
- a command ending in ``&`` is a service (a server, a worker): it is started in a process group of its own and
  left running; the runner stops it (and every process under it) by PID at the end, even on failure;
- any other command runs in ``bash -euo pipefail`` in the project directory and must exit 0; the variables it
  exports carry over to the next commands, as in one shell. The test sets its own values (free ports, temporary
  directories) for the variables the walkthrough gives defaults with ``${VAR:-default}``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

START = "<!-- deploy-walkthrough:start -->"
END = "<!-- deploy-walkthrough:end -->"
_BACKGROUND = re.compile(r"\s&\s*$")


@dataclass(frozen=True)
class Step:
    command: str
    background: bool
    line: int  # 1-based line of README.md where the command starts


def extract(readme: str) -> list[Step]:
    """The walkthrough's commands, in order, from the README text."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md must hold exactly one {START} ... {END} section")
    start = readme.index(START)
    end = readme.index(END)
    if end < start:
        raise ValueError(f"{END} comes before {START} in README.md")
    first_line = readme[:start].count("\n") + 1
    lines = readme[start:end].splitlines()
    try:
        open_at = next(i for i, line in enumerate(lines) if line.strip() == "```bash")
        close_at = next(i for i in range(open_at + 1, len(lines)) if lines[i].strip() == "```")
    except StopIteration:
        raise ValueError("the deploy walkthrough section must hold one ```bash fenced block") from None
    if any(line.strip().startswith("```") for line in lines[close_at + 1:]):
        raise ValueError("the deploy walkthrough section must hold exactly one fenced block")
    steps: list[Step] = []
    pending: list[str] = []
    pending_line = 0
    for offset, raw in enumerate(lines[open_at + 1:close_at], start=open_at + 1):
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            pending_line = first_line + offset
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line.strip() if pending else line)
        command = " ".join(part.strip() for part in pending)
        pending = []
        background = bool(_BACKGROUND.search(command))
        if background:
            command = _BACKGROUND.sub("", command)
        steps.append(Step(command=command, background=background, line=pending_line))
    if pending:
        raise ValueError("the deploy walkthrough ends inside a continued (\\) line")
    if not steps:
        raise ValueError("the deploy walkthrough block holds no command")
    return steps


@dataclass
class Service:
    step: Step
    process: subprocess.Popen
    log: Path

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Runner:
    """Runs steps in ``cwd`` with ``env``; keeps the exported variables; stops every service it started."""

    cwd: Path
    env: dict[str, str]
    logs: Path
    deadline: float  # time.monotonic() by which every foreground step must be done
    services: list[Service] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def run(self, step: Step) -> subprocess.CompletedProcess | Service:
        return self.start(step) if step.background else self.execute(step)

    def _log_path(self, step: Step) -> Path:
        self.logs.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w]+", "-", " ".join(step.command.split()[:3])).strip("-")[:40]
        return self.logs / f"step-{step.line:04d}-{name}.log"

    def start(self, step: Step) -> Service:
        log = self._log_path(step)
        handle = open(log, "w")
        try:
            process = subprocess.Popen(
                ["bash", "-c", step.command], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            handle.close()
        service = Service(step, process, log)
        self.services.append(service)
        self.timings.append((f"start: {step.command}", 0.0))
        return service

    def execute(self, step: Step) -> subprocess.CompletedProcess:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"out of time before README.md line {step.line}: {step.command}")
        with tempfile.NamedTemporaryFile(prefix="walkthrough-env-", delete=False) as tmp:
            env_file = Path(tmp.name)
        script = f"set -euo pipefail\n{step.command}\nenv -0 > {str(env_file)!r}\n"
        began = time.monotonic()
        try:
            completed = subprocess.run(
                ["bash", "-c", script], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=remaining, start_new_session=True,
            )
        except subprocess.TimeoutExpired as err:
            raise AssertionError(self.report(step, f"timed out after {remaining:.0f} s", err.stdout, err.stderr)) from None
        finally:
            elapsed = time.monotonic() - began
            self.timings.append((step.command, elapsed))
        self._log_path(step).write_text(f"$ {step.command}\n{completed.stdout}\n--- stderr ---\n{completed.stderr}")
        try:
            if completed.returncode != 0:
                raise AssertionError(self.report(step, f"exit status {completed.returncode}", completed.stdout,
                                                 completed.stderr))
            exported = env_file.read_bytes().split(b"\0")
        finally:
            env_file.unlink(missing_ok=True)
        self.env = {}
        for item in exported:
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep and key not in ("_", "SHLVL", "OLDPWD"):
                self.env[key] = value
        return completed

    def report(self, step: Step, what: str, stdout, stderr) -> str:
        def text(value) -> str:
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            return (value or "")[-4000:]

        parts = [f"README.md line {step.line}: {step.command}\n{what}", f"--- stdout ---\n{text(stdout)}",
                 f"--- stderr ---\n{text(stderr)}"]
        for service in self.services:
            state = "running" if service.process.poll() is None else f"exited {service.process.returncode}"
            parts.append(f"--- service ({state}): {service.step.command} ---\n{service.tail()}")
        return "\n".join(parts)

    def dead_services(self) -> list[Service]:
        return [s for s in self.services if s.process.poll() is not None]

    def stop_all(self, grace_s: float = 15) -> None:
        """SIGTERM every service and each process under it (by PID, found before any dies), then SIGKILL."""
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with the pinned stack
            psutil = None
        targets: dict[int, object] = {}
        for service in self.services:
            pid = service.process.pid
            if psutil is not None:
                try:
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        targets[proc.pid] = proc
                except psutil.NoSuchProcess:
                    pass
            if service.process.poll() is None:
                try:
                    os.killpg(pid, signal.SIGTERM)  # the service's own process group (start_new_session)
                except ProcessLookupError:
                    pass
        for pid in targets:
            try:
                os.kill(pid, signal.SIGTERM)  # flow runs start sessions of their own: reach them by PID too
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace_s
        for service in self.services:
            try:
                service.process.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if psutil is not None:
            _, alive = psutil.wait_procs(list(targets.values()), timeout=max(0.1, end - time.monotonic()))
            for proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        for service in self.services:
            if service.process.poll() is None:
                try:
                    os.killpg(service.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                service.process.wait(timeout=10)
