"""How the operator reaches its Prometheus beyond the URL: a bearer token or basic auth, read
from files (a ServiceAccount token, a mounted Secret) and read again when they change, extra
headers (a tenant for Mimir, Cortex or Thanos), a CA bundle, a client certificate for mutual
TLS, or no certificate check at all.

The settings belong to one origin (scheme, host and port): the one Prometheus the platform team
configured. A ModelDeployment may name a Prometheus of its own; one on another origin gets none
of them, so the operator's credentials never go to a URL a user wrote."""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from prometheus_api_client import PrometheusConnect
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.exceptions import InsecureRequestWarning
from urllib3.util import parse_url
from urllib3.util.retry import Retry


class CredentialsUnreadable(requests.RequestException):
    """A credential file could not be read (not mounted, empty, no permission) or holds what a
    header cannot carry: the query is not sent, and the source reads as unavailable with this
    message (which never holds the credential)."""


class ForeignOrigin(requests.RequestException):
    """A request with the configured settings was about to leave the configured Prometheus'
    origin (a redirect to another host): it is not sent."""


@dataclass(frozen=True)
class Connection:
    """What a request to the configured Prometheus carries besides the query. Paths are files
    in the operator's pod; an empty one means "not set"."""

    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token_file: str = ""
    basic_auth_username: str = ""
    basic_auth_password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False

    def __post_init__(self) -> None:
        if self.bearer_token_file and self.basic_auth_username:
            raise ValueError("a bearer token and basic auth exclude each other")
        if bool(self.basic_auth_username) != bool(self.basic_auth_password_file):
            raise ValueError("basic auth needs both a username and a password file")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both its certificate and key files")
        if self.ca_file and self.insecure_skip_verify:
            raise ValueError("a CA file and insecure_skip_verify exclude each other")
        if (self.bearer_token_file or self.basic_auth_username) and any(
            name.lower() == "authorization" for name in self.headers
        ):
            raise ValueError("an Authorization header and a bearer token or basic auth exclude "
                             "each other")  # fmt: skip


    def describe(self) -> str:
        """What requests carry, for the start-up log: names and paths, never a secret.

        >>> Connection(bearer_token_file="/t", headers={"X-Scope-OrgID": "a"}).describe()
        'bearer token from /t, headers X-Scope-OrgID'
        >>> Connection().describe()
        'no credentials'
        """
        parts = []
        if self.bearer_token_file:
            parts.append(f"bearer token from {self.bearer_token_file}")
        if self.basic_auth_username:
            parts.append(f"basic auth as {self.basic_auth_username} (password from "
                         f"{self.basic_auth_password_file})")  # fmt: skip
        if self.headers:
            parts.append(f"headers {', '.join(sorted(self.headers))}")
        if self.ca_file:
            parts.append(f"certificate checked against {self.ca_file}")
        if self.cert_file:
            parts.append(f"client certificate {self.cert_file}")
        if self.insecure_skip_verify:
            parts.append("certificate NOT checked (insecure_skip_verify)")
        return ", ".join(parts) or "no credentials"


NO_SETTINGS = Connection()


Origin = tuple[str, str, int]
_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> Origin | None:
    r"""(scheme, host, port) of `url`, the port filled in for http and https; None for a URL
    without one, with user info, or that Python's parser and urllib3's (which requests
    connects with) read differently: such a URL is no known origin.

    >>> origin("http://prometheus.monitoring:9090/") == origin("http://PROMETHEUS.monitoring:9090")
    True
    >>> origin("https://thanos.example/api/prom")
    ('https', 'thanos.example', 443)
    >>> origin("http://prometheus:9090") == origin("http://prometheus.evil:9090")
    False
    >>> origin("http://evil.example\\@prometheus:9090"), origin("http://u:p@prometheus:9090")
    (None, None)
    >>> origin("http://prometheus:http"), origin("prometheus:9090")
    (None, None)
    >>> origin("http://[fd00::1]:9090/")
    ('http', 'fd00::1', 9090)
    """
    try:
        ours = urlsplit(url)
        theirs = parse_url(url)
        ours_port = ours.port
    except ValueError:  # urllib3's LocationParseError is one too
        return None
    scheme = ours.scheme.lower()
    if scheme not in _PORTS or ours.username is not None or theirs.auth is not None:
        return None
    found = (scheme, (ours.hostname or "").lower(), ours_port or _PORTS[scheme])
    seen = ((theirs.scheme or "").lower(), (theirs.host or "").lower().strip("[]"),
            theirs.port or _PORTS[scheme])  # fmt: skip
    return found if found == seen and found[1] else None


