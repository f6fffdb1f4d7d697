"""A real S3-compatible server (moto in server mode) on 127.0.0.1 for s3:// tests."""
from __future__ import annotations

import contextlib
import os
import socket
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """Start moto's S3 server on loopback, point fsspec/s3fs at it, yield a fresh bucket URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        bucket = f"slip-test-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
