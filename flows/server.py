"""A temporary Prefect API server that cannot outlive the process that started it.

With no ``PREFECT_API_URL``, Prefect 3 starts a temporary API server (``SubprocessASGIServer``: uvicorn in a
subprocess) on the first flow call and stops it at interpreter exit. A stage killed by SIGKILL or the OOM
killer never reaches that exit, and its server ran on forever, orphaned. :func:`ensure_api` starts the same
server itself before the first flow call, as a child that goes down with its parent:

- on Linux the server process asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
- on every platform a watchdog thread in the server process stops it when its parent is gone (parent pid
  changed), and ends the process outright if the graceful stop takes too long;
- at a normal exit (or SIGINT) the server is terminated, like Prefect's own.

``PREFECT_API_URL`` is then exported, in this process's Prefect settings and in ``os.environ``, so that Prefect
does not start a server of its own and so that child processes (the stages under ``dvc repro`` in the pipeline)
reuse this one instead of each starting one (seconds saved per stage).

Nothing is started when an API URL is configured (a real server, or ``prefect_test_harness``) or when Prefect's
ephemeral mode is switched off. As a second line of defence, a temporary server left over by an earlier run
(for instance one started by Prefect itself before this module existed) that has lost its parent is stopped
when the next one starts: same user, same ``PREFECT_HOME``, marked ephemeral in its environment, orphaned.

The server gets what Prefect's ``SubprocessASGIServer`` gives it (Prefect 3.9.1): the same app factory
(``prefect.server.api.server:create_app``), host, log level and lifespan, the variables ``PREFECT_UI_ENABLED=0``,
``PREFECT__SERVER_EPHEMERAL=1`` and ``PREFECT__SERVER_FINAL=1``, and this process's Prefect settings (so
``PREFECT_HOME``, its database and analytics switch are the same). Readiness is ``GET /api/health`` answering
200 within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``. The port is bound here and handed over as an
open socket, so no other process can take it in between (Prefect picks a random port and retries).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flexkd.errors import FlexKDError

#: In the server's command line: how tests and the leftover sweep recognise a server started here.
MARKER = "flexkd-temporary-prefect-server"
#: In the command line of a temporary server started by Prefect itself.
PREFECT_SERVER_APP = "prefect.server.api.server:create_app"
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_WATCH_SECONDS = 0.5  # how often the server checks that its parent is alive
_GRACE_SECONDS = 8.0  # after that, how long a graceful stop may take before the process ends outright
_STOP_SECONDS = 5.0  # at a normal exit: how long to wait for the server after SIGTERM (Prefect also waits 5 s)


class PrefectServerError(FlexKDError):
    """The temporary Prefect API server did not come up. The message names its address and its log."""


@dataclass
class _Server:
    process: subprocess.Popen
    port: int
    log: Path
    exported: bool = field(default=False)  # whether PREFECT_API_URL in os.environ is ours to remove at stop

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


_server: _Server | None = None
_lock = threading.Lock()


# ------------------------------------------------------------------------------------------ the parent side
def ensure_api(timeout: float | None = None) -> str | None:
    """Make sure flows in this process (and its children) talk to a Prefect API; return its URL.

    Call it before the first flow call. When ``PREFECT_API_URL`` is configured, return it and start nothing;
    when Prefect's ephemeral mode is off, return None (Prefect then raises its own error). Otherwise start the
    temporary server once per process (later calls return the same URL) and export its URL. Raises
    :class:`PrefectServerError` when it does not answer within ``timeout`` seconds (default: Prefect's
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``).
    """
    global _server
    from prefect.settings import get_current_settings

    with _lock:
        if _server is not None:
            return _server.api_url
        settings = get_current_settings()
        if settings.api.url:
            return str(settings.api.url)
        running = _prefect_own_server()
        if running:  # a flow already ran here before this call: Prefect's own server is up, use it
            return running
        if not settings.server.ephemeral.enabled:
            return None
        stop_leftover_servers(settings.home)
        wait = float(timeout if timeout is not None else settings.server.ephemeral.startup_timeout_seconds)
        _server = _start(settings, wait)
        atexit.register(stop_api)
        os.environ["PREFECT_API_URL"] = _server.api_url
        _server.exported = True
        _refresh_prefect_settings()
        return _server.api_url


def api_url_for_children() -> str | None:
    """The Prefect API that child processes should use: the configured one, the one :func:`ensure_api` started,
    or, when a flow already ran here without it, Prefect's own temporary server. None when there is none."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if _server is not None and _server.process.poll() is None:
        return _server.api_url
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url  # e.g. from a Prefect profile
    return str(configured) if configured else _prefect_own_server()


