"""The secrets a node uses: the admin token, the peer token and the SDK-key secret.

Each comes from its flag or variable (`--admin-token`), or from a file (`--admin-token-file`: a
Kubernetes Secret volume; the value stays out of `ps` and of the process's environment); the
admin token and, with the SQLite store, the SDK-key secret are otherwise generated once into the
data dir (0600) and read from there at every start. A generated secret is never printed.
Every file is checked as relay.private_files says (owner, not writable by others).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from relay import redact
from relay.config import MIN_SDK_KEY_SECRET, Config
from relay.private_files import (
    SecretFileError,
    create_secret_file,
    make_private_dir,
    read_secret_file,
)

ADMIN_TOKEN_FILE = "admin-token"
SDK_KEY_SECRET_FILE = "sdk-key-secret"


@dataclass(frozen=True)
class GivenSecrets:
    """What the configuration gives, by value or by file ("" where nothing is given)."""

    admin_token: str
    peer_token: str
    sdk_key_secret: str


def _given(config: Config, name: str, what: str) -> str:
    path: str = getattr(config, name + "_file")
    if not path:
        return str(getattr(config, name))
    return read_secret_file(path, f"--{name.replace('_', '-')}-file: the {what} file")


def given_secrets(config: Config) -> GivenSecrets:
    """Read and check the secret files the configuration names. Raises SecretFileError."""
    given = GivenSecrets(
        admin_token=_given(config, "admin_token", "admin token"),
        peer_token=_given(config, "peer_token", "peer token"),
        sdk_key_secret=_given(config, "sdk_key_secret", "SDK-key secret"),
    )
    if config.sdk_key_secret_file and len(given.sdk_key_secret) < MIN_SDK_KEY_SECRET:
        raise SecretFileError(f"the SDK-key secret in {config.sdk_key_secret_file} must be at "
                              f"least {MIN_SDK_KEY_SECRET} characters")
    redact.register(given.admin_token, given.peer_token, given.sdk_key_secret)
    return given


def load_or_create(data_dir: Path, name: str, what: str, make: str) -> tuple[str, bool]:
    """The secret kept in `data_dir/name`, or `make` written there (0600, in a data dir
    created 0700) on first start; True if it was created now."""
    path = data_dir / name
    if not path.exists():
        make_private_dir(data_dir)
        if create_secret_file(path, make):
            redact.register(make)
            return make, True
    value = read_secret_file(path, f"the {what} file")
    redact.register(value)
    return value, False


def new_admin_token() -> str:
    """32 URL-safe characters that never start with '-': a token given on a command line
    (`--admin-token -x...`) would be read as an option (one in 64 did)."""
    while True:
        token = secrets.token_urlsafe(24)
        if not token.startswith("-"):
            return token


def load_or_create_admin_token(data_dir: Path) -> tuple[str, bool]:
    return load_or_create(data_dir, ADMIN_TOKEN_FILE, "admin token", new_admin_token())


def load_or_create_sdk_key_secret(data_dir: Path) -> str:
    value, _ = load_or_create(data_dir, SDK_KEY_SECRET_FILE, "SDK-key secret",
                              secrets.token_bytes(32).hex())
    if len(value) < MIN_SDK_KEY_SECRET:
        raise SecretFileError(f"the SDK-key secret in {data_dir / SDK_KEY_SECRET_FILE} must be "
                              f"at least {MIN_SDK_KEY_SECRET} characters")
    return value
