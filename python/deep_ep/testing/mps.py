"""A private CUDA MPS control daemon for the lifetime of a test run.

Several ranks sharing one GPU only run concurrently under MPS; without it they are time-sliced and a cross-rank
spin handshake takes ~150 ms (docs/design.md section 5). The daemon lives in fresh pipe and log folders, so it never
touches a daemon someone else runs, and it never changes GPU settings: no compute-mode change, no reset.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Optional

MPS_CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"


def mps_control_path() -> Optional[str]:
    """Full path of nvidia-cuda-mps-control, or None when it is not on PATH."""
    return shutil.which(MPS_CONTROL)


class MpsDaemon:
    """Context manager: start a private MPS control daemon on enter, stop it and clean up on exit.

    While it runs, CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY point at its folders in os.environ, so every
    process started meanwhile (the ranks) becomes its client. Stopping is also registered with atexit, and SIGTERM
    is turned into SystemExit while the daemon runs (when SIGTERM has its default action), so a parent killed by
    `timeout` or crashing with an exception still stops the daemon.
    """

    def __init__(self, start_timeout_s: float = 10.0, stop_timeout_s: float = 30.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.pipe_dir: Optional[str] = None
        self.log_dir: Optional[str] = None
        self._control: Optional[str] = None
        self._daemon_pid: Optional[int] = None
        self._saved_environ: Dict[str, Optional[str]] = {}
        self._saved_sigterm: Any = None

    def __enter__(self) -> "MpsDaemon":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.pipe_dir is not None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("this MPS daemon is already running")
        control = mps_control_path()
        if control is None:
            raise RuntimeError(
                f"{MPS_CONTROL} is not on PATH: cannot start an MPS daemon to share a GPU between "
                f"ranks (install the CUDA MPS tools, or run one rank per GPU with use_mps=False)"
            )
        self._control = control
        # Short folders directly under /tmp: MPS puts unix sockets there, whose paths are limited to ~100 bytes.
        base = "/tmp" if os.path.isdir("/tmp") else None
        self.pipe_dir = tempfile.mkdtemp(prefix="deep_ep_mps_", dir=base)
        self.log_dir = tempfile.mkdtemp(prefix="deep_ep_mps_", dir=base)
        self._saved_environ = {name: os.environ.get(name) for name in (PIPE_ENV, LOG_ENV)}
        os.environ[PIPE_ENV] = self.pipe_dir
        os.environ[LOG_ENV] = self.log_dir
        atexit.register(self.stop)
        self._catch_sigterm()
        try:
            self._launch_daemon()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Ask the daemon to quit, wait (bounded) until it has, and restore the environment. Idempotent."""
        if not self.running:
            return
        try:
            if self._control is not None and os.path.exists(os.path.join(self.pipe_dir, "control")):
                self._quit_daemon()
        finally:
            for name, value in self._saved_environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(self.pipe_dir, ignore_errors=True)
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.pipe_dir = self.log_dir = None
            self._daemon_pid = None
            atexit.unregister(self.stop)
            self._restore_sigterm()

    # ------------------------------------------------------------------------------------------------------------

    def _launch_daemon(self) -> None:
        # Output goes to a file, not a pipe: the forked daemon could keep a pipe open and block the wait for EOF.
        out_path = os.path.join(self.log_dir, "start.out")
        with open(out_path, "wb") as out:
            done = subprocess.run(
                [self._control, "-d"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                timeout=self.start_timeout_s,
            )
        if done.returncode != 0:
            raise RuntimeError(f"`{MPS_CONTROL} -d` failed with exit code {done.returncode}: {self._logs()}")
        pipe = os.path.join(self.pipe_dir, "control")
        give_up = time.monotonic() + self.start_timeout_s
        while not os.path.exists(pipe):
            if time.monotonic() > give_up:
                raise RuntimeError(
                    f"the MPS control daemon did not create {pipe} within {self.start_timeout_s:g} s: {self._logs()}"
                )
            time.sleep(0.02)
        self._daemon_pid = _read_daemon_pid(self.pipe_dir)

    def _quit_daemon(self) -> None:
        """`echo quit | nvidia-cuda-mps-control` with the daemon's environment, then wait for its process to end."""
        environ = dict(os.environ, **{PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir})
        give_up = time.monotonic() + self.stop_timeout_s
        try:
            subprocess.run(
                [self._control],
                input=b"quit\n",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=environ,
                timeout=self.stop_timeout_s,
            )
        except subprocess.TimeoutExpired:
            pass
        pid = self._daemon_pid
        if pid is None:
            return
        while _process_alive(pid) and time.monotonic() < give_up:
            time.sleep(0.05)
        if _process_alive(pid):
            warnings.warn(
                f"the MPS control daemon (pid {pid}) did not quit within {self.stop_timeout_s:g} s; sending it SIGTERM"
            )
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    def _logs(self) -> str:
        """The daemon's own messages, for error reports."""
        texts = []
        for name in ("start.out", "control.log"):
            try:
                with open(os.path.join(self.log_dir, name), errors="replace") as log:
                    text = log.read().strip()
            except OSError:
                continue
            if text:
                texts.append(f"[{name}] {text[-2000:]}")
        return " ".join(texts) or "(no log output)"

    def _catch_sigterm(self) -> None:
        self._saved_sigterm = None
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._saved_sigterm = signal.SIG_DFL
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._saved_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._saved_sigterm)
        self._saved_sigterm = None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _read_daemon_pid(pipe_dir: str, timeout_s: float = 1.0) -> Optional[int]:
    """Process id of the control daemon serving pipe_dir, from the pid file it writes there (None if unseen).

    `-d` forks the daemon and returns, so its id is only known through that file.
    """
    path = os.path.join(pipe_dir, "nvidia-cuda-mps-control.pid")
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as pid_file:
                return int(pid_file.read().strip())
        except (OSError, ValueError):
            if time.monotonic() > give_up:
                return None
        time.sleep(0.02)


def _process_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
