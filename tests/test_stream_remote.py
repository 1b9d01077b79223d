"""Streaming over fsspec URLs by byte range: a real local S3 endpoint (moto) and HTTP server."""
import os
import shutil
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wvdata import open_dataset
from wvdata.stream import loader
from wvdata.synth.s3 import s3_env as s3_environment
from wvdata.synth.s3 import start_s3_server


@pytest.fixture()
def s3_env(monkeypatch):
    """moto's standalone S3 server on 127.0.0.1, started and stopped here."""
    import s3fs

    proc, url = start_s3_server()
    for k, v in s3_environment(url).items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # no cached client may keep another endpoint
    yield url
    s3fs.S3FileSystem.clear_instance_cache()
    proc.terminate()
    proc.wait(10)


def _upload(local, bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    fs.put(str(local), f"{bucket}/ds", recursive=True)
    fs.invalidate_cache()
    return f"s3://{bucket}/ds"


def test_s3_stream_reads_every_sample_by_byte_range(s3_env, webvision_dataset):
    url = _upload(webvision_dataset, "wv-test")
    ds = open_dataset(url)
    assert ds.num_classes == 10
    ld = loader(url, batch_size=8, image_size=32, num_workers=2, rank=0, world_size=1)
    keys = [k for _, _, batch in ld for k in batch]
    assert Counter(keys) == Counter(open_dataset(webvision_dataset).samples("train")["key"].to_list())
    assert ld.stats.skipped == 0


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (the stdlib handler ignores Range)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, _, end = rng.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else size - 1, size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(left))


def test_http_stream_reads_by_range(webvision_dataset, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(webvision_dataset, root / "ds")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ds"
        ld = loader(url, "val", batch_size=8, train=False, image_size=32, num_workers=1, rank=0, world_size=1)
        keys = [k for _, _, batch in ld for k in batch]
        assert keys == open_dataset(webvision_dataset).samples("val")["key"].to_list()
    finally:
        server.shutdown()
