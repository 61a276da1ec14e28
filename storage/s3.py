"""One way to build an S3 client from the worker's settings, for artifacts and datasets alike.

Credentials come from WorkerSettings (never from os.environ here, never logged). Retries use
botocore's ``standard`` mode; an endpoint URL (Supabase Storage, R2, MinIO, SeaweedFS) gets
path-style addressing, which S3-compatible stores expect.
"""

from __future__ import annotations

from typing import Any

from config.settings import WorkerSettings


def make_s3_client(settings: WorkerSettings, *, max_attempts: int = 5, connect_timeout: float = 10,
                   read_timeout: float = 120) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # SigV4 everywhere, presigned URLs included (botocore presigns with SigV2 otherwise).
        signature_version="s3v4",
        # One connection per transfer thread (S3ArtifactStore uses 8), plus room for HEADs.
        max_pool_connections=16,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        # Checksums on every upload, verified by the server (SeaweedFS and AWS both do).
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    secret = settings.aws_secret_access_key
    key_id = settings.aws_access_key_id
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region or "us-east-1",
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )
