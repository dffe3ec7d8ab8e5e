"""All configuration, read once from `REMINDERS_*` environment variables or a `.env` file.

This is the only module that reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from scheduler.errors import ConfigError

# A replica sends at most concurrency / (one send's round trip) per second: 256 keeps about
# 5,000 sends/s at 50 ms to WeChat, and after a kill -9 at most this many sends are `unknown`.
# A slot is held for the send's round trip plus its flight-record round trip, so at 128 even
# loopback was latency-bound (bench/fanout.py: 2,980-3,740 sends/s against 3,700-4,640 at 256).
SEND_CONCURRENCY = 256

Scope = Literal["ingest", "admin", "metrics"]
PushMode = Literal["plaintext", "compatible", "safe"]


class ApiToken(BaseModel):
    token: SecretStr
    scopes: list[Scope]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REMINDERS_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "REMINDERS_DATABASE_URL"),
        description="PostgreSQL 14+ URL; unset starts an embedded PostgreSQL under data_dir.",
    )
    data_dir: Path = Field(Path(".reminders"), description="Embedded PostgreSQL and local state.")
    plans_dir: Path = Field(Path("plans"), description="Folder of plan files (*.yaml, *.yml).")

    wechat_api_base: str = Field(
        "https://api.weixin.qq.com", description="Base URL of the WeChat server API."
    )
    wechat_appid: str | None = Field(None, description="Mini program appid.")
    wechat_secret: str | None = Field(None, description="Mini program AppSecret.")
    wechat_timeout: float = Field(10.0, description="Seconds before a WeChat call times out.")
    wechat_retries: int = Field(
        3,
        description="Attempts for a send that provably did not go (-1, 43108, 429, no connection).",
    )
    miniprogram_state: str = Field("formal", description="developer, trial or formal.")
    lang: str = Field("zh_CN", description="Language of the card's link text.")
    fake_wechat_port: int = Field(
        0, description="Port of the fake WeChat the daemon starts without credentials (0: any)."
    )

    send_concurrency: int = Field(
        SEND_CONCURRENCY, ge=1, description="Sends in flight at once per replica."
    )
    send_rate: float = Field(
        0,
        ge=0,
        description="Sends per second for the WeChat app, all replicas together (0: no limit).",
    )
    quota_check_seconds: float = Field(
        60.0, gt=0, description="How often a replica reads what is left of WeChat's send quota."
    )
    quota_reserve_low: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of the daily quota low-priority plans leave for the others.",
    )
    quota_reserve_normal: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the daily quota normal-priority plans leave for high-priority ones.",
    )
    batch_size: int = Field(500, description="Users claimed per database round trip.")
    ledger_retention_months: int = Field(
        13,
        ge=2,
        description="Months of ledger rows kept; older months are dropped whole once nothing"
        " needs them (docs/operations.md, Ledger lifecycle).",
    )
    ledger_export_dir: Path | None = Field(
        None, description="Folder the daemon's daily prune writes each month to before dropping it."
    )
    chunk_size: int = Field(
        1000, ge=1, description="Users per chunk of an occurrence: the unit replicas share."
    )
    fanout_workers: int = Field(
        2, ge=1, description="Chunks one replica works on at once (they share its concurrency)."
    )
    lease_seconds: float = Field(
        20.0,
        gt=0,
        description="A replica silent this long is given up: its chunks and claimed rows are "
        "taken over by the others (its sends in flight become 'unknown').",
    )
    work_poll_seconds: float = Field(
        1.0, gt=0, description="How often a replica looks for occurrence work to share."
    )
    drain_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long sends in flight may take to finish."
    )
    sweep_seconds: float = Field(
        30.0, description="How often relative (per-enrolment) plans look for due steps."
    )
    replica_id: str | None = Field(
        None,
        description="Stable identity of this replica (default: the host name); give each "
        "replica on one host its own.",
    )
    api_host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    api_port: int | None = Field(
        8080, description="Port of the HTTP API (unset or empty: no API server)."
    )
    api_tokens: dict[str, ApiToken] = Field(
        default_factory=dict,
        description='API tokens by name, as JSON: {"crm": {"token": "...", "scopes": ["ingest"]}}.',
    )
    api_public: list[Literal["metrics", "docs"]] = Field(
        default_factory=lambda: list[Literal["metrics", "docs"]](["metrics", "docs"]),
        description='What the API serves without a token, as JSON: "metrics" (/metrics), "docs"'
        " (/v1/docs, /v1/openapi.json). Left out, /metrics needs a metrics- or admin-scoped"
        " token, and the OpenAPI document any valid token (the docs page is then off).",
    )
    max_body_bytes: int = Field(1_048_576, description="Largest request body the API accepts.")
    wechat_callback_token: SecretStr | None = Field(
        None, description="The Token of the message-push settings (signs WeChat's callbacks)."
    )
    wechat_encoding_aes_key: SecretStr | None = Field(
        None, description="The EncodingAESKey of the message-push settings (safe mode)."
    )
    wechat_push_mode: PushMode | None = Field(
        None,
        description="The encryption mode of the message-push settings: plaintext, compatible or "
        "safe (only encrypted pushes with a valid msg_signature). Default: safe when an "
        "EncodingAESKey is set, else plaintext.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(
        False, description="Log one JSON object a line (with plan_id, user, outcome...)."
    )
    watch_debounce_ms: int = Field(
        300, description="Quiet time after a change in the plans folder before it is rescanned."
    )
    watch_force_polling: bool = Field(
        False, description="Poll the plans folder instead of inotify (network file systems)."
    )

    @property
    def push_mode(self) -> PushMode:
        if self.wechat_push_mode is not None:
            return self.wechat_push_mode
        return "safe" if self.wechat_encoding_aes_key is not None else "plaintext"

    @model_validator(mode="after")
    def _push_mode_has_its_key(self) -> Settings:
        if self.wechat_push_mode in ("compatible", "safe") and not self.wechat_encoding_aes_key:
            raise ValueError(
                f"REMINDERS_WECHAT_PUSH_MODE={self.wechat_push_mode} needs "
                "REMINDERS_WECHAT_ENCODING_AES_KEY (the EncodingAESKey of the push settings)"
            )
        return self


def variable_of(field: str) -> str:
    """The environment variable a setting is read from."""
    return "DATABASE_URL" if field == "database_url" else f"REMINDERS_{field.upper()}"


def load_settings() -> Settings:
    """The settings from the environment; a bad value raises ConfigError with one line per
    problem, naming the variable (never a traceback)."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings: its message names the variables
                lines.append(str(error.get("ctx", {}).get("error", error["msg"])))
                continue
            field, *inner = (str(part) for part in error["loc"])
            where = f" ({'.'.join(inner)})" if inner else ""
            lines.append(f"{variable_of(field)}{where}: {error['msg']}")
        raise ConfigError("\n".join(lines)) from None
    except SettingsError as exc:  # a JSON setting that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        name = variable_of(match.group(1)) if match else "a REMINDERS_ setting"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(f"{name}: not valid JSON{cause}") from None
