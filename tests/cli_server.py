"""A warm start for the many `minigpt` commands the README tests run.

Each fresh `python -m minigpt_cli` spends 3-5 s on this 2-core machine importing torch (and, for the
commands that train, inspect or bench, torch._dynamo) before it does anything. The README's forty
commands would spend most of their time there. So the README tests start this server once per pytest
worker: it imports the CLI and what its commands use, runs no torch operation (a process that has
started OpenMP's threads cannot safely fork), and for each command forks a child that runs
`minigpt_cli.cli.main()` with the command's arguments, folder, environment and standard streams.

    python tests/cli_server.py SOCKET      # serve until the socket is closed
    python tests/cli_server.py --run SOCKET ARG...   # the client: run `minigpt ARG...` there

The client passes its own stdin, stdout and stderr (so shell pipes work as with the real command)
and exits with the command's exit code. The child is the CLI's code from `main()` down, as a user's
process runs it; only the imports are shared.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!I")


def send_message(sock: socket.socket, data: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(data).encode("utf-8")
    socket.send_fds(sock, [HEADER.pack(len(payload)) + payload], list(fds))


def receive_message(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = sock.recv(1 << 20)
        if not more:
            raise ConnectionError("the message ended early")
        data += more
    return json.loads(data[HEADER.size:].decode("utf-8")), list(fds)


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command's process, run the CLI, exit with its code."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["minigpt", *request["args"]]
    code = 1
    try:
        from minigpt_cli.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback, as the real process would print it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def serve(path: str) -> None:
    # What the commands import on their way: the CLI imports its heavy modules lazily, and torch.optim's
    # first optimizer (like any meta-device forward) imports torch._dynamo.
    for module in ("torch", "torch._dynamo", "minigpt_cli.cli", "minigpt_cli.trainer", "minigpt_cli.sampler",
                   "minigpt_cli.evaluate", "minigpt_cli.bench", "minigpt_cli.inspection", "minigpt_cli.runs"):
        importlib.import_module(module)

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            request, fds = receive_message(connection)
            if request.get("stop"):
                return
            pid = os.fork()
            if pid == 0:
                server.close()
                connection.close()
                run_child(request, fds)
            for fd in fds:
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            send_message(connection, {"code": code if code >= 0 else 128 - code})


def run_client(path: str, args: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        send_message(sock, {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
        reply, _ = receive_message(sock)
    return int(reply["code"])


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        sys.exit(run_client(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[1])