def settings_for(url: str, configured_url: str, connection: Connection) -> Connection:
    r"""The settings a request to `url` carries: `connection` on the origin of the configured
    Prometheus, none elsewhere.

    >>> token = Connection(bearer_token_file="/var/run/token")
    >>> settings_for("http://prom:9090/prometheus", "http://prom:9090", token) is token
    True
    >>> settings_for("http://team-prom:9090", "http://prom:9090", token) is NO_SETTINGS
    True
    >>> settings_for("http://team-prom\\@prom:9090", "http://prom:9090", token) is NO_SETTINGS
    True
    """
    here = origin(url)
    return connection if here is not None and here == origin(configured_url) else NO_SETTINGS


class OriginBoundSession(requests.Session):
    """A session whose every request (redirects included) must go to one origin: the
    configured settings (headers, credentials, the client certificate) never leave it."""

    def __init__(self, bound: Origin | None) -> None:
        super().__init__()
        self.bound = bound

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        target = origin(request.url or "")
        if target != self.bound:
            where = f"{target[1]}:{target[2]}" if target else "a URL of no clear origin"
            raise ForeignOrigin(
                f"a request to {where} is not sent: it would carry the settings of the "
                "configured Prometheus elsewhere (a redirect to another host?)"
            )
        return super().send(request, **kwargs)


class FileSecret:
    """A secret kept in a file and read again whenever the file changes: a projected
    ServiceAccount token the kubelet rotates, a Secret volume it updates (it swaps a symlink, so
    the file's identity changes). Safe to read from several worker threads."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def read(self, allowed: re.Pattern[str] | None = None) -> str:
        """The secret, which must match `allowed` whole when given (else CredentialsUnreadable,
        whose message never holds the secret)."""
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as f:
                        self._value = f.read().strip()
                    self._stamp = stamp
            except (OSError, UnicodeDecodeError) as err:
                self._stamp = None
                reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
                raise CredentialsUnreadable(
                    f"cannot read the {self.what} file {self.path}: {reason}"
                ) from None
            if not self._value:
                raise CredentialsUnreadable(f"the {self.what} file {self.path} is empty")
            if allowed is not None and not allowed.fullmatch(self._value):
                raise CredentialsUnreadable(
                    f"the {self.what} file {self.path} holds characters a header cannot carry "
                    "(a space or a line break inside it?)"
                )
            return self._value


# A bearer token is visible ASCII (RFC 6750's b64token, and what a JWT or a random token is).
_TOKEN = re.compile(r"[\x21-\x7e]+")


class BearerToken(AuthBase):
    """`Authorization: Bearer <token>`, the token read from its file at each request."""

    def __init__(self, path: str) -> None:
        self.token = FileSecret(path, "bearer token")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token.read(_TOKEN)}"
        return request


class BasicAuthFromFile(AuthBase):
    """HTTP basic auth, the password read from its file at each request."""

    def __init__(self, username: str, password_file: str) -> None:
        self.username = username
        self.password = FileSecret(password_file, "basic auth password")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        auth = HTTPBasicAuth(self.username, self.password.read())
        result: requests.PreparedRequest = auth(request)
        return result


def connect(
    url: str, connection: Connection, timeout_s: float, retry: Retry | None = None
) -> PrometheusConnect:
    """A prometheus-api-client for `url` whose every request carries `connection`; with
    settings, its requests cannot leave `url`'s origin."""
    session = requests.Session() if connection == NO_SETTINGS else OriginBoundSession(origin(url))
    session.verify = connection.ca_file or not connection.insecure_skip_verify
    if connection.insecure_skip_verify:
        # Asked for in the settings and said once at start-up (`describe`), not at every query.
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)
    if connection.cert_file:
        session.cert = (connection.cert_file, connection.key_file)
    auth: AuthBase | None = None
    if connection.bearer_token_file:
        auth = BearerToken(connection.bearer_token_file)
    elif connection.basic_auth_username:
        auth = BasicAuthFromFile(
            connection.basic_auth_username, connection.basic_auth_password_file
        )
    return PrometheusConnect(
        url=url,
        headers=dict(connection.headers) or None,
        retry=retry,
        auth=auth,
        session=session,
        timeout=timeout_s,
    )
