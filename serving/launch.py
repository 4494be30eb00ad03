"""Run `bentoml serve` for the advmoe service as a child process: for `advmoe serve`, the tests and
the benchmarks. It waits for /readyz with a deadline (the port opens before the workers are up,
and stays open while a worker crash-loops) and stops every worker by PID (BentoML's workers run
in sessions of their own, so killing the process group would miss them)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent  # where `serving.service` imports from
SERVICE = "serving.service:AdvMoE"


def bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def server_home(port: int, home: Path | None = None) -> Path:
    """A BentoML home for the server on `port`: the shared model and bento stores, linked, and a
    Prometheus folder of its own. BentoML keeps its multiprocess metrics in BENTOML_HOME and
    empties that folder when a server starts, so two servers on one home would wipe and mix
    each other's /metrics."""
    home = Path(home or bentoml_home())
    folder = home / "advmoe-servers" / str(port)
    folder.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (home / store).mkdir(parents=True, exist_ok=True)
        link = folder / store
        if not link.is_symlink():
            link.symlink_to(home / store, target_is_directory=True)
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def exec_serve(env: dict[str, str], host: str, port: int) -> int:
    """Replace this process with `bentoml serve` (the foreground server of `advmoe serve`)."""
    from .config import ServingConfig

    environ = {**os.environ, **env}
    # A bad setting or a missing model fails here, with what to do, not in a worker's log.
    config = ServingConfig.from_env(environ)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(config.model_tag)
    except NotFound:
        raise FileNotFoundError(f"no BentoML model {config.model_tag!r} in the store; export a checkpoint with "
                                f"`advmoe export CHECKPOINT --out DIR --format bento` (`make run` does it)") from None
    environ["BENTOML_HOME"] = str(server_home(port, Path(environ.get("BENTOML_HOME") or bentoml_home())))
    os.chdir(ROOT)
    os.execve(sys.executable, serve_command(host, port), environ)
    return 1  # not reached


class Server:
    """`with Server(env={"ADVMOE_MODEL_TAG": ...}) as server: requests to server.url`."""

    def __init__(self, env: dict[str, str] | None = None, host: str = "127.0.0.1", port: int | None = None,
                 ready_timeout_s: float = 120.0, log_path: str | Path | None = None):
        self.host, self.port = host, port or free_port(host)
        self.env = {**os.environ, **(env or {})}
        home = Path(self.env.get("BENTOML_HOME") or bentoml_home())
        self.env["BENTOML_HOME"] = str(server_home(self.port, home))
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Server":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(serve_command(self.host, self.port), cwd=ROOT, env=self.env,
                                        stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with code {self.process.returncode} before it was ready"
                                   f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"bentoml serve at {self.url} not ready after {self.ready_timeout_s:.0f}s{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        return "; its log ends with:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])

    def processes(self) -> list[psutil.Process]:
        """`bentoml serve` and its workers (the API workers run the model); [] once it has exited."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.process is None:
            return
        family = self.processes()
        for process in family:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=10)
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
