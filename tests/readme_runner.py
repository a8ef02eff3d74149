"""A warm `python` for the README test: `python script.py ...` in a process forked from one that has already
imported torch, diffusers, transformers and the repo's library/ modules, so that each of the README's ~60 commands
costs its own work instead of ~5 s of imports.

    readme_runner.py serve SOCKET     the server: preload, then fork one child per request
    readme_runner.py client ARGS...   what the `python` on the test's PATH runs (stdlib only, starts in ~20 ms)

A child does what `python script.py ARGS` does: sys.argv, sys.path[0] = the script's real folder, run as
`__main__`, atexit handlers, exit status; `python -m module` likewise. It gets the client's stdin/stdout/stderr
(passed over the socket), working directory and environment, so the shell block it came from sees an ordinary
process. Anything else (`python -c ...`, interpreter options) is handed to the real interpreter with exec.
The server never runs model code itself (and the test starts it with OMP_NUM_THREADS=1), so no thread pool exists
when it forks.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!Q")
STATUS = struct.Struct("!i")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def client(argv: list[str]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["README_PY_SOCKET"])
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(sock, [HEADER.pack(len(payload))], [0, 1, 2])
    sock.sendall(payload)
    (status,) = STATUS.unpack(_recv_exact(sock, STATUS.size))
    return status


def _run_child(argv: list[str]) -> int:
    """`python ARGV` in this (forked) process; returns the exit status."""
    import atexit
    import runpy
    import traceback

    if argv and argv[0] == "-m" and len(argv) > 1:
        run = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)  # noqa: E731
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
    elif argv and not argv[0].startswith("-") and os.path.isfile(argv[0]):
        run = lambda: runpy.run_path(argv[0], run_name="__main__")  # noqa: E731
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
    else:  # anything else: the real interpreter
        os.execv(sys.executable, [sys.executable, *argv])
    status = 0
    try:
        run()
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        status = 130
    except BaseException as e:  # noqa: BLE001 - report it as python would, from the script's frames on
        tb = e.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                                  or tb.tb_frame.f_code.co_filename.startswith("<frozen")):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        status = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    return status


def _preload_repo_modules() -> None:
    import importlib
    import pkgutil
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.append(str(repo))  # after sys.path[0], which each child replaces with its script's folder
    names = [f"library.{m.name}" for m in pkgutil.iter_modules([str(repo / "library")])]
    names += ["networks.lora", "networks.lora_files", "networks.lora_math", "networks.lora_checkpoint"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that does not import now fails in the child that needs it
            sys.modules.pop(name, None)


def serve(path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # What the training / generation scripts import: the libraries, then the repo's shared modules (as a test
    # process would import them; none has import-time side effects). An entry script itself always runs afresh.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        pass
    _preload_repo_modules()

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    running: dict[int, socket.socket] = {}  # command pid -> its client's connection
    while True:
        readable, _, _ = select.select([server, *running.values()], [], [], 0.2)
        for ready in readable:
            if ready is server:
                started = _start(server)
                if started:
                    running[started[0]] = started[1]
            else:  # a client sends nothing after its request: readable means it went away (killed, timed out)
                for pid, conn in running.items():
                    if conn is ready:
                        os.kill(pid, signal.SIGKILL)
        while running:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid)
            status = os.waitstatus_to_exitcode(wait_status)
            try:
                conn.sendall(STATUS.pack(status if status >= 0 else 128 - status))  # a signal: as a shell says
            except OSError:
                pass
            conn.close()


def _start(server: socket.socket) -> tuple[int, socket.socket] | None:
    """Accept one request and fork its command; (pid, connection), or None for a probe / broken request."""
    conn, _ = server.accept()
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        (length,) = HEADER.unpack(header)
        request = json.loads(_recv_exact(conn, length))
    except Exception:  # noqa: BLE001 - a readiness probe, or a client that went away
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become `python ARGV`
        server.close()
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        status = _run_child(request["argv"])
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status & 0xFF)
    for fd in fds:
        os.close(fd)
    return pid, conn


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[2:]))
