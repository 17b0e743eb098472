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


@pytest.mark.parametrize("text", [
    "ada", "ada:plain", "ada:md5$x",
    "ada:pbkdf2_sha256$abc$zz$yy",  # three dollars, but nothing a password can ever match
    "ada:bcrypt$1$2$3",
    "ada:pbkdf2_sha256$1000$0a1b$xyz0",
])
def test_bad_users_file_lines_are_refused(text):
    with pytest.raises(ValueError, match="line 1"):
        parse_users(text)


def test_a_user_given_twice_is_refused():
    line = "ada:" + hash_password("x", iterations=1000)
    with pytest.raises(ValueError, match="line 2: user 'ada' is already given"):
        parse_users(f"{line}\n{line}\n")


def test_an_unknown_user_costs_what_a_known_one_does(monkeypatch):
    """The time of a refusal must not tell which user names exist (it took 1,000 iterations
    for an unknown name against the users' 200,000: 1 ms against 40)."""
    import hashlib

    auth = Authenticator(users={"ada": hash_password("lovelace", iterations=2000)})
    spent = []
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac",
                        lambda name, pw, salt, n: spent.append(n) or real(name, pw, salt, n))
    assert not auth.check(basic("ada", "wrong")).ok
    assert not auth.check(basic("nobody", "wrong")).ok
    assert spent == [2000, 2000]


def test_password_checks_are_bounded_per_second_but_known_logins_are_not():
    """Each check is ~40 ms of the event loop: an unauthenticated caller could ask for as many
    as it liked and stall every client. Past the budget the answer is 'retry shortly'."""
    now = [0.0]
    auth = Authenticator(users={"ada": hash_password("lovelace", iterations=1000)},
                         slow_per_second=3, clock=lambda: now[0])
    assert auth.check(basic("ada", "lovelace")).ok  # 1 of 3 (then remembered)
    verdicts = [auth.check(basic("eve", f"guess{i}")) for i in range(4)]
    assert [v.busy for v in verdicts] == [False, False, True, True]
    assert auth.check(basic("ada", "lovelace")).ok  # remembered: no check, never refused
    now[0] += 1.0  # a second later, the budget is back
    assert not auth.check(basic("eve", "again")).busy


def test_with_a_token_only_a_wrong_basic_password_is_refused_at_once():
    """No users: nothing slow to bound, so a flood of wrong tokens gets 401, never 429."""
    auth = Authenticator(token="T0k3n", slow_per_second=1, clock=lambda: 0.0)
    verdicts = [auth.check(basic("anyone", f"guess{i}")) for i in range(5)]
    assert not any(v.ok or v.busy for v in verdicts)


def test_password_hashes_are_salted_and_checked():
    a, b = hash_password("x", 1000), hash_password("x", 1000)
    assert a != b and check_password("x", a) and check_password("x", b)
    assert not check_password("y", a) and not check_password("x", "garbage")
