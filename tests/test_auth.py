"""Who may call what: keys with permissions, JWT scopes, and what a broken credential does."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import jwt
import pytest

from model.errors import CTTError
from model.serving.auth import (ANONYMOUS, LEGACY_PERMISSIONS, Credentials, CredentialsUnavailable, Principal,
                                Unauthorised, check_startup_credentials, parse_api_keys)
from model.settings import SecretSource, Settings

JWT_SECRET = "jwt-secret-" + uuid.uuid4().hex


def credentials_for(environ: dict, settings_environ: dict | None = None) -> Credentials:
    settings = Settings.from_environ({"ENVIRONMENT": "production", **(settings_environ or {})})
    return Credentials(settings, SecretSource("API_KEY", environ, reload_s=0), SecretSource("JWT_SECRET", environ))


def bearer(token: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {token}".encode()}


def test_a_keys_file_gives_each_key_its_id_and_permissions():
    keys = parse_api_keys("# reviewers\nrev-secret id=review-team permissions=classify,feedback,review\n\n"
                          "web-secret  id=web   permissions=classify\nold-secret\n")
    assert [(k.id, sorted(k.permissions), k.stated) for k in keys] == [
        ("review-team", ["classify", "feedback", "review"], True), ("web", ["classify"], True),
        (keys[2].id, sorted(LEGACY_PERMISSIONS), False)]
    assert keys[2].id.startswith("sha256-") and "old-secret" not in keys[2].id


@pytest.mark.parametrize("text, message", [
    ("s3cret permissions=classify,admin", "line 1: unknown permission(s) admin"),
    ("s3cret permissions=", "line 1: permissions= names none"),
    ("s3cret colour=red", "line 1: expected 'SECRET [id=NAME] [permissions=a,b]'"),
    ("a id=x\nb id=x", "line 2: id 'x' is used by another key"),
    ("s3cret id=../etc", "line 1: id= takes 1-64 letters"),
])
def test_a_malformed_keys_file_names_the_line_and_never_the_secret(text, message):
    with pytest.raises(CTTError, match=re.escape(message)) as raised:
        parse_api_keys(text)
    assert "s3cret" not in str(raised.value)


def test_a_request_is_identified_by_key_or_jwt_with_their_permissions():
    credentials = credentials_for({"API_KEY": "web-key id=web permissions=classify\nplain-key", "JWT_SECRET": JWT_SECRET})
    assert credentials.identify({b"x-api-key": b"web-key"}) == Principal("key:web", frozenset({"classify"}))
    assert credentials.identify(bearer("plain-key")).permissions == LEGACY_PERMISSIONS
    now = int(time.time())
    scoped = jwt.encode({"sub": "alice", "exp": now + 60, "scope": "openid review classify"}, JWT_SECRET)
    assert credentials.identify(bearer(scoped)) == Principal("jwt:alice", frozenset({"review", "classify"}))
    unscoped = jwt.encode({"sub": "bob", "exp": now + 60}, JWT_SECRET)
    assert credentials.identify(bearer(unscoped)).permissions == LEGACY_PERMISSIONS
    with pytest.raises(Unauthorised, match="missing credentials"):
        credentials.identify({})
    with pytest.raises(Unauthorised, match="invalid credentials"):
        credentials.identify({b"x-api-key": b"web-key-not"})


@pytest.mark.parametrize("claims, reason", [
    ({}, None),
    ({"exp": -60}, "token expired"),
    ({"exp": None}, "token lacks the 'exp' claim"),
    ({"exp": 7200, "iat": 0}, "token lifetime is above the maximum of 3600 s"),
    ({"exp": 7200}, "token lifetime is above the maximum of 3600 s"),
    ({"aud": "someone-else"}, "Audience doesn't match"),
    ({"aud": None}, "lacks the 'aud' claim"),
    ({"iss": "mallory"}, "Invalid issuer"),
    ({"scope": ["classify"]}, "the 'scope' claim must be a string"),
])
def test_jwt_rules(claims, reason):
    credentials = credentials_for({"JWT_SECRET": JWT_SECRET}, {"JWT_AUDIENCE": "ctt", "JWT_ISSUER": "auth.example"})
    now = int(time.time())
    body = {"sub": "tester", "aud": "ctt", "iss": "auth.example", "iat": 0, "exp": 60}
    body.update(claims)
    body = {key: (now + value if key in ("exp", "iat") else value) for key, value in body.items() if value is not None}
    token = jwt.encode(body, JWT_SECRET, algorithm="HS256")
    if reason is None:
        assert credentials.identify(bearer(token)).id == "jwt:tester"
    else:
        with pytest.raises(Unauthorised, match=reason):
            credentials.identify(bearer(token))


@pytest.mark.parametrize("exp", ["9999999999", "soon", "1e400", True])
def test_a_validly_signed_jwt_with_an_odd_expiry_is_a_401_never_a_crash(exp):
    """PyJWT accepts a numeric string as exp; the lifetime check then subtracted a string (500)."""
    credentials = credentials_for({"JWT_SECRET": JWT_SECRET})
    token = jwt.encode({"sub": "x", "exp": exp}, JWT_SECRET, algorithm="HS256")
    with pytest.raises(Unauthorised):
        credentials.identify(bearer(token))


def test_an_unreadable_keys_file_authenticates_nobody_and_says_so(tmp_path):
    """A key file rewritten with invalid UTF-8 gave 500 on every call while /readyz stayed 200."""
    key_file = tmp_path / "api-key"
    key_file.write_text("good-key id=web permissions=classify\n")
    credentials = credentials_for({"API_KEY_FILE": str(key_file)})
    assert credentials.identify({b"x-api-key": b"good-key"}).id == "key:web" and credentials.usable()
    key_file.write_bytes(b"good-key \xff\xfe broken\n")
    with pytest.raises(CredentialsUnavailable, match="cannot read"):
        credentials.identify({b"x-api-key": b"good-key"})
    assert not credentials.usable()
    key_file.write_text("good-key permissions=everything\n")
    with pytest.raises(CredentialsUnavailable, match="unknown permission"):
        credentials.identify({b"x-api-key": b"good-key"})
    key_file.write_text("good-key id=web permissions=classify\n")
    assert credentials.usable() and credentials.identify({b"x-api-key": b"good-key"}).id == "key:web"


def test_the_start_refuses_credentials_it_cannot_parse(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("k permissions=root\n")
    with pytest.raises(CTTError, match="unknown permission"):
        check_startup_credentials(Settings.from_environ({}), credentials_for({"API_KEY_FILE": str(key_file)}))


def test_legacy_credentials_are_named_at_start():
    credentials = credentials_for({"API_KEY": "a\nb id=named permissions=classify", "JWT_SECRET": JWT_SECRET})
    warnings = credentials.startup_warnings()
    assert len(warnings) == 2 and "1 API key(s) state no permissions=" in warnings[0] and "'scope'" in warnings[1]


async def _call(middleware, path: str, headers: dict, scope_extra: dict | None = None):
    sent, seen = [], {}

    async def app(scope, receive, send):
        seen["auth"] = scope.get("auth")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": list(headers.items()),
             "server": ("10.0.0.1", 3000), "client": ("10.0.0.2", 5555), **(scope_extra or {})}
    await middleware(app)(scope, None, send)
    return sent[0]["status"], sent[-1].get("body", b""), seen.get("auth")


def test_each_route_needs_its_permission_and_probes_none():
    from model.serving.edges import AuthMiddleware

    credentials = credentials_for({"API_KEY": "web id=web permissions=classify\nwriter id=w permissions=feedback"})
    middleware = lambda app: AuthMiddleware(app, credentials)  # noqa: E731
    status, _, principal = asyncio.run(_call(middleware, "/classify", {b"x-api-key": b"web"}))
    assert status == 200 and principal.id == "key:web"
    status, body, _ = asyncio.run(_call(middleware, "/feedback", {b"x-api-key": b"web"}))
    assert status == 403 and b"lacks the 'feedback' permission" in body and b"key:web" in body
    assert asyncio.run(_call(middleware, "/classify", {b"x-api-key": b"writer"}))[0] == 403
    assert asyncio.run(_call(middleware, "/feedback", {b"x-api-key": b"writer"}))[0] == 200
    for open_path in ("/readyz", "/metrics", "/docs.json"):
        assert asyncio.run(_call(middleware, open_path, {}))[0] == 200, open_path
    # Another service of the same bento, over BentoML's Unix socket: no credentials needed.
    status, _, principal = asyncio.run(_call(middleware, "/classify", {}, {"server": ("/tmp/ctt.sock", None),
                                                                            "client": None}))
    assert status == 200 and principal.id == "internal" and not principal.may("review")


def test_open_development_servers_let_anyone_do_anything():
    credentials = Credentials(Settings.from_environ({"ENVIRONMENT": "development"}), SecretSource("API_KEY", {}),
                              SecretSource("JWT_SECRET", {}))
    assert credentials.open() and credentials.identify({}) == ANONYMOUS and ANONYMOUS.may("review")
