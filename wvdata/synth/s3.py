"""A local S3 endpoint for tests and benchmarks: moto's standalone server on 127.0.0.1.

It is a real HTTP S3 API (signed requests, multipart uploads, conditional writes, IAM when
asked), so the store code paths run as they would against a bucket; nothing leaves the machine.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

S3_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(timeout: float = 10.0) -> tuple[subprocess.Popen, str]:
    """(the moto server process, its endpoint URL), once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def s3_env(endpoint: str, key: str = "test", secret: str = "test") -> dict[str, str]:
    """The environment that points boto3, s3fs and DALI's S3 client at `endpoint`."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set environment variables; return the previous values (for `restore_env`)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
