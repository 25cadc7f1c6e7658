"""fetch-coco / fetch-weights end to end against a local HTTP server (127.0.0.1) serving archives built here.

The server implements `Range: bytes=N-` and can cut a connection mid-file once, so resuming is
exercised over real sockets; a small manifest stands in for COCO's (the real one names 26 GB).
"""
import hashlib
import http.server
import io
import json
import random
import socket
import threading
import zipfile

import pytest

from dyhead.data.coco_fetch import COCO_2017, MARKER, Part, fetch_coco
from dyhead.data.fetch import Remote, download, fetch_file
from dyhead.errors import DyheadError
from dyhead.modeling import pretrained


class Server:
    """Serves `files` (URL path -> bytes); records requests; `cut[path] = n` drops the first reply after n bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                owner.requests.append((self.path, rng))
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = owner.cut.pop(self.path, None)
                if cut is not None:  # announce everything, send part, then drop the connection
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    owner.sent += cut
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)
                owner.sent += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def small_coco(seed: int = 0) -> dict[str, dict[str, bytes]]:
    """The five COCO archives at toy size, same member layout as the real ones."""
    rnd = random.Random(seed)

    def jpg():  # content does not matter to the fetch; random bytes resist compression
        return rnd.randbytes(20_000)

    ann = json.dumps({"images": [], "annotations": [], "categories": []}).encode()
    return {
        "train": {f"train2017/{i:012d}.jpg": jpg() for i in range(4)},
        "val": {f"val2017/{i:012d}.jpg": jpg() for i in range(2)},
        "test": {f"test2017/{i:012d}.jpg": jpg() for i in range(2)},
        "annotations": {"annotations/instances_train2017.json": ann, "annotations/instances_val2017.json": ann},
        "test-info": {"annotations/image_info_test2017.json": ann, "annotations/image_info_test-dev2017.json": ann},
    }


def publish(server: Server, content=None) -> dict[str, Part]:
    """Serve toy archives under COCO's URL paths; return a manifest with their sizes and md5s."""
    content = content or small_coco()
    manifest = {}
    for key, part in COCO_2017.items():
        data = make_zip(content[key])
        server.files["/" + part.remote.path] = data
        remote = Remote(part.remote.name, part.remote.path, "http://unused.invalid", size=len(data),
                        md5=hashlib.md5(data).hexdigest())
        images = tuple((d, sum(n.startswith(d + "/") for n in content[key])) for d, _ in part.images)
        manifest[key] = Part(remote, part.files, images)
    return manifest


def fetch(root, manifest, server, **kw):
    logs = []
    kw.setdefault("mirror", server.url)
    record = fetch_coco(root, manifest=manifest, log=logs.append, backoff=0.0, progress_every=0.0, **kw)
    return record, logs


def test_manifest_is_the_published_one():
    assert COCO_2017["val"].remote.url() == "http://images.cocodataset.org/zips/val2017.zip"
    assert COCO_2017["test-info"].remote.url() == "http://images.cocodataset.org/annotations/image_info_test2017.zip"
    assert COCO_2017["annotations"].remote.size == 252_907_541
    assert all(len(p.remote.md5) == 32 for p in COCO_2017.values())


def test_clean_fetch_builds_the_layout(server, tmp_path):
    manifest = publish(server)
    root = tmp_path / "coco"
    record, logs = fetch(root, manifest, server)
    for rel in ("train2017", "val2017", "test2017"):
        assert (root / rel).is_dir()
    assert len(list((root / "train2017").glob("*.jpg"))) == 4
    for rel in ("instances_train2017.json", "instances_val2017.json", "image_info_test-dev2017.json"):
        assert (root / "annotations" / rel).is_file()
    assert json.loads((root / MARKER).read_text())["parts"].keys() == manifest.keys()
    assert not (root / "archives").exists()  # removed once extracted
    assert not list(root.glob(".extract-*"))
    assert any("%" in line for line in logs)  # progress lines
    assert record["parts"]["val"]["source"] == f"{server.url}/zips/val2017.zip"


def test_cut_connection_resumes_where_it_stopped(server, tmp_path):
    manifest = publish(server)
    path = "/zips/train2017.zip"
    size = len(server.files[path])
    server.cut[path] = size // 3
    root = tmp_path / "coco"
    _, logs = fetch(root, manifest, server, parts=["train"])
    train_requests = [r for r in server.requests if r[0] == path]
    assert train_requests == [(path, None), (path, f"bytes={size // 3}-")]
    assert any("interrupted at" in line for line in logs) and any("resuming at" in line for line in logs)
    assert server.sent == size  # nothing sent twice
    assert len(list((root / "train2017").glob("*.jpg"))) == 4


def test_killed_download_continues_from_part_file(server, tmp_path):
    data = bytes(range(256)) * 1000
    server.files["/f.bin"] = data
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:100_000])  # what a killed job left
    remote = Remote("f.bin", "f.bin", server.url, size=len(data), md5=hashlib.md5(data).hexdigest())
    fetch_file(remote, dest, log=lambda *_: None, backoff=0.0)
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=100000-")]


def test_checksum_mismatch_is_refused_and_not_extracted(server, tmp_path):
    manifest = publish(server)
    path = "/zips/val2017.zip"
    data = bytearray(server.files[path])
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    server.files[path] = bytes(data)
    root = tmp_path / "coco"
    with pytest.raises(DyheadError, match=r"val2017\.zip.*md5 .* does not match the published .*not extracted"):
        fetch(root, manifest, server, parts=["val"])
    assert not (root / "val2017").exists()
    assert not (root / MARKER).exists()
    assert (root / "archives" / "val2017.zip.corrupt").exists()


