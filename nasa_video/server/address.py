"""A Ray address given to `serve --ray`, checked before Ray is imported (its import alone takes seconds)."""
from __future__ import annotations

import socket

from ..errors import UserError


def check_address(address: str, timeout: float = 5.0) -> None:
    """A named Ray address must answer before ray.init, which would wait minutes on one that does not."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: give HOST:PORT of a Ray head (ray start --head prints it), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({error.strerror or error}); start one with "
                        f"`ray start --head`, or leave the address out for a local cluster") from None
