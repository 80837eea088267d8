"""Running the app: uvicorn on a host and port (or a socket that is already bound), until stopped."""

from __future__ import annotations

import socket
import threading

import uvicorn

from kvlab.inference.engine import Engine
from kvlab.serve.app import create_app


def make_server(engine: Engine, tokenizer, model_name: str, *, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``engine`` (not started); its app's lifespan runs the engine's thread."""
    app = create_app(engine, tokenizer, model_name)
    # One event-loop thread is enough: the engine's thread does the compute.
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the caller knows the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """A server in a thread of this process (tests, benchmarks, notebooks): ``with BackgroundServer(...) as url``."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 0):
        self.server = make_server(engine, tokenizer, model_name)
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            self.thread.join(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
