"""A real S3-protocol server (moto's standalone server) for tests, as a pytest plugin.

Register it in ``tests/conftest.py`` with ``pytest_plugins = ["tests.conftest_s3"]``. Then:

- ``s3_server`` (session): starts moto on 127.0.0.1 on a free port, creates a fresh bucket and
  yields ``{"endpoint_url", "bucket", "storage_options"}``. For the session it sets
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` and ``AWS_DEFAULT_REGION``,
  so plain ``s3://`` URIs work through s3fs/botocore, in this process and in any Ray worker
  started after the fixture (start Ray after requesting it); ``storage_options`` work without the
  environment.
- ``s3_uri`` (per test): ``s3://{bucket}/{fresh prefix}``, so tests never see each other's keys.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

ACCESS_KEY = "oppu-test-key"
SECRET_KEY = "oppu-test-secret"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    environment = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint_url, "AWS_DEFAULT_REGION": REGION,
        # No instance-metadata probing for credentials: it would stall each client start.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    cleared = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")
    saved = {name: os.environ.get(name) for name in (*environment, *cleared)}
    for name in cleared:
        os.environ.pop(name, None)
    os.environ.update(environment)
    bucket = f"oppu-test-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=bucket)
    try:
        yield {
            "endpoint_url": endpoint_url,
            "bucket": bucket,
            "storage_options": {"endpoint_url": endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY,
                                "client_kwargs": {"region_name": REGION}},
        }
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_uri(s3_server: dict[str, Any]) -> str:
    return f"s3://{s3_server['bucket']}/test-{secrets.token_hex(4)}"
