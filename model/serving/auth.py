"""Who is calling, and what they may do.

A credential carries permissions: ``classify`` (``/classify`` and the read-only routes),
``feedback`` (``POST /feedback``: corrections) and ``review`` (feedback rows with ``source:
review``, the unbiased ones the live-accuracy alert trusts). The caller of a request is a
``Principal``: an id that names the credential (never the secret) and its permissions.

- API keys come from ``API_KEY`` or the file ``API_KEY_FILE`` names, one per line:
  ``SECRET [id=NAME] [permissions=classify,feedback,review]``. A key without ``permissions=`` (the
  format before permissions existed) gets ``classify`` and ``feedback``, and the service warns at
  start. The file is re-read when it changes (Kubernetes rotates mounted Secrets in place).
- A JWT (HS256, ``JWT_SECRET``) carries its permissions in the standard ``scope`` claim, separated by
  spaces; without the claim it gets ``classify`` and ``feedback``. Its id is ``jwt:<sub>``.
- In development and test without any credential configured, the API is open: every caller is
  ``anonymous`` with every permission.
- A request over a Unix socket comes from another service of the same bento (BentoML connects the
  services of one pod through sockets in a private folder): it is ``internal``, with ``classify``
  and ``feedback``.

A key file that cannot be read or parsed authenticates nobody: requests get 503 with Retry-After,
readiness turns false, and the log says why (never the secrets).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from model.errors import CTTError
from model.serving.routes import CLASSIFY_PATH, FEEDBACK_PATH, FEEDBACK_STATS_PATH, MODEL_PATH, TASKS_PATH, is_open
from model.settings import SecretSource, Settings, check_jwt_secret

CLASSIFY_PERMISSION, FEEDBACK_PERMISSION, REVIEW_PERMISSION = PERMISSIONS = ("classify", "feedback", "review")
# What a credential without stated permissions may do: everything it could before permissions
# existed, except writing the feedback the accuracy alert trusts.
LEGACY_PERMISSIONS = frozenset({CLASSIFY_PERMISSION, FEEDBACK_PERMISSION})
ROUTE_PERMISSION = {CLASSIFY_PATH: CLASSIFY_PERMISSION, TASKS_PATH: CLASSIFY_PERMISSION, MODEL_PATH: CLASSIFY_PERMISSION,
                    FEEDBACK_STATS_PATH: CLASSIFY_PERMISSION, FEEDBACK_PATH: FEEDBACK_PERMISSION}
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    id: str
    permissions: frozenset[str]

    def may(self, permission: str) -> bool:
        return permission in self.permissions


ANONYMOUS = Principal("anonymous", frozenset(PERMISSIONS))
INTERNAL = Principal("internal", LEGACY_PERMISSIONS)


class Unauthorised(Exception):
    """401: no credential, or not a valid one (the message says which, never the secret)."""


class CredentialsUnavailable(CTTError):
    """503: the configured credentials cannot be read or parsed now."""


@dataclass(frozen=True)
class ApiKey:
    secret: str
    id: str
    permissions: frozenset[str]
    stated: bool  # permissions= given (False: the legacy default)


def _permissions(text: str, where: str) -> frozenset[str]:
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - set(PERMISSIONS))
    if unknown:
        raise CTTError(f"{where}: unknown permission(s) {', '.join(unknown)}; use {', '.join(PERMISSIONS)}")
    if not wanted:
        raise CTTError(f"{where}: permissions= names none; use {', '.join(PERMISSIONS)}")
    return frozenset(wanted)


def parse_api_keys(text: str | None, name: str = "API_KEY") -> list[ApiKey]:
    """Every key of a keys file: one per line, blank lines and ``#`` comments ignored. Errors name
    the line number, never its secret."""
    keys: list[ApiKey] = []
    ids: set[str] = set()
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        secret, *options = line.split()
        where = f"{name} line {number}"
        key_id, permissions, stated = None, LEGACY_PERMISSIONS, False
        for option in options:
            field, separator, value = option.partition("=")
            if not separator or field not in ("id", "permissions"):
                raise CTTError(f"{where}: expected 'SECRET [id=NAME] [permissions=a,b]', got an option "
                               f"that is not id= or permissions=")
            if field == "id":
                if not KEY_ID_PATTERN.fullmatch(value):
                    raise CTTError(f"{where}: id= takes 1-64 letters, digits, '.', '_' or '-'")
                key_id = value
            else:
                permissions, stated = _permissions(value, where), True
        key_id = key_id or "sha256-" + hashlib.sha256(secret.encode()).hexdigest()[:12]
        if key_id in ids:
            raise CTTError(f"{where}: id {key_id!r} is used by another key; ids name credentials in feedback rows")
        ids.add(key_id)
        keys.append(ApiKey(secret, key_id, permissions, stated))
    return keys


class Credentials:
    """API keys and the JWT secret as they are now (files are re-read when they change), and the
    rules a JWT must follow."""

    def __init__(self, settings: Settings, keys: SecretSource, jwt_secret: SecretSource):
        self.settings = settings
        self.keys = keys
        self.jwt_secret = jwt_secret
        self._parsed: tuple[str | None, list[ApiKey]] = (None, [])
        self._lock = threading.Lock()

    def api_keys(self) -> list[ApiKey]:
        """The keys as configured now; CredentialsUnavailable when they cannot be read or parsed."""
        try:
            text = self.keys.get()
        except CTTError as exc:
            raise CredentialsUnavailable(str(exc)) from None
        with self._lock:
            if self._parsed[0] != text:
                try:
                    self._parsed = (text, parse_api_keys(text, self.keys.name))
                except CTTError as exc:
                    raise CredentialsUnavailable(str(exc)) from None
            return self._parsed[1]

    def secret(self) -> str | None:
        try:
            secret = self.jwt_secret.get()
            check_jwt_secret(secret)
        except CTTError as exc:
            raise CredentialsUnavailable(str(exc)) from None
        return secret

    def enforced(self, keys: list[ApiKey], secret: str | None) -> bool:
        # Outside development and test the API is never open, even if a Secret was emptied.
        return self.settings.fails_closed or bool(keys or secret)

    def open(self) -> bool:
        """True while the API accepts anyone (development or test, no credential configured)."""
        return not self.enforced(self.api_keys(), self.secret())

    def usable(self) -> bool:
        """False while the configured credentials cannot be read: nobody can be authenticated."""
        try:
            self.api_keys()
            self.secret()
        except CredentialsUnavailable:
            return False
        return True

    def startup_warnings(self) -> list[str]:
        """What an operator should change: credentials that carry only the legacy permissions."""
        warnings = []
        legacy = [key.id for key in self.api_keys() if not key.stated]
        if legacy:
            warnings.append(f"{len(legacy)} API key(s) state no permissions= ({', '.join(legacy[:5])}"
                            f"{' …' if len(legacy) > 5 else ''}): they may classify and send corrections, "
                            "not reviews; give every key its permissions")
        if self.secret():
            warnings.append("JWTs without a 'scope' claim may classify and send corrections, not reviews")
        return warnings

    def principal_of_jwt(self, token: str, secret: str) -> Principal:
        import jwt

        settings = self.settings
        options = {"require": ["exp"], "verify_aud": settings.jwt_audience is not None}
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options=options,
                                audience=settings.jwt_audience, issuer=settings.jwt_issuer)
        except jwt.ExpiredSignatureError:
            raise Unauthorised("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorised(f"token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise Unauthorised(f"token rejected: {exc}") from None
        except jwt.InvalidTokenError:
            raise Unauthorised("invalid credentials") from None
        # PyJWT accepts numeric strings for exp and iat; a lifetime needs numbers.
        expires, issued = _number(claims.get("exp")), _number(claims.get("iat", time.time()))
        if expires is None or issued is None:
            raise Unauthorised("token rejected: exp and iat must be numbers")
        if expires - issued > settings.jwt_max_lifetime_s:
            raise Unauthorised(f"token lifetime is above the maximum of {settings.jwt_max_lifetime_s} s")
        scope = claims.get("scope")
        if scope is None:
            permissions = LEGACY_PERMISSIONS
        elif isinstance(scope, str):
            # Other scopes of the issuer's (e.g. 'openid') are not ours: ignored.
            permissions = frozenset(part for part in scope.split() if part in PERMISSIONS)
        else:
            raise Unauthorised("token rejected: the 'scope' claim must be a string of permissions")
        subject = claims.get("sub")
        subject = subject if isinstance(subject, str) and subject else "unnamed"
        return Principal(f"jwt:{subject[:64]}", permissions)

    def identify(self, headers: dict[bytes, bytes]) -> Principal:
        """The caller of a request with these headers; Unauthorised or CredentialsUnavailable."""
        keys = self.api_keys()
        secret = self.secret()
        if not self.enforced(keys, secret):
            return ANONYMOUS
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, bearer = authorization.partition(" ")
        bearer = bearer.strip() if scheme.lower() == "bearer" else ""
        presented = [value for value in (bearer, headers.get(b"x-api-key", b"").decode("latin-1")) if value]
        if not presented:
            raise Unauthorised("missing credentials: send 'Authorization: Bearer <key or JWT>' or 'X-API-Key: <key>'")
        found = _matching_key(presented, keys)
        if found is not None:
            return Principal(f"key:{found.id}", found.permissions)
        if secret and bearer.count(".") == 2:
            return self.principal_of_jwt(bearer, secret)
        raise Unauthorised("invalid credentials")


def _matching_key(presented: list[str], keys: Iterable[ApiKey]) -> ApiKey | None:
    """The key presented, comparing every key in constant time (no early exit)."""
    found = None
    for key in keys:
        for value in presented:
            if hmac.compare_digest(value.encode(), key.secret.encode()) and found is None:
                found = key
    return found


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def required_permission(path: str) -> str | None:
    return None if is_open(path) else ROUTE_PERMISSION.get(path)


def check_startup_credentials(settings: Settings, credentials: Credentials) -> None:
    """Fail closed: credentials that cannot be read or parsed stop the start anywhere; outside
    development and test, so does having none."""
    keys = credentials.api_keys()
    secret = credentials.secret()
    if settings.fails_closed and not (keys or secret):
        raise CTTError(f"ENVIRONMENT={settings.environment} needs credentials: set API_KEY_FILE or "
                       "JWT_SECRET_FILE (a mounted Secret) or API_KEY / JWT_SECRET; refusing to serve an open API")
