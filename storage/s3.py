"""One way to build an S3 client from the worker's settings, for artifacts and datasets alike.

Credentials come from WorkerSettings (never from os.environ here, never logged). Retries use
botocore's ``standard`` mode; an endpoint URL (Supabase Storage, R2, MinIO, SeaweedFS) gets
path-style addressing, which S3-compatible stores expect. An AWS endpoint keeps virtual-hosted
addressing, loses a leading ``<bucket>.`` (RunPod's bucket URLs carry one) and gives the region.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from config.settings import WorkerSettings


def make_s3_client(settings: WorkerSettings, *, max_attempts: int = 5, connect_timeout: float = 10,
                   read_timeout: float = 120) -> Any:
    import boto3
    from botocore.config import Config

    endpoint, addressing, region = s3_endpoint(settings)
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # SigV4 everywhere, presigned URLs included (botocore presigns with SigV2 otherwise).
        signature_version="s3v4",
        # One connection per transfer thread (S3ArtifactStore uses 8), plus room for HEADs.
        max_pool_connections=16,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": addressing},
        # Checksums on every upload, verified by the server (SeaweedFS and AWS both do).
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    secret = settings.aws_secret_access_key
    key_id = settings.aws_access_key_id
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )


_AWS_HOST = re.compile(r"^s3[.-](?:dualstack\.)?(?P<region>[a-z0-9-]+)\.amazonaws\.com$")


def s3_endpoint(settings: WorkerSettings) -> tuple[str | None, str, str]:
    """(endpoint URL, addressing style, region) for the configured endpoint."""
    url = settings.s3_endpoint_url
    if not url:
        return None, "auto", settings.aws_region or "us-east-1"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host.endswith(".amazonaws.com"):
        return url, "path", settings.aws_region or "us-east-1"
    # https://<bucket>.s3.<region>.amazonaws.com is a bucket's URL, not the service's: with it as
    # the endpoint every key would land under "<bucket>/" inside the bucket.
    if settings.s3_bucket and host.startswith(settings.s3_bucket + "."):
        host = host[len(settings.s3_bucket) + 1:]
        url = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    match = _AWS_HOST.match(host)
    region = settings.aws_region or (match.group("region") if match and match.group("region") != "external-1"
                                     else "us-east-1")
    return url, "virtual", region