def stop_api() -> None:
    """Stop the server :func:`ensure_api` started (SIGTERM, then SIGKILL after a few seconds) and withdraw its
    URL from ``os.environ`` and Prefect's settings. Registered at exit; safe to call more than once."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is None:
        return
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if server.exported and os.environ.get("PREFECT_API_URL") == server.api_url:
        del os.environ["PREFECT_API_URL"]
        if not sys.is_finalizing():
            _refresh_prefect_settings()
    try:
        if server.log.stat().st_size == 0:
            server.log.unlink()
        else:
            print(f"flexkd: the temporary Prefect server on port {server.port} wrote a log: {server.log}",
                  file=sys.stderr)
    except OSError:
        pass


def _start(settings, timeout: float) -> _Server:
    home = Path(settings.home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)  # connections wait in the backlog until uvicorn serves them
        port = listener.getsockname()[1]
        log = home / f"temporary-server-{port}.log"
        command = [sys.executable, "-c", _BOOTSTRAP, MARKER, str(Path(__file__).resolve().parents[1]),
                   "--parent", str(os.getpid()), "--port", str(port)]
        pass_fds: tuple[int, ...] = ()
        if os.name == "posix":
            command += ["--fd", str(listener.fileno())]
            pass_fds = (listener.fileno(),)
        if threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG fires when the creating *thread* ends: only ask for it from the main thread
            command.append("--death-signal")
        if os.name != "posix":
            listener.close()  # the server binds the port itself (a short race, as in Prefect's own)
        env = {**os.environ, **_SERVER_ENV, **settings.to_environment_variables(exclude_unset=True)}
        env.pop("PREFECT_API_URL", None)
        with open(log, "wb") as out:
            # its own session: a Ctrl-C at the terminal reaches the stage, which can still report to the server
            # before it exits (and stops the server); the death signal and the watchdog cover every other end
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, pass_fds=pass_fds, close_fds=True,
                                       start_new_session=os.name == "posix")
    finally:
        listener.close()  # the server holds its own copy; once it is gone, connecting fails at once
    server = _Server(process, port, log)
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        _kill(process)
        raise
    return server


def _wait_healthy(server: _Server, timeout: float) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http(s)_proxy
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        code = server.process.poll()
        if code is not None:
            raise PrefectServerError(
                f"the temporary Prefect API server on port {server.port} exited with status {code} before it "
                f"answered; its log: {server.log}{_tail(server.log)}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise PrefectServerError(
                f"the temporary Prefect API server on {server.api_url} did not answer /health within {timeout:g} s "
                f"(last: {last}); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine, or set "
                f"PREFECT_API_URL to a running server; its log: {server.log}{_tail(server.log)}")
        try:
            with opener.open(f"{server.api_url}/health", timeout=min(2.0, max(left, 0.1))) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (OSError, ValueError) as err:  # refused, reset, timed out while the server imports
            last = type(err).__name__
        time.sleep(0.05)


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- end of the server log ---\n{text[-chars:]}" if text else " (empty)"


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pass


def _refresh_prefect_settings() -> None:
    """Make Prefect's process-wide settings (read once at import) see the PREFECT_API_URL now in os.environ."""
    import prefect.context

    prefect.context.refresh_global_settings_context()


def _prefect_own_server() -> str | None:
    try:
        from prefect.server.api.server import SubprocessASGIServer

        own = SubprocessASGIServer._instances.get(None)
        return own.api_url if own is not None and own.running else None
    except Exception:  # noqa: BLE001 - a private attribute of Prefect's; only an optimisation
        return None


