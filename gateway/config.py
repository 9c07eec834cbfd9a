"""A gateway's configuration: one dataclass per concern, loadable from TOML.

An edge server runs ``tierfl gateway serve --config gw.toml``; the file looks like::

    id = "gw00"
    registry = "keys/registry.toml"     # or a directory of <device>.pub files
    metrics_port = 9108                 # omit (or 0) for no Prometheus endpoint
    metrics_host = "127.0.0.1"

    [coap]
    enabled = true
    host = "::"                         # "127.0.0.1", "0.0.0.0", "::" ...
    port = 5683
    max_partial_uploads = 256           # concurrent unfinished block-wise uploads
    upload_timeout_s = 30.0             # an unfinished upload is dropped after this
    exchange_lifetime_s = 10.0          # how long aiocoap remembers finished exchanges

    [mqtt]
    enabled = true
    broker = "mqtts://broker.example:8883"
    username = "gw00"
    password = "..."
    tls_ca = "ca.pem"
    tls_cert = "gw00.crt"
    tls_key = "gw00.key"

    [limits]
    max_update_bytes = 60000            # default: what an f32 update of the model needs
    norm_bound = 10.0                   # default: no bound
    rate_limit_updates = 20             # per device per window; 0 turns it off
    rate_limit_window_s = 60.0
    max_skew_s = 120.0
    replay_capacity = 100000
    codecs = ["f32", "int8"]            # default: every registered codec

Why strict: a typo in a key (``rate_limt_updates``) silently leaving a limit
at its default is a security bug on an edge box, so unknown keys are errors,
and every error names the file and the dotted key.

Paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devices.codecs import CODECS
from devices.keys import check_device_id
from gateway.validation import RateLimit, ValidationConfig

__all__ = [
    "CoapListener",
    "ConfigError",
    "GatewayConfig",
    "Limits",
    "MqttListener",
    "build_section",
    "gateway_config_from_dict",
    "load_gateway_config",
]


class ConfigError(ValueError):
    """A configuration file or value that is wrong; the message names the key."""


def _port(value: int, where: str, *, allow_zero: bool = True) -> None:
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise ConfigError(f"{where}: port must be in [{lo}, 65535], got {value}")


def _positive(value: float, where: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}: must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class CoapListener:
    """The CoAP (UDP) listener; the block-wise upload bounds keep memory bounded under load."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 5683  # 0 = any free port (tests)
    max_partial_uploads: int = 256
    upload_timeout_s: float = 30.0
    exchange_lifetime_s: float = 10.0

    def __post_init__(self) -> None:
        _port(self.port, "coap.port")
        if self.max_partial_uploads < 1:
            raise ConfigError(
                f"coap.max_partial_uploads: must be >= 1, got {self.max_partial_uploads}"
            )
        _positive(self.upload_timeout_s, "coap.upload_timeout_s")
        _positive(self.exchange_lifetime_s, "coap.exchange_lifetime_s")


@dataclass(frozen=True)
class MqttListener:
    """The MQTT intake: where the broker is and how the gateway authenticates to it."""

    enabled: bool = False
    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port or mqtts://host:port (TLS)
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_id: str | None = None
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        url = urlsplit(self.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ConfigError(
                f"mqtt.broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], "
                f"got {self.broker!r}"
            )
        try:
            port = url.port
        except ValueError as e:
            raise ConfigError(f"mqtt.broker: {e}") from None
        if port is not None:
            _port(port, "mqtt.broker", allow_zero=False)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mqtt.tls_cert and mqtt.tls_key must be given together")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt.password needs mqtt.username")
        if self.keepalive_s < 1:
            raise ConfigError(f"mqtt.keepalive_s: must be >= 1, got {self.keepalive_s}")

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts" or self.tls_ca is not None


