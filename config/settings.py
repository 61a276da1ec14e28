"""WorkerSettings: the worker's environment, read once and validated (CONTRACT §3).

Built in ``handler.main``/on first use, never at import time, and passed down to the stages: no
stage reads ``os.environ`` itself. Secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

RUNPOD_VOLUME = Path("/runpod-volume")

# The groups of variables that configure one service together. A job meets a broken group at the
# stage that uses it (the handler maps "s3" to upload, "supabase" to record), so an error in one is
# reported there, not as a mistake in the job's input.
S3_FIELDS = frozenset({
    "s3_bucket", "s3_prefix", "s3_endpoint_url", "aws_access_key_id", "aws_secret_access_key",
    "aws_region", "presign_seconds",
})
SUPABASE_FIELDS = frozenset({
    "supabase_url", "supabase_service_role_key", "supabase_jobs_table", "supabase_artifacts_table",
})


class HalfConfigured(ValueError):
    """A group of variables set half-way; ``group`` is "s3" or "supabase".

    A ValueError, so pydantic reports it as one of the settings' validation errors and keeps the
    exception itself in the error's context: ``settings_error_group`` reads the group from there.
    """

    def __init__(self, message: str, *, group: str):
        super().__init__(message)
        self.group = group


def _default_volume_root() -> Path:
    return RUNPOD_VOLUME if RUNPOD_VOLUME.is_dir() else Path(".volume").resolve()


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- storage roots -------------------------------------------------------------------------
    volume_root: Path = Field(default_factory=_default_volume_root)
    models_dir: Path | None = None
    model_path: Path | None = None
    hf_home: Path | None = None
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    )
    default_base_model: str | None = None
    trust_remote_code_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hf_endpoint: str | None = None  # a Hub mirror; huggingface_hub's default when unset
    allow_pickle_weights: bool = False  # .bin/.pth weights run pickle code when loaded
    download_lock_timeout_s: float = Field(default=4 * 3600, gt=0)
    download_free_disk_margin_bytes: int = Field(default=2 * 1024**3, ge=0)
    # Network volumes are slow at the small random reads of memory-mapped loading: stage to local disk.
    model_load_strategy: Literal["auto", "stage", "direct"] = "auto"
    local_stage_dir: Path = Path("/tmp/lora-worker-models")

    # --- artifact store (S3) -------------------------------------------------------------------
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL")
    )
    aws_access_key_id: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID")
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY"),
    )
    aws_region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    # Seconds a presigned download URL (one per adapter file, in the artifact record) stays valid;
    # unset: no URLs. SigV4 caps it at 7 days.
    presign_seconds: int | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    # --- records (Supabase) --------------------------------------------------------------------
    supabase_url: str | None = None
    supabase_service_role_key: SecretStr | None = None
    supabase_jobs_table: str = "training_jobs"
    supabase_artifacts_table: str = "training_artifacts"

    # --- job behaviour -------------------------------------------------------------------------
    gpu_hourly_usd: float | None = Field(default=None, ge=0)
    max_train_seconds: float | None = Field(default=None, gt=0)
    # Keep the loaded base model in memory between jobs on a warm worker (training/base_cache.py).
    warm_model_cache: bool = True
    progress_interval_s: float = Field(default=5.0, ge=0)
    # A second live delivery of a job_id waits this long for the first, then reports it as running.
    job_lock_timeout_s: float = Field(default=30.0, ge=0)
    max_dataset_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_inline_records: int = Field(default=10_000, gt=0)
    # Reading a dataset (data/budget.py): records read, and seconds spent reading and parsing.
    max_dataset_records: int = Field(default=1_000_000, gt=0)
    dataset_read_timeout_s: float = Field(default=600.0, gt=0)
    # --- dataset sources -----------------------------------------------------------------------
    # URLs that resolve to loopback or private networks (10/8, 172.16/12, 192.168/16, fc00::/7, …)
    # are refused unless this is set (a dataset server on the same private network, or tests).
    # Link-local and cloud metadata addresses (169.254/16, fe80::/10) are refused regardless.
    allow_private_urls: bool = False
    dataset_download_timeout_s: float = Field(default=900.0, gt=0)
    log_level: str = "INFO"

    @field_validator("trust_remote_code_models", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "models_dir", "model_path", "hf_home", "hf_endpoint", "s3_bucket", "s3_endpoint_url", "aws_region",
        "supabase_url", "default_base_model", "gpu_hourly_usd", "max_train_seconds",
        "presign_seconds", mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty variable in a RunPod template means "not set", not "the empty path".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("volume_root", "models_dir", "model_path", "hf_home", "local_stage_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @model_validator(mode="after")
    def _check_groups(self) -> WorkerSettings:
        s3_given = {
            "S3_BUCKET": self.s3_bucket,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
        }
        if any(s3_given.values()) or self.s3_endpoint_url:
            missing = [name for name, value in s3_given.items() if not value]
            if missing:
                raise HalfConfigured(
                    "S3 is half-configured: set " + ", ".join(missing)
                    + " (or unset every S3 variable to store artifacts on the volume)", group="s3"
                )
        if bool(self.supabase_url) != bool(self.supabase_service_role_key):
            missing = "SUPABASE_SERVICE_ROLE_KEY" if self.supabase_url else "SUPABASE_URL"
            raise HalfConfigured(
                f"Supabase is half-configured: set {missing} "
                "(or unset both to keep records in SQLite on the volume)", group="supabase"
            )
        return self

    # --- derived paths -------------------------------------------------------------------------
    @property
    def models_root(self) -> Path:
        return self.models_dir or self.volume_root / "models"

    @property
    def hf_cache_root(self) -> Path:
        return self.hf_home or self.volume_root / "huggingface-cache"

    @property
    def artifacts_root(self) -> Path:
        return self.volume_root / "artifacts"

    @property
    def checkpoints_root(self) -> Path:
        return self.volume_root / "checkpoints"

    @property
    def jobs_root(self) -> Path:
        """Scratch space per job on the volume: the trained adapter lives here until stored."""
        return self.volume_root / "jobs"

    @property
    def records_path(self) -> Path:
        return self.volume_root / "records.sqlite3"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Folders an absolute path to data (a dataset, an init adapter) in a job may point into."""
        roots = [self.volume_root, self.models_root]
        if self.model_path is not None:
            roots.append(self.model_path)
        return tuple(dict.fromkeys(roots))

    @property
    def model_roots(self) -> tuple[Path, ...]:
        """Folders a base model may come from: the operator's models root, the Hugging Face cache and
        MODEL_PATH. Never the worker's own folders (``worker_owned_roots``), even when inside one of these."""
        roots = [self.models_root, self.hf_cache_root]
        if self.model_path is not None:
            roots.append(self.model_path)
        return tuple(dict.fromkeys(roots))

    @property
    def worker_owned_roots(self) -> dict[str, Path]:
        """The folders the worker writes for jobs (what a job's input can bring onto the volume)."""
        return {"jobs": self.jobs_root, "checkpoints": self.checkpoints_root, "artifacts": self.artifacts_root,
                "staging": self.local_stage_dir}

    def with_s3_config(self, s3_config: object) -> WorkerSettings:
        """These settings with a request's ``s3Config`` (RunPod's per-request bucket) as the artifact
        store. Raises ValueError naming the keys that are wrong, never their values."""
        try:
            request = RequestS3Config.model_validate(s3_config)
        except ValidationError as exc:
            keys = sorted({".".join(str(p) for p in e["loc"]) or "s3Config" for e in exc.errors()})
            raise ValueError(
                "the request's s3Config is missing or has invalid " + ", ".join(keys)
                + "; it needs accessId, accessSecret and bucketName (and endpointUrl for an "
                "S3-compatible store)"
            ) from None
        return self.model_copy(update={
            "s3_bucket": request.bucket_name,
            "s3_endpoint_url": request.endpoint_url,
            "aws_access_key_id": request.access_id,
            "aws_secret_access_key": request.access_secret,
        })

    def secret_values(self) -> list[str]:
        """Every secret this worker holds, for scrubbing text before it leaves the process."""
        secrets = (
            self.hf_token, self.aws_access_key_id, self.aws_secret_access_key,
            self.supabase_service_role_key,
        )
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]