# -------------------------------------------------------------------------------- leftovers of earlier runs
def stop_leftover_servers(home: str | os.PathLike | None = None) -> list[int]:
    """Stop temporary Prefect servers of this user and this ``PREFECT_HOME`` whose parent is gone (a SIGKILLed
    run before this module existed, or one started by Prefect itself); return their pids. Best effort: any
    process that cannot be inspected is left alone, and nothing here fails the run."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        mine = Path(home).expanduser().resolve() if home else _home_of(os.environ)
        uid = os.getuid() if hasattr(os, "getuid") else None
        found = []
        for process in psutil.process_iter(["pid", "ppid", "uids", "cmdline"]):
            try:
                info = process.info
                command = info.get("cmdline") or []
                if not (MARKER in command or any(PREFECT_SERVER_APP in part for part in command)):
                    continue
                if uid is not None and (info.get("uids") is None or info["uids"].real != uid):
                    continue
                if process.pid == os.getpid() or not _orphaned(process, command):
                    continue
                env = process.environ()
                if env.get("PREFECT__SERVER_EPHEMERAL") != "1" or _home_of(env) != mine:
                    continue
                process.terminate()
                found.append(process)
            except (psutil.Error, OSError):
                continue
        if found:
            _, alive = psutil.wait_procs(found, timeout=_STOP_SECONDS)
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            print(f"flexkd: stopped {len(found)} temporary Prefect server(s) left over by an earlier run: "
                  f"pid {', '.join(str(p.pid) for p in found)}", file=sys.stderr)
        return [p.pid for p in found]
    except Exception:  # noqa: BLE001 - a clean-up of others' leftovers must never stop this run
        return []


def _home_of(env) -> Path:
    return Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve()


def _orphaned(process, command: list[str]) -> bool:
    """Whether the server's starter is gone: ours name their parent; Prefect's own hang under a Python process
    while their starter lives, and under pid 1 or a non-Python sub-reaper (``systemd --user``) once it died."""
    import psutil

    ppid = process.ppid()
    if MARKER in command and "--parent" in command:
        try:
            return int(command[command.index("--parent") + 1]) != ppid
        except (IndexError, ValueError):
            return False
    if ppid <= 1:
        return True
    try:
        return "python" not in Path(psutil.Process(ppid).exe()).name.lower()
    except psutil.Error:
        return False


# ------------------------------------------------------------------------------------------ the server side
# Run as `python -c _BOOTSTRAP MARKER <root of the flows package> --parent PID --port N [--fd N] [--death-signal]`:
# `python -m flows.server` would depend on the current directory, a script path on what flows/ shadows.
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[2]); from flows.server import _serve; _serve(sys.argv[3:])"


def _serve(argv: list[str]) -> None:
    """The server process: ask to die with the parent, watch the parent, serve Prefect's API on the socket."""
    import argparse

    parser = argparse.ArgumentParser(prog=MARKER)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fd", type=int, default=None)
    parser.add_argument("--death-signal", action="store_true")
    args = parser.parse_args(argv)
    if args.death_signal:
        _set_parent_death_signal(signal.SIGTERM)
    if _parent_gone(args.parent):  # the parent died before the request above took effect
        os._exit(0)

    import uvicorn

    config = uvicorn.Config(PREFECT_SERVER_APP, factory=True, host="127.0.0.1", port=args.port,
                            log_level="error", lifespan="on", timeout_graceful_shutdown=_STOP_SECONDS)
    server = uvicorn.Server(config)
    threading.Thread(target=_watch_parent, args=(args.parent, server), name="parent-watchdog", daemon=True).start()
    sockets = [socket.socket(fileno=args.fd)] if args.fd is not None else None
    server.run(sockets=sockets)


def _watch_parent(parent: int, server) -> None:
    while not _parent_gone(parent):
        time.sleep(_WATCH_SECONDS)
    server.should_exit = True  # uvicorn's graceful stop (lifespan shutdown), as on SIGTERM
    time.sleep(_GRACE_SECONDS)
    os._exit(0)


def _parent_gone(parent: int) -> bool:
    if os.name == "posix":
        return os.getppid() != parent  # re-parented to init or a sub-reaper
    try:
        import psutil

        return not psutil.pid_exists(parent)
    except ImportError:
        return False


def die_with_parent() -> None:
    """Ask the kernel (Linux) to send this process SIGTERM when its parent dies, so that a stage whose ``dvc repro``
    or pipeline was killed stops too (and its temporary Prefect server with it) instead of running on orphaned.

    Called by every stage entry point (``run_cli``), and as ``preexec_fn`` for the ``dvc repro`` the pipeline flow
    starts. A no-op elsewhere."""
    _set_parent_death_signal(signal.SIGTERM)


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except Exception:  # noqa: BLE001 - the watchdog still covers it
        pass