@dataclass(frozen=True)
class Limits:
    """What an acceptable update is (mapped onto :class:`gateway.validation.ValidationConfig`)."""

    max_update_bytes: int | None = None  # None: 4 bytes per parameter + envelope framing
    norm_bound: float | None = None
    rate_limit_updates: int = 20  # 0 = no rate limit
    rate_limit_window_s: float = 60.0
    max_skew_s: float = 120.0
    replay_capacity: int = 100_000
    codecs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_update_bytes is not None and self.max_update_bytes < 1:
            raise ConfigError(f"limits.max_update_bytes: must be >= 1, got {self.max_update_bytes}")
        if self.norm_bound is not None:
            _positive(self.norm_bound, "limits.norm_bound")
        if self.rate_limit_updates < 0:
            raise ConfigError(
                f"limits.rate_limit_updates: must be >= 0 (0 = off), got {self.rate_limit_updates}"
            )
        _positive(self.rate_limit_window_s, "limits.rate_limit_window_s")
        _positive(self.max_skew_s, "limits.max_skew_s")
        if self.replay_capacity < 1:
            raise ConfigError(f"limits.replay_capacity: must be >= 1, got {self.replay_capacity}")
        if self.codecs is not None:
            unknown = sorted(set(self.codecs) - set(CODECS))
            if unknown or not self.codecs:
                raise ConfigError(
                    f"limits.codecs: unknown {unknown or 'none'}, expected a non-empty subset "
                    f"of {', '.join(CODECS)}"
                )

    def validation_config(self) -> ValidationConfig:
        """The validator's view of these limits."""
        return ValidationConfig(
            norm_bound=self.norm_bound,
            rate_limit=(
                RateLimit(self.rate_limit_updates, self.rate_limit_window_s)
                if self.rate_limit_updates
                else None
            ),
            max_skew_s=self.max_skew_s,
            replay_capacity=self.replay_capacity,
            max_bytes=self.max_update_bytes,
            codecs=frozenset(self.codecs) if self.codecs is not None else None,
        )


@dataclass(frozen=True)
class GatewayConfig:
    """Everything one gateway process needs: identity, listeners, registry, limits, metrics."""

    id: str = "gw0"
    coap: CoapListener = field(default_factory=CoapListener)
    mqtt: MqttListener = field(default_factory=MqttListener)
    registry: Path | None = None  # directory of .pub files or a TOML/JSON registry file
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None  # None: no Prometheus HTTP endpoint
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        try:
            check_device_id(self.id)  # gateway ids go into topics and metric labels alike
        except ValueError as e:
            raise ConfigError(f"id: {e}") from None
        if self.metrics_port is not None:
            _port(self.metrics_port, "metrics_port")

    def validation_config(self) -> ValidationConfig:
        return self.limits.validation_config()


# --- loading ------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {"coap": CoapListener, "mqtt": MqttListener, "limits": Limits}


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _convert(value: Any, annotation: str, key: str, base: Path | None) -> Any:
    """Check one TOML value against the dataclass field's annotation (a string: PEP 563)."""
    optional = annotation.endswith("| None")
    core = annotation.removesuffix("| None").strip()
    if core == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if core == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if optional and key == "metrics_port" and value == 0:
            return None
        return value
    if core == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if core == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if core == "Path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base is None else base / p
    if core == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected an array of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(f"{key}: unsupported annotation {annotation}")  # a bug here, not input


def build_section(cls: type, doc: dict[str, Any], prefix: str, base: Path | None) -> Any:
    """One config dataclass from its TOML table: unknown keys and bad types name the key.

    Shared with ``gateway.rounds`` (its ``[rounds]`` table is parsed the same way).
    """
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in doc.items():
        key = f"{prefix}{name}"
        if name in _SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{name}]")
            kwargs[name] = build_section(_SECTIONS[name], value, f"{name}.", base)
            continue
        f = known.get(name)
        if f is None or name in _SECTIONS:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[name] = _convert(value, str(f.type), key, base)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def gateway_config_from_dict(doc: dict[str, Any], base: Path | None = None) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from a parsed TOML document (relative paths against base)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"expected a table, got {_type_name(type(doc))}")
    cfg = build_section(GatewayConfig, doc, "", base)
    assert isinstance(cfg, GatewayConfig)
    return cfg


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read a gateway TOML file; :class:`ConfigError` messages start with the file name."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        return gateway_config_from_dict(doc, p.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
