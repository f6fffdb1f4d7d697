"""YFCC100M metadata parsing/cleaning, generic caption tables, the demo corpus and the filter CLI."""
from __future__ import annotations

import bz2
import json
import os
import subprocess
import sys
import time
import urllib.request

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets import demo_corpus, offline, pipeline
from datasets.sources import captions, yfcc
from datasets.sources.detect import detect_source
from datasets.httpserve import serve_directory
from slip_core import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("raw,expected", [
    ("Hello+World", "Hello World"),
    ("a%2Bb", "a b"),  # unquote first, then '+' -> ' ': an encoded plus becomes a space too (SPEC §1)
    ("caf%C3%A9+%26amp%3B+tea", "café &amp; tea"),  # entities stay in slip mode
    ("%3Ca+href%3D%22http%3A%2F%2Fx.com%22%3Elink%3C%2Fa%3E+here", "link here"),
    ("%3Cabbr%3Eshort%3C%2Fabbr%3E", "short</abbr>"),  # <a.*?> also eats <abbr>, as the reference does
    ("%3Cb%3Ebold%3C%2Fb%3E+%3Ci%3Eit%3C%2Fi%3E+%3Cbr%3E", "bold it <br>"),
    ("see+http%3A%2F%2Fexample.com%2Fa+and+www.flickr.com+now", "see  and  now"),
    ("++two++spaces++", "  two  spaces  "),  # no trimming in slip mode
    ("", ""),
])
def test_slip_cleaning_is_reference_exact(raw, expected):
    assert yfcc.clean_slip(raw) == expected


def test_strict_cleaning():
    assert yfcc.clean_strict("++caf%C3%A9+%26amp%3B%0A%09tea++http%3A%2F%2Fx+") == "café & tea"


def test_tag_stripping_matches_the_regex_and_is_linear():
    # The reference regex `<a.*?>` is quadratic on '<a' with no '>' after it; _strip_tags must give the same
    # result on every string (random ones over the characters that matter) and stay fast on the bait.
    import random
    import time

    rnd = random.Random(8)
    parts = ["<a", "<a href=x>", ">", "</a>", "<b>", "</b>", "<i>", "</i>", "\n", "x", " ", "<", "a", "/"]
    for _ in range(20_000):
        text = "".join(rnd.choice(parts) for _ in range(rnd.randint(0, 16)))
        assert yfcc._strip_tags(text) == yfcc._TAGS.sub("", text), repr(text)
    t0 = time.perf_counter()
    no_close = "<a" * 500_000
    assert yfcc._strip_tags(no_close) == no_close
    assert yfcc._strip_tags(("<a" * 1000 + "\n") * 500) == ("<a" * 1000 + "\n") * 500
    assert yfcc._strip_tags(no_close + ">" + "<a" * 1000) == "<a" * 1000
    assert time.perf_counter() - t0 < 2.0


def _rows(n, base="http://127.0.0.1:1", columns=25):
    return [yfcc.format_row(i, 100 + i, f"{i:032x}", f"title {i}", f"<b>desc</b> {i} http://x.y", f"{base}/{i}.jpg",
                            columns=columns) for i in range(n)]


def test_filter_25_columns_subset_join_and_malformed_rows(tmp_path):
    lines = _rows(10)
    lines.insert(3, "garbage\twith\tthree")  # physical line 3
    lines.insert(7, "\t".join(["x"] * 25))  # 25 fields but no line number: malformed
    meta = tmp_path / "meta"
    meta.write_text("\n".join(lines) + "\n")
    sub = tmp_path / "sub.tsv"
    sub.write_text("".join(f"{i}\t{100 + i}\t{i:032x}\n" for i in (0, 2, 5, 9, 42)))
    rep = yfcc.filter_yfcc(str(meta), str(tmp_path / "out.parquet"), subset=str(sub))
    t = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["line_number"] for r in t] == [0, 2, 5, 9]
    assert t[1] == {"key": "000000002", "line_number": 2, "photo_id": 102, "photo_hash": f"{2:032x}", "title": "title 2",
                    "description": "desc 2 ", "caption": "title 2", "download_url": "http://127.0.0.1:1/2.jpg"}
    assert rep.layout == "consolidated" and rep.malformed == 2 and rep.malformed_lines == [3, 7]
    assert rep.rows_read == 12 and rep.written == 4 and rep.not_in_subset == 6
    assert json.loads((tmp_path / "out.parquet.report.json").read_text())["malformed_lines"] == [3, 7]


