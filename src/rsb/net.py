"""Ports on this node: the one rank 0 rendezvouses on (rsb.launch) and the MLflow UI's (rsb.tracking.ui)."""

from __future__ import annotations

import socket

from rsb.errors import RsbError


class PortError(RsbError, ValueError):
    """A port this node would listen on is taken."""


def check_port(port: int, host: str = "", key: str = "train.master_port") -> None:
    """A port this node will listen on (rank 0's rendezvous, the MLflow UI) is free: checked before any process
    starts."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortError(
                f"{key}={port}: in use on this node ({e.strerror}); stop what holds it, "
                "or choose another port (0 picks a free one)"
            ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
