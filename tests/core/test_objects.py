"""The object store port's contract on both backends (the local folder, and S3 against a real S3
endpoint on 127.0.0.1: moto's server), then what is particular to S3."""

import hashlib
import os
import re
import sys
from pathlib import Path

import boto3
import pytest

from pipelines.core.errors import CDLError
from pipelines.core.objects import LocalObjectStore, ObjectMissing, S3ObjectStore
from pipelines.core.postgres import free_port
from pipelines.core.services import ServiceSpec, Supervisor
from pipelines.data.engine import PipelineEngine
from pipelines.data.repos import DataRepos, Ref
from pipelines.plugins import backend_class, engines

# Throwaway credentials for the local endpoint; it accepts any.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    supervisor = Supervisor(tmp_path_factory.mktemp("s3"))
    server = Path(sys.executable).with_name("moto_server")
    supervisor.start(
        ServiceSpec(
            name="s3",
            argv=[str(server), "-H", "127.0.0.1", "-p", str(port)],
            health_url=f"http://127.0.0.1:{port}/",
            start_timeout_s=60,
        )
    )
    yield f"http://127.0.0.1:{port}"
    supervisor.stop("s3")


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = "cdl-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=engines("object_store"))
def store(request, tmp_path):
    """Each registered object store, empty."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    return S3ObjectStore(
        request.getfixturevalue("bucket"), "c", request.getfixturevalue("s3_endpoint")
    )


def test_store_is_the_registered_class(store):
    assert type(store) in {backend_class("object_store", e) for e in engines("object_store")}


def test_bytes_in_sha256_out_stored_once(store, tmp_path):
    sha, size = store.put_bytes(b"hello")
    assert (sha, size) == (hashlib.sha256(b"hello").hexdigest(), 5)
    assert store.put_bytes(b"hello") == (sha, size) and store.has(sha)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # past the one-go size: the streaming path
    sha_big, size_big = store.put_file(big)
    assert (sha_big, size_big) == (hashlib.sha256(big.read_bytes()).hexdigest(), 3 << 20)
    assert b"".join(store.read_chunks(sha_big)) == big.read_bytes()
    with store.open(sha) as stream:
        assert stream.read() == b"hello"
    store.materialize(sha, tmp_path / "out" / "copy.txt")
    assert (tmp_path / "out" / "copy.txt").read_bytes() == b"hello"


def test_unknown_objects_are_missing(store, tmp_path):
    unknown = "0" * 64
    assert not store.has(unknown)
    with pytest.raises(ObjectMissing):
        store.open(unknown)
    with pytest.raises(ObjectMissing):
        store.materialize(unknown, tmp_path / "nothing")


def keys(endpoint: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_store_round_trip_and_dedupe(s3_endpoint, bucket, tmp_path):
    store = S3ObjectStore(bucket, "objects", s3_endpoint)
    sha, size = store.put_bytes(b"hello")
    assert store.put_bytes(b"hello") == (sha, size)
    assert keys(s3_endpoint, bucket) == [f"objects/{sha[:2]}/{sha[2:]}"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # above the single-read size: hashed, then uploaded
    big_sha, big_size = store.put_file(big)
    assert big_size == 3 << 20 and store.has(big_sha)
    assert b"".join(store.read_chunks(big_sha)) == big.read_bytes()
    store.materialize(sha, tmp_path / "out" / "hello.txt")
    assert (tmp_path / "out" / "hello.txt").read_bytes() == b"hello"
    with pytest.raises(ObjectMissing):
        store.open("0" * 64)


def test_missing_bucket_is_a_clear_error(s3_endpoint, bucket):
    store = S3ObjectStore("no-such-bucket", "", s3_endpoint)
    with pytest.raises(CDLError, match="object store s3://no-such-bucket/ at http://127.0.0.1"):
        store.put_bytes(b"x")


def test_a_stack_on_s3_puts_gets_and_runs_pipelines(project_factory, s3_endpoint, bucket, tmp_path):
    stack = project_factory(
        {
            "stacks": {
                "local": {
                    "object_store": {
                        "kind": "s3",
                        "bucket": bucket,
                        "prefix": "data",
                        "endpoint_url": s3_endpoint,
                    }
                }
            }
        }
    )
    stack.up()
    repos = DataRepos(stack)
    repos.create_repo("raw")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.txt").write_text("one")
    (src / "b.txt").write_text("two")
    commit, _ = repos.put(Ref.parse("raw"), [src])
    assert len(keys(s3_endpoint, bucket)) == 2
    assert not (stack.settings.home / "objects").exists()
    repos.get(commit, "/a/1.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "one"

    spec = tmp_path / "upper.yaml"
    spec.write_text(
        "pipeline: {name: upper}\n"
        "transform: {cmd: [sh, -c, 'tr a-z A-Z < /pfs/raw/b.txt > /pfs/out/B.txt']}\n"
        "input: {pfs: {repo: raw, glob: /}}\n"
    )
    engine = PipelineEngine(stack)
    engine.create(spec)
    engine.run_pending()
    output = repos.resolve("upper")
    assert {f.path for f in repos.files(output)} == {"/B.txt"}
    assert b"".join(repos.store.read_chunks(next(repos.files(output)).sha256)) == b"TWO"
