"""PACS node configuration, read from a TOML or YAML file.

One file lists any number of nodes; each has a DIMSE part, a DICOMweb part, or both::

    default = "hospital"            # optional: the node used when none is named

    [nodes.hospital.dimse]
    host = "pacs.example.org"
    port = 104
    called_aet = "PACS"             # the PACS's AE title
    calling_aet = "MEDFUSION"       # ours, as registered on the PACS
    retrieve = "move"               # "get" (C-GET) or "move" (C-MOVE to our storage SCP)
    move_destination = "MEDFUSION"  # AE title the PACS sends C-MOVE results to
    storage_port = 11112            # where our storage SCP listens during a C-MOVE
    timeout = 30                    # seconds

    [nodes.hospital.dicomweb]
    url = "https://pacs.example.org/dicom-web"
    username = "medfusion"
    password_env = "PACS_PASSWORD"  # credentials from the environment, never in the file

Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_RETRIEVE_MODES = ("get", "move")


@dataclass(frozen=True)
class DimseSettings:
    """How to reach a node over DIMSE (classic DICOM networking)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = "MEDFUSION"
    retrieve: str = "get"
    move_destination: str | None = None
    storage_host: str = "0.0.0.0"
    storage_port: int | None = None
    timeout: float = 30.0
    max_pdu: int = 0


@dataclass(frozen=True)
class DicomWebSettings:
    """How to reach a node over DICOMweb (QIDO-RS, WADO-RS, STOW-RS under one base URL)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    verify_tls: bool = True
    ca_bundle: str | None = None


@dataclass(frozen=True)
class PacsNode:
    """A named PACS with at least one way to reach it."""

    name: str
    dimse: DimseSettings | None = None
    dicomweb: DicomWebSettings | None = None


@dataclass(frozen=True)
class PacsConfig:
    """All nodes of a configuration file."""

    nodes: Mapping[str, PacsNode]
    default: str | None = None

    def node(self, name: str | None = None) -> PacsNode:
        """Return the named node, or the default (or only) node when ``name`` is None."""
        if name is None:
            if self.default is not None:
                name = self.default
            elif len(self.nodes) == 1:
                name = next(iter(self.nodes))
            else:
                raise InputError(
                    f"several PACS nodes configured ({', '.join(sorted(self.nodes))}); "
                    "choose one with --node"
                )
        if name not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise InputError(f"no PACS node named {name!r} in the configuration (known: {known})")
        return self.nodes[name]


def load_config(path: str | os.PathLike[str]) -> PacsConfig:
    """Read a ``.toml``, ``.yaml`` or ``.yml`` node configuration file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PACS configuration file not found: {path}")
    text = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text.decode("utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise InputError(f"PACS configuration must be .toml, .yaml or .yml, not {path.name}")
    except InputError:
        raise
    except Exception as error:  # syntax errors from either parser
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"cannot parse PACS configuration {path.name}: {first_line}") from None
    return parse_config(raw, source=path.name)


def parse_config(raw: Any, source: str = "configuration") -> PacsConfig:
    """Validate an already-parsed mapping (same layout as the file) into a :class:`PacsConfig`."""
    if not isinstance(raw, Mapping):
        raise InputError(f"{source}: the top level must be a table/mapping")
    _reject_unknown(raw, {"default", "nodes"}, source)
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, Mapping) or not nodes_raw:
        raise InputError(f"{source}: no [nodes.<name>] entries")
    nodes = {str(name): _parse_node(str(name), body, source) for name, body in nodes_raw.items()}
    default = raw.get("default")
    if default is not None and str(default) not in nodes:
        raise InputError(f"{source}: default node {default!r} is not among the nodes")
    return PacsConfig(nodes=nodes, default=None if default is None else str(default))


def _parse_node(name: str, body: Any, source: str) -> PacsNode:
    where = f"{source}: node {name!r}"
    if not isinstance(body, Mapping):
        raise InputError(f"{where} must be a table/mapping")
    _reject_unknown(body, {"dimse", "dicomweb"}, where)
    if "dimse" not in body and "dicomweb" not in body:
        raise InputError(f"{where} needs a 'dimse' or a 'dicomweb' section")
    dimse = _parse_dimse(body["dimse"], f"{where} dimse") if "dimse" in body else None
    web = _parse_dicomweb(body["dicomweb"], f"{where} dicomweb") if "dicomweb" in body else None
    return PacsNode(name=name, dimse=dimse, dicomweb=web)


