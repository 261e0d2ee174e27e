"""A local S3 server (moto, on 127.0.0.1) for the tests whose experiment lives in s3:// storage,
and helpers that read the bucket. Import the fixture into a test module:

    from tests.s3 import BUCKET, s3_env, s3_files, s3_read  # noqa: F401  (s3_env is a fixture)
"""
import logging
import os
import urllib.request

import pytest

BUCKET = "boneage-test"


@pytest.fixture(scope="module")
def s3_env():
    """A local S3 server and the environment that points pyarrow (Ray's storage, ours) at it.
    Moto keeps its buckets in the process, not the server: a module's server would otherwise hold
    what an earlier module on the same pytest worker left (CI once saw test_multinode's prepared
    images in test_prepared_store's bucket), so each module starts from an empty store."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def s3_fs():
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def s3_files(prefix: str) -> list[str]:
    """The files under BUCKET/prefix, as paths relative to it."""
    import pyarrow.fs

    infos = s3_fs().get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return [i.path[len(BUCKET) + len(prefix) + 2:] for i in infos if i.type == pyarrow.fs.FileType.File]


def s3_mtime(path: str):
    return s3_fs().get_file_info(f"{BUCKET}/{path}").mtime


def s3_read(path: str) -> str:
    return s3_bytes(path).decode()


def s3_bytes(path: str) -> bytes:
    with s3_fs().open_input_stream(f"{BUCKET}/{path}") as f:
        return f.read()
