"""Where and how to connect to NATS, read the way every Krest process reads it (the Rust
`NatsConfig`): ``NATS_URL``, ``NATS_USER``, ``NATS_PASSWORD``, ``NATS_TOKEN``, ``NATS_CREDS``,
``NATS_NKEY``, ``NATS_CERT``, ``NATS_KEY``, ``NATS_CA``, ``NATS_INBOX_PREFIX``. Credentials in
the URL (``nats://user:pass@host``, ``nats://token@host``) work too; explicit settings win."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

from ._text import redact

DEFAULT_URL = "nats://127.0.0.1:4222"


class ConfigError(Exception):
    """Unusable settings (an invalid URL, an unreadable file, conflicting credentials), or a
    login the server refused: fix the configuration."""


def _env(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v else None


def _is_seed(s: str) -> bool:
    s = s.strip()
    return s.startswith("SU") and len(s) == 58 and s.isalnum()


@dataclass(frozen=True)
class NatsConfig:
    """NATS settings. `repr` shows no secret."""

    url: str = DEFAULT_URL
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    #: A credentials file (user JWT and nkey seed, as ``nsc`` writes them).
    creds: str | None = None
    #: An nkey user seed (``SU…``) or a file holding one.
    nkey: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: Prefix of reply subjects; the worker defaults it to ``_INBOX_<app>``.
    inbox_prefix: str | None = None

    @staticmethod
    def from_env(url: str | None = None) -> NatsConfig:
        """The settings in the environment (as the ``nats`` CLI reads them); `url` wins over
        ``NATS_URL``."""
        return NatsConfig(
            url=url or _env("NATS_URL") or DEFAULT_URL,
            user=_env("NATS_USER"),
            password=_env("NATS_PASSWORD"),
            token=_env("NATS_TOKEN"),
            creds=_env("NATS_CREDS"),
            nkey=_env("NATS_NKEY"),
            tls_cert=_env("NATS_CERT"),
            tls_key=_env("NATS_KEY"),
            tls_ca=_env("NATS_CA"),
            inbox_prefix=_env("NATS_INBOX_PREFIX"),
        )

    def with_(self, **changes: Any) -> NatsConfig:
        """A copy with `changes` (fields given as ``None`` are left unchanged)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def shown_url(self) -> str:
        """The URL(s) with credentials hidden."""
        return ",".join(redact(u) for u in (self.url or DEFAULT_URL).split(","))

    def connect_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (files checked). Raises `ConfigError`."""
        servers: list[str] = []
        from_url: dict[str, str] = {}
        for raw in (self.url or DEFAULT_URL).split(","):
            raw = raw.strip()
            if not raw:
                continue
            start = raw.find("://") + 3 if "://" in raw else 0
            end = len(raw)
            for i in range(start, len(raw)):
                if raw[i] in "/?#":
                    end = i
                    break
            at = raw.rfind("@", start, end)
            if at >= 0:
                info = raw[start:at]
                raw = raw[:start] + raw[at + 1 :]
                if not from_url and info:
                    if ":" in info:
                        u, p = info.split(":", 1)
                        from_url = {"user": unquote(u), "password": unquote(p)}
                    else:
                        from_url = {"token": unquote(info)}
            servers.append(raw)
        if not servers:
            raise ConfigError("no NATS URL given (set NATS_URL)")
        explicit = [
            what
            for what, on in [
                ("user/password", self.user is not None or self.password is not None),
                ("token", self.token is not None),
                ("credentials file", self.creds is not None),
                ("nkey", self.nkey is not None),
            ]
            if on
        ]
        if len(explicit) > 1:
            raise ConfigError(
                f"conflicting NATS credentials: {', '.join(explicit)} are set; use one way to log in"
            )
        opts: dict[str, Any] = {"servers": servers, "name": name}
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        elif self.password is not None:
            raise ConfigError("a NATS password is set without a user (set NATS_USER)")
        elif self.token is not None:
            opts["token"] = self.token
        elif self.creds is not None:
            _readable(self.creds, "NATS credentials file (NATS_CREDS)")
            _need_nkeys("a credentials file")
            opts["user_credentials"] = self.creds
        elif self.nkey is not None:
            _need_nkeys("an nkey")
            if _is_seed(self.nkey):
                opts["nkeys_seed_str"] = self.nkey.strip()
            else:
                _readable(self.nkey, "NATS nkey seed file (NATS_NKEY)")
                opts["nkeys_seed"] = self.nkey
        else:
            opts.update(from_url)
        tls = (
            self.tls_cert is not None
            or self.tls_key is not None
            or self.tls_ca is not None
            or any(s.startswith("tls://") for s in servers)
        )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "a TLS client certificate needs its key and the key its certificate "
                "(set both NATS_CERT and NATS_KEY)"
            )
        if tls:
            try:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
                if self.tls_cert is not None and self.tls_key is not None:
                    ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"TLS settings are not usable: {e}") from e
            opts["tls"] = ctx
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from e


def _need_nkeys(what: str) -> None:
    try:
        import nkeys  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"logging in with {what} needs the nkeys package: pip install 'krest-worker[nkeys]'"
        ) from e