def _parse_dimse(body: Any, where: str) -> DimseSettings:
    if not isinstance(body, Mapping):
        raise InputError(f"{where} must be a table/mapping")
    allowed = {
        "host", "port", "called_aet", "calling_aet", "retrieve", "move_destination",
        "storage_host", "storage_port", "timeout", "max_pdu",
    }  # fmt: skip
    _reject_unknown(body, allowed, where)
    for key in ("host", "port", "called_aet"):
        if key not in body:
            raise InputError(f"{where}: missing {key!r}")
    retrieve = str(body.get("retrieve", "get")).lower()
    if retrieve not in _RETRIEVE_MODES:
        raise InputError(f"{where}: retrieve must be 'get' or 'move', not {retrieve!r}")
    storage_port = body.get("storage_port")
    settings = DimseSettings(
        host=_text(body["host"], where, "host"),
        port=_port(body["port"], where, "port"),
        called_aet=_aet(body["called_aet"], where, "called_aet"),
        calling_aet=_aet(body.get("calling_aet", "MEDFUSION"), where, "calling_aet"),
        retrieve=retrieve,
        move_destination=(
            _aet(body["move_destination"], where, "move_destination")
            if body.get("move_destination") is not None
            else None
        ),
        storage_host=_text(body.get("storage_host", "0.0.0.0"), where, "storage_host"),
        storage_port=None if storage_port is None else _port(storage_port, where, "storage_port"),
        timeout=_positive(body.get("timeout", 30.0), where, "timeout"),
        max_pdu=int(_non_negative(body.get("max_pdu", 0), where, "max_pdu")),
    )
    if retrieve == "move" and (settings.move_destination is None or storage_port is None):
        raise InputError(f"{where}: retrieve = 'move' needs move_destination and storage_port")
    return settings


def _parse_dicomweb(body: Any, where: str) -> DicomWebSettings:
    if not isinstance(body, Mapping):
        raise InputError(f"{where} must be a table/mapping")
    allowed = {
        "url", "username", "username_env", "password", "password_env", "token", "token_env",
        "timeout", "verify_tls", "ca_bundle",
    }  # fmt: skip
    _reject_unknown(body, allowed, where)
    if "url" not in body:
        raise InputError(f"{where}: missing 'url'")
    url = _text(body["url"], where, "url").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"{where}: url must start with http:// or https://")
    username = _secret(body, "username", where)
    password = _secret(body, "password", where)
    token = _secret(body, "token", where)
    if password is not None and username is None:
        raise InputError(f"{where}: a password needs a username")
    if token is not None and username is not None:
        raise InputError(f"{where}: give either username/password or token, not both")
    ca_bundle = body.get("ca_bundle")
    if ca_bundle is not None and not Path(_text(ca_bundle, where, "ca_bundle")).exists():
        # requests would only say "TLS certificate check failed" at the first request
        raise InputError(f"{where}: ca_bundle not found: {ca_bundle}")
    return DicomWebSettings(
        url=url,
        username=username,
        password=password,
        token=token,
        timeout=_positive(body.get("timeout", 30.0), where, "timeout"),
        verify_tls=_flag(body.get("verify_tls", True), where, "verify_tls"),
        ca_bundle=None if ca_bundle is None else _text(ca_bundle, where, "ca_bundle"),
    )


def _secret(body: Mapping[str, Any], key: str, where: str) -> str | None:
    """A credential given literally (``key``) or by environment variable name (``key_env``)."""
    env_key = f"{key}_env"
    if key in body and env_key in body:
        raise InputError(f"{where}: give {key!r} or {env_key!r}, not both")
    if env_key in body:
        variable = _text(body[env_key], where, env_key)
        value = os.environ.get(variable)
        if value is None:
            raise InputError(f"{where}: environment variable {variable} ({key}) is not set")
        return value
    if key in body:
        return _text(body[key], where, key)
    return None


def _reject_unknown(body: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in body if key not in allowed)
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _aet(value: Any, where: str, key: str) -> str:
    text = _text(value, where, key)
    if len(text) > 16 or "\\" in text or not text.isascii() or not text.isprintable():
        raise InputError(f"{where}: {key} must be 1-16 printable ASCII characters, no backslash")
    return text


def _flag(value: Any, where: str, key: str) -> bool:
    """A true/false setting; text such as "false" is refused (``bool("false")`` is True)."""
    if not isinstance(value, bool):
        raise InputError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _port(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InputError(f"{where}: {key} must be an integer port number 1-65535")
    return value


def _positive(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"{where}: {key} must be a positive number")
    return float(value)


def _non_negative(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InputError(f"{where}: {key} must be a number >= 0")
    return float(value)
