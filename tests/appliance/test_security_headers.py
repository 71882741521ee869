"""Security headers on every answer of the API and the console (issue 16 item 7): a CSP
that runs no inline or injected script, no framing, no sniffing, no referrer, HSTS over
TLS; the API's documentation page runs its one inline script by a per-answer nonce; the
cookies a sign-out clears keep their Secure/HttpOnly/SameSite flags. The attack (an
injected inline script that the browser refuses) is in tests/e2e/test_console.py."""

from __future__ import annotations

import re

import pytest

from .conftest import Api

pytestmark = pytest.mark.functional


def directives(csp: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/no-such-route", "/", "/vms/web"])
def test_every_answer_carries_the_security_headers(module_api_sqlite: Api, path: str) -> None:
    r = module_api_sqlite.client.get(path)
    csp = directives(r.headers["content-security-policy"])
    assert csp["script-src"] == ["'self'"]
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert csp["default-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["strict-transport-security"].startswith("max-age=")  # the test client speaks https


def test_the_docs_page_runs_only_its_own_nonced_script(module_api_sqlite: Api) -> None:
    first = module_api_sqlite.client.get("/api/v1/docs")
    second = module_api_sqlite.client.get("/api/v1/docs")
    assert first.status_code == 200
    nonces = []
    for r in (first, second):
        csp = directives(r.headers["content-security-policy"])
        assert "'unsafe-inline'" not in csp["script-src"]
        nonce = next(s for s in csp["script-src"] if s.startswith("'nonce-"))[len("'nonce-"):-1]
        inline = [attrs for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S) if body.strip()]
        assert inline and all(f'nonce="{nonce}"' in attrs for attrs in inline), inline
        nonces.append(nonce)
    assert nonces[0] != nonces[1] and len(nonces[0]) >= 16


def test_sign_out_clears_the_cookies_with_their_flags(module_api_sqlite: Api) -> None:
    api = module_api_sqlite
    r = api.client.post("/api/v1/auth/login", json={"username": "admin", "password": api.admin_password})
    csrf = r.json()["csrf_token"]
    r = api.client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204
    cleared = {c.split("=", 1)[0]: c.lower() for c in r.headers.get_list("set-cookie")}
    assert {"cairn_session", "cairn_csrf"} <= set(cleared)
    for flags in cleared.values():
        assert "secure" in flags and "samesite=strict" in flags and "max-age=0" in flags
    assert "httponly" in cleared["cairn_session"]
