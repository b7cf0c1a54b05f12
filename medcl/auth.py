"""API keys: who may call the service, and for what.

Keys come from the environment variable ``MEDCL_API_KEYS`` and/or a YAML file (``MEDCL_API_KEYS_FILE``).
Only SHA-256 digests are kept in memory; a presented key is hashed and compared with every stored
digest in constant time, so neither the comparison nor the loop leaks which key (or how much of one)
matched. The file is re-read when it changes (checked at most once a second), so keys can be added
or revoked without a restart; a file that stops parsing keeps the last good keys and logs why.

Scopes: ``read`` (classify, embed, segment, search, read cases and models), ``write`` (add and delete
cases), ``admin`` (reload and promote models). ``admin`` implies the others, ``write`` implies ``read``.

    MEDCL_API_KEYS="k1,k2:read"            # k1: every scope, k2: read only
    # api-keys.yaml
    keys:
      - {name: qupath-viewer, sha256: 5e88...,  scopes: [read]}
      - {name: pipeline,      key: "medcl_...", scopes: [read, write]}
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medcl.errors import MedclError

log = logging.getLogger("medcl.auth")

Scope = Literal["read", "write", "admin"]
IMPLIED: dict[str, set[str]] = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}
ALL_SCOPES: tuple[Scope, ...] = ("read", "write", "admin")


class AuthConfigError(MedclError, ValueError):
    """The key configuration cannot be used; the message says where."""


def auth_disabled() -> bool:
    """``MEDCL_AUTH=off`` opens every endpoint: for a closed network or a laptop, never the default."""
    return os.environ.get("MEDCL_AUTH", "on").strip().lower() in ("off", "0", "false", "no")


def default_key_file() -> Path:
    return Path(os.environ.get("MEDCL_HOME", ".medcl")) / "api-keys.yaml"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits); the prefix makes leaked keys easy to find with secret scanners."""
    return "medcl_" + secrets.token_urlsafe(32)


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    key: str | None = Field(default=None, min_length=16)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> "KeyEntry":
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' or 'sha256'")
        return self

    def hashed(self) -> str:
        return self.sha256 or digest(self.key or "")


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


class Principal(BaseModel):
    """The caller a key identifies; its name (never the key) goes into logs."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def parse_env(value: str) -> list[KeyEntry]:
    entries = []
    for i, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        key, _, scopes = item.partition(":")
        chosen = [s for s in scopes.replace("+", " ").replace(";", " ").split()] or list(ALL_SCOPES)
        try:
            entries.append(KeyEntry(name=f"env-{i}", key=key, scopes=chosen))
        except ValidationError as e:
            raise AuthConfigError(f"MEDCL_API_KEYS entry {i}: {e.errors()[0]['msg']} "
                                  "(format: KEY or KEY:read+write, keys at least 16 characters)") from None
    return entries


def read_key_file(path: Path, allow_empty: bool = False) -> list[KeyEntry]:
    """The keys of a key file. An empty file is an error like a broken one (it is what a half-written or
    truncated file looks like); revoking every key is written explicitly as ``keys: []``."""
    try:
        raw = yaml.safe_load(path.read_text())
        if raw is None:
            if allow_empty:
                return []
            raise AuthConfigError(f"API key file {path} is empty (to revoke every key, write 'keys: []')")
        return KeyFile.model_validate(raw).keys
    except (OSError, yaml.YAMLError) as e:
        raise AuthConfigError(f"cannot read API key file {path}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise AuthConfigError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _write_key_file(path: Path, entries: list[KeyEntry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(KeyFile(keys=entries).model_dump(exclude_none=True), f, sort_keys=False)
    os.replace(tmp, path)  # a reloading service sees the old file or the new one, never half of it


def add_key_to_file(path: Path, name: str, scopes: list[str]) -> str:
    """Append a new key's digest to ``path`` (created 0600 if missing) and return the key: shown once."""
    entries = read_key_file(path, allow_empty=True) if path.exists() else []
    if any(e.name == name for e in entries):
        raise AuthConfigError(f"{path} already has a key named {name!r}")
    key = new_key()
    try:
        entries.append(KeyEntry(name=name, sha256=digest(key), scopes=scopes))
    except ValidationError as e:
        raise AuthConfigError(f"key {name!r}: {e.errors()[0]['msg']} (scopes: read, write, admin)") from None
    _write_key_file(path, entries)
    return key


def revoke_key_in_file(path: Path, name: str) -> None:
    entries = read_key_file(path) if path.exists() else []
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise AuthConfigError(f"{path} has no key named {name!r}")
    _write_key_file(path, kept)


class KeyStore:
    """The keys in force. ``authenticate`` is safe to call from many threads."""

    RECHECK_SECONDS = 1.0

    def __init__(self, env_value: str | None = None, file: str | os.PathLike[str] | None = None) -> None:
        self.file = Path(file) if file else None
        self._env = parse_env(env_value or "")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._table: list[tuple[bytes, Principal]] = []
        file_entries = self._read_file(strict=True)
        self._set(file_entries or [])

    @classmethod
    def from_environment(cls) -> "KeyStore":
        return cls(os.environ.get("MEDCL_API_KEYS"), os.environ.get("MEDCL_API_KEYS_FILE"))

    def _read_file(self, strict: bool) -> list[KeyEntry] | None:
        if self.file is None:
            return []
        try:
            st = self.file.stat()
            self._stamp = (st.st_mtime_ns, st.st_size)
            return read_key_file(self.file)
        except FileNotFoundError:
            if strict:
                raise AuthConfigError(f"API key file {self.file} does not exist") from None
            log.error("API key file %s disappeared; keeping the last keys read", self.file)
        except AuthConfigError as e:
            if strict:
                raise
            log.error("%s; keeping the last keys read", e)
        return None

    def _set(self, file_entries: list[KeyEntry]) -> None:
        table = []
        for entry in [*self._env, *file_entries]:
            scopes = frozenset().union(*(IMPLIED[s] for s in entry.scopes))
            table.append((bytes.fromhex(entry.hashed()), Principal(name=entry.name, scopes=scopes)))
        self._table = table

    def _maybe_reload(self) -> None:
        if self.file is None or time.monotonic() - self._checked < self.RECHECK_SECONDS:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                st = self.file.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp:
                return
            entries = self._read_file(strict=False)
            if entries is not None:
                self._set(entries)
                log.info("API keys reloaded from %s: %d keys", self.file, len(self._table))

    @property
    def configured(self) -> bool:
        return bool(self._table)

    def authenticate(self, presented: str) -> Principal | None:
        self._maybe_reload()
        candidate = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for stored, principal in self._table:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(stored, candidate):
                found = principal
        return found
