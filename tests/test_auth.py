import base64

import pytest

from stickyproxy.auth import Authenticator, check_password, hash_password, parse_users


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_no_auth_configured_lets_everyone_in_as_one_principal():
    auth = Authenticator()
    assert not auth.enabled and auth.check(None).ok and auth.check(None).principal == "anonymous"


@pytest.mark.parametrize("header, ok, reason", [
    (None, False, "no credentials"),
    ("Bearer T0k3n", True, ""),
    ("bearer T0k3n", True, ""),
    ("Bearer wrong", False, "wrong token"),
    (basic("anyone", "T0k3n"), True, ""),  # Selenium 3: http://user:TOKEN@host
    (basic("anyone", "wrong"), False, "unknown user or wrong password"),
    ("Basic !!!notbase64", False, "malformed Basic credentials"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), False, "malformed Basic credentials"),
    ("Digest abc", False, "unsupported scheme"),
])
def test_token_as_bearer_or_basic_password(header, ok, reason):
    verdict = Authenticator(token="T0k3n").check(header)
    assert verdict.ok is ok and reason in verdict.reason
    assert "T0k3n" not in verdict.reason + verdict.principal  # never echoes a secret


def test_users_file():
    line = "ada:" + hash_password("lovelace", iterations=1000)
    users = parse_users(f"# comment\n\n{line}\n")
    auth = Authenticator(users=users)
    assert auth.check(basic("ada", "lovelace")).principal == "user:ada"
    assert auth.check(basic("ada", "lovelace")).ok  # the remembered path
    assert not auth.check(basic("ada", "babbage")).ok
    assert not auth.check(basic("eve", "lovelace")).ok
    assert not auth.check("Bearer lovelace").ok


@pytest.mark.parametrize("text", ["ada", "ada:plain", "ada:md5$x"])
def test_bad_users_file_lines_are_refused(text):
    with pytest.raises(ValueError, match="line 1"):
        parse_users(text)


def test_password_hashes_are_salted_and_checked():
    a, b = hash_password("x", 1000), hash_password("x", 1000)
    assert a != b and check_password("x", a) and check_password("x", b)
    assert not check_password("y", a) and not check_password("x", "garbage")
