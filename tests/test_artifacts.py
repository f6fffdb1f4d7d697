import json

import pytest

from slip_core import artifacts, config, storage


def _make_artifact(root, name="a", upstream=None, payload=b"hello"):
    storage.atomic_write_bytes(storage.join(root, "data/x.bin"), payload)
    storage.atomic_write_text(storage.join(root, "y.txt"), "y")
    m = artifacts.build_manifest(root, ["data/x.bin", "y.txt"], kind="test", name=name,
                                 config={"k": 1}, upstream=upstream or {})
    return artifacts.publish(m, root), m


def test_publish_load_verify_roundtrip(tmp_path):
    url, m = _make_artifact(str(tmp_path / "a"))
    loaded = artifacts.load_manifest(url)
    assert loaded.sha256 == m.sha256
    assert loaded.file("data/x.bin").size == 5
    assert artifacts.verify(url) == []


@pytest.mark.parametrize("tamper", ["change", "truncate", "delete"])
def test_tampered_artifact_is_detected(tmp_path, tamper, fault_log):
    root = str(tmp_path / "a")
    url, _ = _make_artifact(root)
    target = tmp_path / "a" / "data" / "x.bin"
    if tamper == "change":
        target.write_bytes(b"hellO")
    elif tamper == "truncate":
        target.write_bytes(b"hel")
    else:
        target.unlink()
    problems = artifacts.verify(url)
    assert len(problems) == 1 and "x.bin" in problems[0]
    with pytest.raises(artifacts.ManifestError):
        artifacts.load_verified(url)
    fault_log.record("artifact", "artifacts", f"artifact file {tamper}d after publishing",
                     f"verify() reports '{problems[0].split(':')[0]}' for that file; load_verified raises ManifestError")


def test_missing_and_corrupt_manifest(tmp_path, fault_log):
    assert artifacts.verify(str(tmp_path))[0].startswith("no manifest")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(artifacts.ManifestError):
        artifacts.load_manifest(str(tmp_path))
    fault_log.record("artifact", "artifacts", "artifact without a manifest (partial: crashed before publish); "
                     "unparseable manifest", "verify() reports 'no manifest'; load_manifest raises ManifestError")


def test_manifest_sha_ignores_time_but_not_content(tmp_path):
    _, m1 = _make_artifact(str(tmp_path / "a"))
    _, m2 = _make_artifact(str(tmp_path / "b"))
    _, m3 = _make_artifact(str(tmp_path / "c"), payload=b"other")
    m2.created_at = "2000-01-01T00:00:00+00:00"
    assert m1.sha256 == m2.sha256 != m3.sha256


def test_lineage_walks_upstream_and_flags_changes(tmp_path):
    up_url, _ = _make_artifact(str(tmp_path / "raw"), name="raw")
    ref = artifacts.upstream_ref(up_url)
    down_url, _ = _make_artifact(str(tmp_path / "ds"), name="ds", upstream={"input": ref})
    text = artifacts.format_lineage(down_url)
    assert "'ds'" in text and "'raw'" in text and "changed" not in text
    _make_artifact(str(tmp_path / "raw"), name="raw", payload=b"new")  # upstream rebuilt
    assert "changed since use" in artifacts.format_lineage(down_url)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = str(tmp_path / "f.bin")
    storage.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert open(target, "rb").read() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_config_roundtrip_and_unknown_keys():
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        lr: float = 0.1
        betas: tuple = (0.9, 0.98)

    @dataclass
    class Outer:
        name: str = "x"
        inner: Inner = field(default_factory=Inner)

    cfg = config.override(Outer(), {"inner.lr": 0.5})
    assert cfg.inner.lr == 0.5
    back = config.from_dict(Outer, json.loads(json.dumps(config.to_dict(cfg))))
    assert back == cfg and isinstance(back.inner.betas, tuple)
    assert config.config_sha256(back) == config.config_sha256(cfg)
    with pytest.raises(config.ConfigError):
        config.from_dict(Outer, {"nmae": "typo"})
    with pytest.raises(config.ConfigError):
        config.override(Outer(), {"inner.lrr": 1})
