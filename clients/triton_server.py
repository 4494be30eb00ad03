"""A local Triton Inference Server for an exported model repository (tests and demos).

nvidia-pytriton's bundled `tritonserver` (HTTP, gRPC and metrics endpoints, dynamic batcher)
runs the repository's `model.onnx` through onnxruntime in a Python model, under the model name,
tensor names, data types, max_batch_size, dynamic batching and instance count of its
`config.pbtxt`: a client cannot tell it from the official server running the same repository
with the onnxruntime backend (docs/triton.md shows that one, on a GPU host).

nvidia-pytriton pins numpy < 2 and the project runs on numpy 2, so the server lives in a venv of
its own (`default_venv`): one per machine in the user's cache, named after the Python version and
the pins, so every clone of the project shares it, as pre-commit and nox share their tool
environments; $ADVMOE_TRITON_VENV puts it elsewhere.

    python -m clients.triton_server setup             # makes the venv once (pip, ~30 s)
    python -m clients.triton_server serve out/triton  # HTTP 8000, gRPC 8001, metrics 8002 on 127.0.0.1

`serve` re-runs itself with the venv's python when the current one has no pytriton. From Python,
`LocalTritonServer(repository).start()` launches it on free ports, waits until the model is ready
(with a deadline) and `stop()` ends the launcher and every process under it by PID.

Only the standard library is imported at module level: this file runs in either environment and
never imports torch, advmoe or the other applications.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# What the server's venv gets; pyproject's `triton` extra lists the same pins (a test checks).
REQUIREMENTS = ("nvidia-pytriton==0.7.0", "onnxruntime==1.32.0")
VENV_ENV = "ADVMOE_TRITON_VENV"
SETUP_COMMAND = "python -m clients.triton_server setup"
STUB_FOLDER = re.compile(r"^(.*/folder[A-Za-z0-9_]+)/\d+/model\.py$")
_CHECK = ("import importlib.metadata as m, numpy, onnxruntime, pytriton.triton, tritonclient.grpc; "
          "print(m.version('nvidia-pytriton'), m.version('onnxruntime'))")


def default_venv() -> Path:
    """$ADVMOE_TRITON_VENV, else `$XDG_CACHE_HOME/advmoe/` (~/.cache/advmoe/) triton-venv-py3.11-<pins>:
    it holds no project code, so a fresh clone reuses it; a change of pins names a new one."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    pins = hashlib.sha256(" ".join(REQUIREMENTS).encode()).hexdigest()[:10]
    return cache / "advmoe" / f"triton-venv-py{sys.version_info.major}.{sys.version_info.minor}-{pins}"


def venv_python(venv: str | Path | None = None) -> Path:
    return Path(venv or default_venv()) / "bin" / "python"


def check_venv(venv: str | Path | None = None) -> str | None:
    """None when the venv can run the server with the pinned versions, else what is wrong."""
    python = venv_python(venv)
    if not python.exists():
        return f"{python.parent.parent} does not exist; create it with `{SETUP_COMMAND}`"
    probe = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python} cannot import the server's packages ({last}); rerun `{SETUP_COMMAND}`"
    found = dict(zip(("nvidia-pytriton", "onnxruntime"), probe.stdout.split()))
    for requirement in REQUIREMENTS:
        name, version = requirement.split("==")
        if found.get(name) != version:
            return f"{python.parent.parent} has {name} {found.get(name)}, not {version}; rerun `{SETUP_COMMAND}`"
    return None


def setup(venv: str | Path | None = None, python: str = sys.executable, log=print) -> Path:
    """Create (or repair) the server's venv with REQUIREMENTS; a no-op when it is already right.
    Clones share the venv, so a lock beside it keeps two setups from installing into it at once."""
    venv = Path(venv or default_venv())
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _setup(venv, python, log)