def test_filter_23_columns_bz2_and_fsspec_url(tmp_path):
    data = ("\n".join(_rows(6, columns=23)) + "\n").encode()
    with fsspec.open("memory://yfcc/meta.bz2", "wb") as f:
        f.write(bz2.compress(data))
    with fsspec.open("memory://yfcc/sub.tsv", "w") as f:
        f.write("1\t101\th\n4\t104\th\n")
    rep = yfcc.filter_yfcc("memory://yfcc/meta.bz2", "memory://yfcc/out.parquet", subset="memory://yfcc/sub.tsv")
    with fsspec.open("memory://yfcc/out.parquet", "rb") as f:
        t = pq.read_table(f).to_pylist()
    assert rep.layout == "legacy" and rep.malformed == 0
    assert [(r["line_number"], r["photo_id"], r["photo_hash"]) for r in t] == [(1, 101, ""), (4, 104, "")]
    assert detect_source("memory://yfcc/meta.bz2") == "yfcc"


def test_strict_mode_drops_empty_and_non_utf8_is_counted(tmp_path):
    lines = [yfcc.format_row(0, 1, "h", "", "", "http://a/0.jpg"),
             yfcc.format_row(1, 2, "h", "ok", "", "http://a/1.jpg").replace("ok", "caf\udce9", 1)]
    (tmp_path / "m").write_bytes(b"\n".join(l.encode("utf-8", "surrogateescape") for l in lines))
    rep = yfcc.filter_yfcc(str(tmp_path / "m"), str(tmp_path / "o.parquet"), mode="strict")
    t = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert rep.dropped_empty == 1 and rep.decode_errors == 1 and [r["title"] for r in t] == ["caf\ufffd"]
    rep = yfcc.filter_yfcc(str(tmp_path / "m"), str(tmp_path / "o2.parquet"), mode="slip")
    assert rep.written == 2  # slip mode keeps empty captions (SPEC §1)


def test_cc3m_and_cc12m_tables(tmp_path):
    (tmp_path / "cc3m.tsv").write_text("a dog on a beach\thttp://x/1.jpg\n\"two\nlines\"\thttp://x/2.jpg\n")
    (tmp_path / "cc12m.tsv").write_text("http://x/1.jpg\ta dog <PERSON>\nftp://x/2.jpg\tcat\n")
    (tmp_path / "t.csv").write_text("url,caption,extra\nhttp://x/1.jpg,hi,7\n")
    for name, n in (("cc3m.tsv", 2), ("cc12m.tsv", 2), ("t.csv", 1)):
        out = str(tmp_path / (name + ".parquet"))
        assert captions.normalize_table(str(tmp_path / name), out)["rows"] == n
        t = pq.read_table(out).to_pylist()
        assert t[0]["url"] == "http://x/1.jpg" and len(t[0]["key"]) == 20
    assert pq.read_table(str(tmp_path / "cc3m.tsv.parquet"))["caption"].to_pylist()[1] == "two\nlines"
    assert pq.read_table(str(tmp_path / "t.csv.parquet"))["extra"].to_pylist() == ["7"]
    # keys are stable across snapshots: same url + caption -> same key
    assert captions.row_keys(["http://x/1.jpg"], ["a dog on a beach"]).to_pylist() == \
        pq.read_table(str(tmp_path / "cc3m.tsv.parquet"))["key"].to_pylist()[:1]


def test_cc_table_counts_malformed_rows_and_caps_a_1mb_caption(tmp_path, fault_log):
    huge = "dog " * 262144  # 1 MiB caption
    (tmp_path / "cc.tsv").write_text(f"http://x/1.jpg\t{huge}\nhttp://x/2.jpg\tcat\textra column\n"
                                     "http://x/3.jpg\tbird\n")
    t0 = time.time()
    rep = captions.normalize_table(str(tmp_path / "cc.tsv"), str(tmp_path / "o.parquet"))
    t = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert (rep["rows"], rep["malformed"], rep["truncated_text"]) == (2, 1, 1)
    assert rep["rows"] + rep["malformed"] == 3  # every input row has a recorded fate
    assert len(t[0]["caption"]) == yfcc.MAX_TEXT_CHARS and t[1]["caption"] == "bird"
    assert time.time() - t0 < 10
    fault_log.record("input", "filter", "CC3M/CC12M table: 1 MB caption and a row with an extra column",
                     f"caption cut to {yfcc.MAX_TEXT_CHARS} chars (`truncated_text`), bad row counted as `malformed`",
                     bound="< 10 s")


