"""The test services themselves answer as the real ones do (so the other tests mean something)."""

from __future__ import annotations

import botocore.exceptions
import pytest


@pytest.mark.slow
def test_s3_server_enforces_credentials_and_round_trips(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"

    import boto3
    from botocore.config import Config

    intruder = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                            aws_secret_access_key="wrong-secret", region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        intruder.get_object(Bucket=s3_bucket, Key="a/b.txt")
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")