def test_wrong_size_on_server_is_refused(server, tmp_path):
    manifest = publish(server)
    server.files["/zips/val2017.zip"] = server.files["/zips/val2017.zip"][:-10]  # truncated on the mirror
    with pytest.raises(DyheadError, match=r"server has \d+ bytes, the manifest expects \d+"):
        fetch(tmp_path / "coco", manifest, server, parts=["val"])
    assert not (tmp_path / "coco" / "val2017").exists()


def test_truncated_local_archive_is_refused(server, tmp_path):
    manifest = publish(server)
    local = tmp_path / "local"
    local.mkdir()
    (local / "val2017.zip").write_bytes(server.files["/zips/val2017.zip"][:1000])
    with pytest.raises(DyheadError, match=r"val2017\.zip: 1000 bytes, expected \d+ \(truncated"):
        fetch(tmp_path / "coco", manifest, server, parts=["val"], from_dir=local)
    assert not (tmp_path / "coco" / "val2017").exists()
    assert server.requests == []


def test_existing_local_copy_is_reused_without_download(server, tmp_path):
    manifest = publish(server)
    local = tmp_path / "cluster" / "coco"
    for entries in small_coco().values():  # an extracted copy, as clusters keep it
        for name, data in entries.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)
    root = tmp_path / "coco"
    fetch(root, manifest, server, from_dir=local)
    assert server.requests == []
    assert (root / "train2017").is_symlink() and (root / "train2017").resolve() == (local / "train2017").resolve()
    assert (root / "annotations" / "instances_val2017.json").read_bytes() == \
        (local / "annotations" / "instances_val2017.json").read_bytes()

    copied = tmp_path / "copied"
    fetch(copied, manifest, server, from_dir=local, copy=True)
    assert (copied / "val2017").is_dir() and not (copied / "val2017").is_symlink()
    assert server.requests == []


def test_incomplete_local_copy_names_what_is_missing(server, tmp_path):
    manifest = publish(server)
    local = tmp_path / "local"
    (local / "val2017").mkdir(parents=True)
    (local / "val2017" / "000000000001.jpg").write_bytes(b"x")
    with pytest.raises(DyheadError, match=r"val2017: 1 images, expected 2"):
        fetch(tmp_path / "coco", manifest, server, parts=["val"], from_dir=local)


def test_marker_prevents_a_second_fetch(server, tmp_path):
    manifest = publish(server)
    root = tmp_path / "coco"
    fetch(root, manifest, server)
    n = len(server.requests)
    _, logs = fetch(root, manifest, server)
    assert len(server.requests) == n
    assert any("already fetched" in line for line in logs)


def test_interrupted_fetch_keeps_finished_parts(server, tmp_path):
    manifest = publish(server)
    root = tmp_path / "coco"
    del server.files["/zips/test2017.zip"]  # the mirror fails on the third archive
    with pytest.raises(DyheadError, match="HTTP 404"):
        fetch(root, manifest, server)
    assert (root / "val2017").is_dir() and not (root / MARKER).exists()
    publish(server)
    before = len(server.requests)
    fetch(root, manifest, server)
    assert [p for p, _ in server.requests[before:]] == ["/zips/test2017.zip", "/annotations/annotations_trainval2017.zip",
                                                         "/annotations/image_info_test2017.zip"]


def test_unsafe_member_path_is_refused(server, tmp_path):
    data = make_zip({"../evil.txt": b"x"})
    server.files["/a.zip"] = data
    remote = Remote("a.zip", "a.zip", server.url, size=len(data), md5=hashlib.md5(data).hexdigest())
    manifest = {"val": Part(remote, files=("evil.txt",))}
    with pytest.raises(DyheadError, match="unsafe member path"):
        fetch(tmp_path / "coco", manifest, server, mirror=None)
    assert not (tmp_path / "evil.txt").exists()


def test_download_gives_up_with_a_resume_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DyheadError, match=r"failed after 1 retries .* run again to resume"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1, backoff=0.0, log=lambda *_: None)


def test_fetch_weights_checks_the_sha256_prefix(server, tmp_path, monkeypatch):
    data = b"not really a checkpoint" * 100
    digest = hashlib.sha256(data).hexdigest()
    name = f"resnet50-{digest[:8]}.pth"
    server.files["/" + name] = data
    monkeypatch.setitem(pretrained.IMAGENET, "r50", Remote(name, name, server.url, size=len(data),
                                                             sha256_prefix=digest[:8]))
    out = pretrained.fetch_weights(["r50"], tmp_path / "weights", log=lambda *_: None, backoff=0.0)
    assert out == [tmp_path / "weights" / name] and out[0].read_bytes() == data

    bad = f"resnet101-{'0' * 8}.pth"
    server.files["/" + bad] = data
    monkeypatch.setitem(pretrained.IMAGENET, "r101", Remote(bad, bad, server.url, size=len(data),
                                                              sha256_prefix="0" * 8))
    with pytest.raises(DyheadError, match=r"sha256 .* does not start with the published 00000000"):
        pretrained.fetch_weights(["r101"], tmp_path / "weights", log=lambda *_: None, backoff=0.0)
    assert not (tmp_path / "weights" / bad).exists()


def test_weights_manifest_is_torchvisions():
    from torchvision.models import ResNet50_Weights, ResNet101_Weights, ResNeXt101_64X4D_Weights

    for arch, w in (("r50", ResNet50_Weights.IMAGENET1K_V1), ("r101", ResNet101_Weights.IMAGENET1K_V1),
                    ("x101", ResNeXt101_64X4D_Weights.IMAGENET1K_V1)):
        remote = pretrained.IMAGENET[arch]
        assert remote.url() == w.url
        assert abs(remote.size / 2**20 - w.meta["_file_size"]) < 0.0006
        assert w.url.split("-")[-1].startswith(remote.sha256_prefix)