def test_filter_cli(tmp_path):
    (tmp_path / "m").write_text("\n".join(_rows(4)) + "\nbad line\n")
    (tmp_path / "s").write_text("1\t101\tx\n3\t103\tx\n")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "filter-yfcc", "--metadata", str(tmp_path / "m"),
                        "--subset", str(tmp_path / "s"), "--output", str(tmp_path / "o.parquet")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["written"] == 2 and rep["malformed_lines"] == [4]
    assert pq.read_table(tmp_path / "o.parquet")["line_number"].to_pylist() == [1, 3]


def test_demo_corpus(tmp_path):
    c = demo_corpus.build_demo_corpus(str(tmp_path / "demo"), n_fashion=40, port=18791)
    assert c.n_fashion == 40 and c.n_photos == len(offline.photo_corpus()) and c.n_rows == 40 + c.n_photos + 3
    rep = yfcc.filter_yfcc(c.metadata, str(tmp_path / "t.parquet"), subset=c.subset)
    assert rep.malformed == 1 and rep.written == c.n_in_subset < c.n_rows
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    labels = json.loads(open(c.labels).read())
    for r in rows:
        if str(r["line_number"]) in labels:
            cls = labels[str(r["line_number"])]
            assert cls in r["title"] or cls in r["description"], r
            assert "<b>" not in r["description"] and "http" not in r["description"].replace(c.base_url, "")
        assert r["download_url"].startswith(c.base_url)
    # reused, not rewritten, when asked again with the same arguments
    mtime = os.path.getmtime(c.metadata)
    assert demo_corpus.build_demo_corpus(str(tmp_path / "demo"), n_fashion=40, port=18791) == c
    assert os.path.getmtime(c.metadata) == mtime
    with c.serve() as base:
        assert base == c.base_url
        with urllib.request.urlopen(rows[0]["download_url"], timeout=5) as resp:
            assert resp.status == 200 and len(resp.read()) > 100


def test_httpserve_faults(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 300)
    with serve_directory(str(tmp_path), faults=True) as base:
        with urllib.request.urlopen(base + "/_fault/truncated/a.jpg") as r:
            assert len(r.read()) == 302 // 3
        with urllib.request.urlopen(base + "/_fault/noai/a.jpg") as r:
            assert r.headers["X-Robots-Tag"] == "noai"
        with pytest.raises(urllib.error.HTTPError, match="500"):
            urllib.request.urlopen(base + "/_fault/500")
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/a.jpg", timeout=2)  # stopped cleanly


def _hostile_metadata(columns: int) -> bytes:
    """Lines the vectorised parser must treat exactly as the reference line loop does."""
    rows = [yfcc.format_row(i, 1000 + i, f"{i:032x}", t, d, u, columns=columns) for i, (t, d, u) in enumerate([
        ("plain", "text", "http://x/0.jpg"), ("", "", "http://x/1.jpg"), ("a+b %41%zz %", "50%+off", "http://x/2 b.jpg"),
        ("<a href=x>link</a> <b>b</b> <i>i</i> <a", "see http://t.co/x and www.y.z/q done", "http://x/3.jpg"),
        ("caf\u00e9 \u2603", "%E2%98%83 snow%C3", "http://x/\u00e9.jpg"), ("x" * 9000, "y", "http://x/5.jpg"),
        ("tab\u00a0http\u00a0x", "line\nbreak <a\nb>", "http://x/6.jpg"), ("&amp; &lt;b&gt;", "  spaces  ", "http://x/7.jpg"),
    ])]
    lines = [r.encode() for r in rows]
    lines.insert(3, b"1\t2\t3")  # wrong field count
    lines.insert(5, b"")  # empty line
    lines.append(rows[0].replace("0\t", "x0\t", 1).encode() if columns == 25 else b"only\ttwo")
    lines.append(rows[1].encode().replace(b"1001", b"1e01", 1))  # bad photo id
    lines.append(rows[2].encode().replace(b"a+b", b"a\xff+b", 1))  # invalid UTF-8
    lines.append(rows[3].encode() + b"\r")  # CR at the end
    lines.append(b"9" * 30 + rows[4].encode()[1:] if columns == 25 else rows[4].encode())  # huge line number
    return b"\n".join(lines) + b"\n" + rows[5].encode()  # no final newline