def _setup(venv: Path, python: str, log) -> Path:
    problem = check_venv(venv)
    if problem is None:
        log(f"{venv} is ready ({', '.join(REQUIREMENTS)})")
        return venv
    start = time.perf_counter()
    if not venv_python(venv).exists():
        log(f"creating {venv}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")  # git ignores the venv, as Python 3.13's venv module does
    log(f"installing {' '.join(REQUIREMENTS)} into {venv}")
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *REQUIREMENTS], check=True)
    problem = check_venv(venv)
    if problem is not None:
        raise RuntimeError(f"setting up {venv} failed: {problem}")
    log(f"{venv} ready in {time.perf_counter() - start:.0f}s")
    return venv


# -- the server (runs inside the triton venv) ---------------------------------------------------

def find_model(repository: Path, model: str | None) -> Path:
    """The model's folder in a Triton repository: `model`, or the only ONNX model there is
    (`advmoe export` puts a TorchScript model beside it, which this server cannot run)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"{repository} is not a folder; export one with "
                                "`advmoe export CKPT --out DIR --format triton` and pass DIR/triton")
    found = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if model is None:
        onnx_models = [m for m in found if any((repository / m).glob("[0-9]*/model.onnx"))]
        if len(onnx_models) != 1:
            raise ValueError(f"{repository} holds {len(onnx_models)} ONNX models ({', '.join(onnx_models) or 'none'}); "
                             "name one with --model")
        model = onnx_models[0]
    if model not in found:
        raise FileNotFoundError(f"no {repository}/{model}/config.pbtxt; models there: {', '.join(found) or 'none'}")
    return repository / model


def latest_version(folder: Path, filename: str) -> Path:
    versions = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / filename).is_file()))
    if not versions:
        raise FileNotFoundError(f"{folder} has no <version>/{filename}")
    return folder / str(versions[-1]) / filename


def use_own_libpython() -> None:
    """Make the Python backend's stub (a binary linked to libpython3.X.so) load this interpreter's
    libpython. Otherwise the dynamic loader may find another build of the same minor version (on
    Debian 12, the system's 3.11.2 under a pyenv 3.11.7), which then runs this interpreter's
    standard library and fails in multiprocessing (`RLock` has no `_recursion_count`)."""
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    else:
        print(f"warning: {sys.executable} has no shared {soname or 'libpython'}; the Python backend's stub will "
              "load whichever the system has, which must be the same Python version", file=sys.stderr, flush=True)


def serve(repository: Path, model: str | None = None, host: str = "127.0.0.1", http_port: int = 8000,
          grpc_port: int = 8001, metrics_port: int = 8002, threads: int = 2,
          workspace: str | None = None) -> None:
    """Serve one model of a Triton repository until SIGINT or SIGTERM (needs the triton venv)."""
    import numpy as np
    import onnxruntime as ort
    from google.protobuf import text_format
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.grpc import model_config_pb2

    folder = find_model(repository, model)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    name = config.name or folder.name
    if config.backend not in ("onnxruntime", "") or (config.platform and config.platform != "onnxruntime_onnx"):
        raise ValueError(f"{folder}/config.pbtxt: backend {config.backend or config.platform!r}; this server "
                         "runs ONNX models only (backend: \"onnxruntime\")")
    onnx_file = latest_version(folder, config.default_model_filename or "model.onnx")
    dtypes = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
              "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}

    def tensors(specs):
        out = []
        for spec in specs:
            kind = model_config_pb2.DataType.Name(spec.data_type)
            if kind not in dtypes:
                raise ValueError(f"{folder}/config.pbtxt: tensor {spec.name!r} has type {kind}, not supported here")
            out.append(Tensor(name=spec.name, dtype=dtypes[kind], shape=tuple(spec.dims)))
        return out

    inputs, outputs = tensors(config.input), tensors(config.output)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session():
        s = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        graph_in, graph_out = [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]
        if graph_in != [t.name for t in inputs] or not {t.name for t in outputs} <= set(graph_out):
            raise ValueError(f"{folder}/config.pbtxt names inputs {[t.name for t in inputs]} and outputs "
                             f"{[t.name for t in outputs]}, {onnx_file} has {graph_in} and {graph_out}")
        return s

    def make_infer():
        s = session()
        names = [t.name for t in outputs]

        @batch
        def infer(**feeds):
            feeds = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in inputs}
            results = s.run(names, feeds)
            # A copy: onnxruntime hands INT64 back as numpy's `longlong`, which numpy 1.x does not
            # count as `int64` (pytriton's strict check would refuse it); astype makes it int64.
            return {t.name: r.astype(t.dtype) for t, r in zip(outputs, results)}

        return infer

    count = sum(g.count or 1 for g in config.instance_group) or 1
    batching = config.max_batch_size > 0
    batcher = None
    if config.HasField("dynamic_batching"):
        batcher = DynamicBatcher(max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
                                 preferred_batch_size=list(config.dynamic_batching.preferred_batch_size) or None)
    model_config = ModelConfig(batching=batching, max_batch_size=max(config.max_batch_size, 1),
                               **({"batcher": batcher} if batcher else {}))
    triton_config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                                 metrics_address=host, metrics_port=metrics_port, allow_gpu_metrics=False,
                                 exit_timeout_secs=5, log_verbose=0)

    def interrupt(signum, frame):  # SIGTERM stops like Ctrl-C: pytriton then stops tritonserver and cleans up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background (`&`)
    use_own_libpython()
    with Triton(config=triton_config, workspace=workspace) as triton:
        triton.bind(model_name=name, infer_func=[make_infer() for _ in range(count)], inputs=inputs,
                    outputs=outputs, config=model_config, strict=True)
        print(f"serving {name} ({onnx_file}) on http://{host}:{http_port}, grpc {host}:{grpc_port}, "
              f"metrics http://{host}:{metrics_port}/metrics", flush=True)
        triton.serve()


# -- the launcher (runs anywhere: tests, demos) ----------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """GET a loopback URL directly, whatever proxy the environment names."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.read()


def _die_with_parent() -> None:
    """In the launcher, before exec: SIGTERM it when the thread that started it ends (a killed test
    run), so that it stops its tritonserver rather than keep serving with nobody to stop it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_time(pid: int) -> str | None:
    """The kernel's start time of pid (None if gone or a zombie): tells a PID from its reuse."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> list[int]:
    """Every process under pid (Linux /proc), children before grandchildren."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += [c for c in children if c not in found]
                queue += children
    return found


class LocalTritonServer:
    """The server above in a subprocess of the triton venv's python, on free loopback ports.
    Linux only (it finds the processes to stop in /proc). The server also stops when the thread
    that started it ends.

    with LocalTritonServer("out/triton") as server:
        TritonClient(server.http_url).infer(x)
    """

    def __init__(self, repository: str | Path, model: str | None = None, venv: str | Path | None = None,
                 host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 threads: int = 2, log_file: str | Path | None = None):
        self.repository, self.model, self.host, self.threads = Path(repository), model, host, threads
        self.python = venv_python(venv)
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None
        self._tracked: dict[int, str] = {}
        self._tmp: str | None = None
        self._workspace: str | None = None
        self._own_log = None
        self._folders: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        command = [str(self.python), str(Path(__file__).resolve()), "serve", str(self.repository),
                   "--host", self.host, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--metrics-port", str(self.metrics_port), "--threads", str(self.threads)]
        if self.model:
            command += ["--model", self.model]
        if self._workspace:
            command += ["--workspace", self._workspace]
        return command

    def start(self, timeout: float = 60.0) -> "LocalTritonServer":
        """Launch and wait until the model answers ready; on failure or past the deadline, stop
        everything started and raise with the end of the server's log."""
        if not self.python.exists():
            raise FileNotFoundError(f"no {self.python}: create the server's venv with `{SETUP_COMMAND}`")
        name = find_model(self.repository, self.model).name
        self._tmp = tempfile.mkdtemp(prefix="advmoe-pytriton-")
        self._workspace = os.path.join(self._tmp, "workspace")  # pytriton creates it, and removes it on exit
        if self.log_file is None:
            self.log_file = Path(self._tmp) / "server.log"
        self._own_log = open(self.log_file, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the venv must not see the main environment's packages
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._own_log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + timeout
        ready = f"{self.http_url}/v2/models/{name}/ready"
        while True:
            self._track()
            if self.process.poll() is not None:
                code, tail = self.process.returncode, self.log_tail()
                self.stop()
                raise RuntimeError(f"the local Triton server exited with code {code} before its model was "
                                   f"ready; its log ends:\n{tail}")
            try:
                http_get(ready, timeout=2)  # 200: ready; an HTTPError (400) or no answer: not yet
                self._track()
                return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TimeoutError(f"the local Triton server did not get model {name!r} ready within {timeout:.0f}s "
                                   f"({ready}); its log ends:\n{tail}")
            time.sleep(0.25)

    def _track(self) -> None:
        """Remember the launcher and each process under it with its start time (children such as
        tritonserver and its Python backend stubs appear while the server starts)."""
        if self.process is None:
            return
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            if pid not in self._tracked and (started := _start_time(pid)) is not None:
                self._tracked[pid] = started
                with contextlib.suppress(OSError):  # the stub runs a copy of the model in a temp folder
                    for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"):
                        found = STUB_FOLDER.match(arg)
                        if found and Path(found.group(1)).parent == Path(tempfile.gettempdir()):
                            self._folders.add(found.group(1))

    def pids(self) -> list[int]:
        """The tracked processes still alive (same PID and same start time)."""
        self._track()
        return [pid for pid, started in self._tracked.items() if _start_time(pid) == started]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT the launcher (pytriton stops tritonserver and cleans its workspace and shared
        memory); whatever is still alive then, of the launcher and the processes seen under it, gets
        SIGTERM, then SIGKILL, by PID."""
        if self.process is not None:
            self._track()
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout)
            for kill in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, kill)
                deadline = time.monotonic() + 5
                while self.pids() and time.monotonic() < deadline:
                    self.process.poll()  # reaps the launcher
                    time.sleep(0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            # The Python backend's shared memory regions, named after the launcher's PID: left only
            # when the launcher was killed before it could remove them.
            for region in Path("/dev/shm").glob(f"pytrtion{self.process.pid}-*"):
                region.unlink(missing_ok=True)
        if self._own_log is not None:
            self._own_log.close()
            self._own_log = None
        for folder in self._folders:  # tritonserver removes it when it unloads the model, not if killed
            shutil.rmtree(folder, ignore_errors=True)
        if self._tmp:  # the workspace, and the log unless the caller chose where it goes
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self._workspace = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.triton_server", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="create the server's venv with nvidia-pytriton")
    p_setup.add_argument("--venv", default=None, help=f"where (default: {default_venv()}; ${VENV_ENV} moves it)")
    p_check = sub.add_parser("check", help="exit 0 if the server's venv is ready, else say what is wrong")
    p_check.add_argument("--venv", default=None)
    p_serve = sub.add_parser("serve", help="serve a model of an exported Triton repository")
    p_serve.add_argument("repository", type=Path, help="the exported repository, e.g. out/triton")
    p_serve.add_argument("--model", default=None, help="model folder name (default: the only one)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--http-port", type=int, default=8000)
    p_serve.add_argument("--grpc-port", type=int, default=8001)
    p_serve.add_argument("--metrics-port", type=int, default=8002)
    p_serve.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p_serve.add_argument("--workspace", default=None, help=argparse.SUPPRESS)
    p_serve.add_argument("--venv", default=None, help="the venv to run in when this python lacks pytriton")
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args.venv)
        return 0
    if args.command == "check":
        problem = check_venv(args.venv)
        print(problem or f"{default_venv() if args.venv is None else args.venv} is ready")
        return 1 if problem else 0
    try:
        import pytriton  # noqa: F401
    except ImportError:
        venv = Path(args.venv or default_venv())
        if Path(sys.prefix).resolve() == venv.resolve() or (problem := check_venv(venv)) is not None:
            print(f"error: this python ({sys.executable}) has no nvidia-pytriton, and "
                  f"{problem or f'{venv} lacks it too'}", file=sys.stderr)
            return 2
        python = venv_python(venv)
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *(argv or sys.argv[1:])])
    serve(args.repository, args.model, args.host, args.http_port, args.grpc_port, args.metrics_port,
          args.threads, args.workspace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
