"""Artifacts on s3:// through fsspec/s3fs, against a real S3-compatible server on 127.0.0.1."""
import pytest

from slip_core import artifacts, storage
from tests._s3_util import s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as url:
        yield url


def test_artifact_roundtrip_and_tamper_on_s3(bucket):
    root = storage.join(bucket, "store/dataset/demo-0123")
    storage.atomic_write_bytes(storage.join(root, "shards/00000.tar"), b"x" * 1000)
    storage.atomic_write_text(storage.join(root, "sizes.json"), '{"shards/00000.tar": 3}')
    m = artifacts.build_manifest(root, ["shards/00000.tar", "sizes.json"], kind="dataset", name="demo")
    url = artifacts.publish(m, root)
    assert url.startswith("s3://")
    assert artifacts.load_verified(url).sha256 == m.sha256
    storage.atomic_write_bytes(storage.join(root, "shards/00000.tar"), b"y" * 1000)
    assert artifacts.verify(url) == ["sha256 mismatch: shards/00000.tar"]


def test_atomic_open_on_s3_publishes_nothing_on_crash(bucket):
    target = storage.join(bucket, "crash/file.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists(target)
    storage.put_file_atomic(__file__, target)
    assert storage.read_bytes(target) == open(__file__, "rb").read()