@pytest.mark.parametrize("columns", [25, 23])
@pytest.mark.parametrize("mode", ["slip", "strict"])
@pytest.mark.parametrize("with_subset", [False, True])
def test_vectorised_filter_equals_the_reference_loop(tmp_path, columns, mode, with_subset):
    meta = tmp_path / "m"
    meta.write_bytes(_hostile_metadata(columns))
    subset = None
    if with_subset:
        subset = tmp_path / "s.tsv"
        subset.write_text("".join(f"{i}\t{1000 + i}\tx\n" for i in (0, 2, 3, 4, 5, 6, 9, 11, 12, 13)))
    out = {}
    for vec in (True, False):
        o = tmp_path / f"o{vec}.parquet"
        rep = yfcc.filter_yfcc(str(meta), str(o), subset=str(subset) if subset else None, mode=mode,
                               malformed_output=str(tmp_path / f"bad{vec}.parquet"), vectorized=vec, line_offset=7)
        out[vec] = (pq.read_table(o).to_pylist(), rep.to_dict(), pq.read_table(tmp_path / f"bad{vec}.parquet").to_pylist())
    assert out[True] == out[False]
    assert out[True][1]["malformed"] == len(out[True][2]) >= 3 and out[True][0]


def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, capsys, fault_log):
    import bz2
    import gzip

    from flows.cli import main

    lines = "".join(yfcc.format_row(i, 100 + i, "h", f"t {i}", "d", f"http://x/{i}.jpg") + "\n" for i in range(3000)).encode()
    (tmp_path / "cut.bz2").write_bytes(bz2.compress(lines)[:-200])
    (tmp_path / "cut.gz").write_bytes(gzip.compress(lines)[:-100])
    (tmp_path / "garbage").write_bytes(bytes(range(256)) * 40)
    cases = [("missing metadata file", ["filter-yfcc", "--metadata", str(tmp_path / "nope")], "no such metadata file"),
             ("truncated .bz2 metadata", ["filter-yfcc", "--metadata", str(tmp_path / "cut.bz2")], "truncated or corrupt"),
             ("truncated .gz metadata", ["filter-yfcc", "--metadata", str(tmp_path / "cut.gz")], "truncated or corrupt"),
             ("metadata without one well-formed row", ["filter-yfcc", "--metadata", str(tmp_path / "garbage")],
              "no well-formed row"),
             ("missing source file (dataset build)", ["build", str(tmp_path / "nope.tsv"), "--store", str(tmp_path / "st"),
                                                      "--no-prefect"], "no such metadata file")]
    for label, args, why in cases:
        out = tmp_path / "out.parquet"
        extra = ["--output", str(out)] if args[0] == "filter-yfcc" else []
        assert main(["dataset", *args, *extra]) == 2, label
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and args[2 if args[0] == "filter-yfcc" else 1] in err, (label, err)
        assert not out.exists() and not [p for p in tmp_path.rglob("*.parquet")], label
        fault_log.record("input", "filter", label, f"exit 2, one stderr line: {err[:90]}", bound="no output file")


def _mirror_rows():
    """(line, photo id, title, description, url) in YFCC100M's encoding, with the cases a mirror has:
    missing and empty titles, HTML, URL-encoded text, links."""
    return [(0, 10, "a+cat+on+a+mat", "my+%3Cb%3Ecat%3C%2Fb%3E", "http://x/0.jpg"),
            (1, 11, "", "only+a+description+http%3A%2F%2Fflickr.com%2Fx", "http://x/1.jpg"),
            (2, 12, None, "%3Ca+href%3D%22http%3A%2F%2Fa.b%22%3Elink%3C%2Fa%3E+text", "http://x/2.jpg"),
            (3, 13, "caf%C3%A9+%E2%98%83", None, "http://x/3.jpg"),
            (4, 14, "100%25+real+%2Bplus", "www.example.com+and+<i>italic</i>", "http://x/4.jpg"),
            (5, None, "no photo id", "", "http://x/5.jpg"),  # malformed
            (6, 16, "no url", "", None)]  # malformed


def test_parquet_mirror_equals_the_tsv_path(tmp_path):
    """A parquet mirror in YFCC100M's column names (two files, one with a row group split) gives exactly the
    rows the 25-column TSV gives for the same rows: keys, cleaning, separate title and description."""
    from datasets.sources import yfcc_parquet

    rows = _mirror_rows()
    with open(tmp_path / "m.tsv", "w") as f:  # the TSV path on the same rows (the malformed ones left out)
        for ln, pid, t, d, u in rows:
            if pid is not None and u is not None:
                f.write(yfcc.format_row(ln, pid, "h%d" % ln, "", "", u).replace("\t\t", "\t", 0) + "\n")
    lines = (tmp_path / "m.tsv").read_text().splitlines()
    with open(tmp_path / "m.tsv", "w") as f:  # put the raw (already URL-encoded) text in place
        for line, (ln, pid, t, d, u) in zip(lines, [r for r in rows if r[1] is not None and r[4] is not None]):
            parts = line.split("\t")
            parts[8], parts[9] = t or "", d or ""
            f.write("\t".join(parts) + "\n")
    tsv = yfcc.filter_yfcc(str(tmp_path / "m.tsv"), str(tmp_path / "tsv.parquet"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    cols = lambda rs: {"photoid": [r[1] for r in rs], "line_number": [r[0] for r in rs],  # noqa: E731
                       "title": [r[2] for r in rs], "description": [r[3] for r in rs],
                       "downloadurl": [r[4] for r in rs], "hash": [f"h{r[0]}" for r in rs], "uid": ["1@N0"] * len(rs)}
    pq.write_table(pa.table(cols(rows[:3])), mirror / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.table(cols(rows[3:])), mirror / "part-1.parquet")
    assert detect_source(str(mirror)) == "yfcc-parquet" and detect_source(str(mirror / "*.parquet")) == "yfcc-parquet"
    assert detect_source(str(tmp_path / "tsv.parquet")) == "table"  # our own caption table is not a mirror
    rep = yfcc_parquet.filter_yfcc_parquet(str(mirror), str(tmp_path / "pq.parquet"),
                                           malformed_output=str(tmp_path / "bad.parquet"))
    got, want = pq.read_table(tmp_path / "pq.parquet"), pq.read_table(tmp_path / "tsv.parquet")
    assert got.equals(want), (got.to_pylist(), want.to_pylist())
    assert got["title"].to_pylist()[:3] == ["a cat on a mat", "", ""] and got["description"][2].as_py() == "link text"
    assert (rep.written, rep.malformed, tsv.written) == (5, 2, 5)
    assert pq.read_table(tmp_path / "bad.parquet")["line_number"].to_pylist() == [5, 6]
    # without a line number column the key is the photo id
    pq.write_table(pa.table({k: v for k, v in cols(rows[:2]).items() if k != "line_number"}), tmp_path / "noln.parquet")
    yfcc_parquet.filter_yfcc_parquet(str(tmp_path / "noln.parquet"), str(tmp_path / "o2.parquet"))
    assert pq.read_table(tmp_path / "o2.parquet")["key"].to_pylist() == ["10", "11"]


@pytest.fixture
def s3_bucket():
    from tests._s3_util import s3_server

    with s3_server() as url:
        yield url


def test_parquet_mirror_on_s3(tmp_path, s3_bucket):
    """Same reader over s3:// (moto): files found by prefix, read in row groups through fsspec."""
    from datasets.sources import yfcc_parquet

    rows = [r for r in _mirror_rows() if r[1] is not None and r[4] is not None]
    t = pa.table({"photo_id": [str(r[1]) for r in rows], "title": [r[2] for r in rows],
                  "description": [r[3] for r in rows], "download_url": [r[4] for r in rows]})
    local = tmp_path / "x.parquet"
    pq.write_table(t, local)
    url = f"{s3_bucket}/mirror/part-0.parquet"
    storage.put_file_atomic(str(local), url)
    assert detect_source(f"{s3_bucket}/mirror") == "yfcc-parquet"
    rep = yfcc_parquet.filter_yfcc_parquet(f"{s3_bucket}/mirror", str(tmp_path / "o.parquet"))
    assert rep.written == len(rows) and pq.read_table(tmp_path / "o.parquet")["key"].to_pylist() == [str(r[1]) for r in rows]


@pytest.mark.parametrize("columns", [25, 23])
@pytest.mark.parametrize("where", ["local", "memory", "bz2"])
def test_vectorised_filter_equals_the_reference_loop_across_blocks(tmp_path, monkeypatch, columns, where):
    """Many small blocks (memory-mapped locally, streamed otherwise), garbage before the first well-formed line
    spanning several blocks, and 25-column blocks parsed from line 0 and shifted: still the reference loop."""
    from datasets.sources import yfcc_blocks

    monkeypatch.setattr(yfcc_blocks, "BLOCK_BYTES", 700)
    data = b"junk\tline\n" * 150 + b"\n".join([_hostile_metadata(columns)] * 6) + b"\n"
    if where == "local":
        meta = str(tmp_path / "m")
        open(meta, "wb").write(data)
    else:
        meta = f"memory://blocks-{columns}/m" + (".bz2" if where == "bz2" else "")
        with fsspec.open(meta, "wb") as f:
            f.write(bz2.compress(data) if where == "bz2" else data)
    subset = tmp_path / "s.tsv"
    subset.write_text("".join(f"{i}\t{1000 + i}\tx\n" for i in range(0, 300, 2)))
    out = {}
    for vec in (True, False):
        o = tmp_path / f"o{vec}.parquet"
        rep = yfcc.filter_yfcc(meta, str(o), subset=str(subset), malformed_output=str(tmp_path / f"bad{vec}.parquet"),
                               vectorized=vec, line_offset=3)
        out[vec] = (pq.read_table(o).to_pylist(), rep.to_dict(), pq.read_table(tmp_path / f"bad{vec}.parquet").to_pylist())
    assert out[True] == out[False]
    assert out[True][1]["rows_read"] == data.count(b"\n") and out[True][1]["malformed"] >= 150 and out[True][0]


def test_subset_list_is_read_as_the_line_rule_says(tmp_path):
    """read_subset (blocks, numpy) = the per-line rule: first tab-separated field, stripped, all digits."""
    lines = [b"line_number\tphoto_id\thash", b"", b"5\t1\tx", b" 7 \t2\tx", b"9\r", b"0012", b"3", b"x4\t1", b"\t8",
             b"4e3\t1", b"11\t\t", b"\xff\t1", b"2\t" + "\u00e9".encode(), b"13"]
    data = b"\n".join(lines * 3)  # no final newline
    (tmp_path / "s.tsv").write_bytes(data)
    want = set()
    for raw in data.split(b"\n"):
        head = raw.split(b"\t", 1)[0].strip()
        if head.isdigit():
            want.add(int(head))
    bits = yfcc.read_subset(str(tmp_path / "s.tsv"))
    assert {i for i, b in enumerate(bits) if b} == want == {5, 7, 9, 12, 3, 11, 2, 13}


def _fuzz_metadata(seed: int, columns: int, n: int = 400) -> bytes:
    """Seeded random lines: mostly rows of the layout whose text fields are drawn from the pieces the
    parser and the cleaning regexes react to (separators, control bytes, escapes, tags, URLs, Unicode
    whitespace, invalid UTF-8, long digit runs), with some lines of other field counts in between."""
    import random

    rng = random.Random(seed)
    pieces = [b"a", b"word ", b"+", b"%", b"%4", b"%41", b"%zz", b"%E2%98%83", b"%c3%a9", b"<a", b"<a href=x>", b">", b"</a>",
              b"<b>", b"</i>", b"http", b"http://x.y/z", b"www", b"www.q", b"\r", b"\x00", b"\x07", b"\x0b", b"\x0c",
              b"\x1c", b"\xc2\x85", b"\xe3\x80\x80", b"\xc2\xa0", "é".encode(), b" ", b"9" * 20]
    rare = [b"\xff", b"\xe9", b"\t", b"%C3", b"%FF"]  # invalid UTF-8 (raw or decoded), a stray tab: the reference path

    def text() -> bytes:
        return b"".join(rng.choice(rare) if rng.random() < 0.01 else rng.choice(pieces) for _ in range(rng.randint(0, 12)))

    lines = []
    for i in range(n):
        cols = [str(i).encode(), str(5000 + i).encode(), b"%032x" % i] + [b"x"] * 22
        if columns == 23:
            cols = cols[1:2] + cols[3:]
        pos = yfcc._POS[columns]
        for j in pos[3:]:
            cols[j] = text()
        if rng.random() < 0.1:
            cols[pos[1]] = rng.choice([b"", b"12a", b"9" * 25, b"\xff1"])
        if columns == 25 and rng.random() < 0.1:
            cols[0] = rng.choice([b"", b"-1", b"0x1", b"9" * 19, b"00" + cols[0]])
        line = b"\t".join(cols)
        if rng.random() < 0.05:
            line = text()
        lines.append(line)
    return b"\n".join(lines) + (b"\n" if seed % 2 else b"")


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_filter_equals_the_reference_loop_on_random_lines(tmp_path, monkeypatch, seed):
    """Random lines, small blocks, both layouts, both modes, with and without a subset: the vectorised parser
    is the reference loop, byte for byte (output, report, malformed rows)."""
    from datasets.sources import yfcc_blocks

    monkeypatch.setattr(yfcc_blocks, "BLOCK_BYTES", 4096)
    columns, mode = (25, 23)[seed % 2], ("slip", "strict")[seed // 2 % 2]
    meta = tmp_path / "m"
    meta.write_bytes(_fuzz_metadata(seed, columns))
    subset = None
    if seed >= 2:
        subset = tmp_path / "s.tsv"
        subset.write_text("".join(f"{i}\t{5000 + i}\tx\n" for i in range(0, 400, 3)))
    out = {}
    for vec in (True, False):
        o = tmp_path / f"o{vec}.parquet"
        rep = yfcc.filter_yfcc(str(meta), str(o), subset=str(subset) if subset else None, mode=mode,
                               malformed_output=str(tmp_path / f"bad{vec}.parquet"), vectorized=vec)
        out[vec] = (pq.read_table(o).to_pylist(), rep.to_dict(), pq.read_table(tmp_path / f"bad{vec}.parquet").to_pylist())
    assert out[True] == out[False]
    assert out[True][0] and out[True][1]["malformed"] > 0


@pytest.mark.parametrize("mode", ["slip", "strict"])
def test_parquet_mirror_equals_the_tsv_path_on_random_rows(tmp_path, mode):
    """Seeded random raw title/description text (the fuzz pieces that are valid in a parquet string column,
    plus text over MAX_TEXT_CHARS), 2,000 rows in batches of 300: the parquet mirror's rows and counts are the
    25-column TSV path's, in both modes."""
    import random

    from datasets.sources import yfcc_parquet

    rng = random.Random(7)
    pieces = ["a", "word ", "+", "%", "%4", "%41", "%zz", "%E2%98%83", "%c3%a9", "<a", "<a href=x>", ">", "</a>", "<b>",
              "</i>", "http", "http://x.y/z", "www", "www.q", "\r", "\x07", "\x0b", "\x1c", "\u3000", "\xa0", "é", " ",
              "&amp;", "&lt;b&gt;", "%26amp%3B", "%FF", "%C3", "9" * 20]

    def text() -> str:
        if rng.random() < 0.02:
            return "word+" * 2000  # 10,000 characters once decoded: cut to MAX_TEXT_CHARS, counted
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))

    rows = [(i, 7000 + i, text(), text(), f"http://x/{i}.jpg") for i in range(2000)]
    with open(tmp_path / "m.tsv", "wb") as f:
        for ln, pid, t, d, u in rows:
            cols = yfcc.format_row(ln, pid, f"h{ln}", "", "", u).split("\t")
            cols[8], cols[9] = t, d
            f.write(("\t".join(cols) + "\n").encode())
    tsv = yfcc.filter_yfcc(str(tmp_path / "m.tsv"), str(tmp_path / "tsv.parquet"), mode=mode)
    pq.write_table(pa.table({"photoid": [r[1] for r in rows], "line_number": [r[0] for r in rows],
                             "title": [r[2] for r in rows], "description": [r[3] for r in rows],
                             "downloadurl": [r[4] for r in rows], "hash": [f"h{r[0]}" for r in rows]}), tmp_path / "m.parquet")
    rep = yfcc_parquet.filter_yfcc_parquet(str(tmp_path / "m.parquet"), str(tmp_path / "pq.parquet"), mode=mode,
                                           batch_rows=300)
    got, want = pq.read_table(tmp_path / "pq.parquet"), pq.read_table(tmp_path / "tsv.parquet")
    assert got.to_pylist() == want.to_pylist()
    assert (rep.written, rep.truncated_text, rep.dropped_empty) == (tsv.written, tsv.truncated_text, tsv.dropped_empty)
    assert rep.truncated_text > 0 and (rep.dropped_empty > 0 or mode == "slip")