def settings_error_group(exc: ValidationError) -> str | None:
    """The group of variables a ``WorkerSettings`` error is about: "s3", "supabase", or None (any other
    variable). Read from the error itself: a ``HalfConfigured`` raised by the group check, or the
    names of the variables that failed; never from the message text."""
    groups = set()
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, HalfConfigured):
            groups.add(cause.group)
            continue
        name = _field_named(str(err["loc"][0])) if err["loc"] else None
        groups.add("s3" if name in S3_FIELDS else "supabase" if name in SUPABASE_FIELDS else None)
    # Both groups at once: the stage a job reaches first names it (upload comes before record).
    for group in ("s3", "supabase"):
        if group in groups:
            return group
    return None


def _field_named(key: str) -> str | None:
    """The settings field a variable name (the field's own, or one of its aliases) belongs to."""
    key = key.lower()
    for name, field in WorkerSettings.model_fields.items():
        alias = field.validation_alias
        aliases = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []
        if key == name or key in (str(a).lower() for a in aliases):
            return name
    return None


class RequestS3Config(BaseModel):
    """RunPod's ``job["s3Config"]``: a bucket given with the request instead of the environment."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    access_id: SecretStr = Field(alias="accessId", min_length=1)
    access_secret: SecretStr = Field(alias="accessSecret", min_length=1)
    bucket_name: str = Field(alias="bucketName", min_length=3, max_length=255)
    endpoint_url: str | None = Field(default=None, alias="endpointUrl", pattern=r"^https?://")

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
