"""What the local provider decides without starting anything: the start-up warning about
inherited variables that slow the browser down."""

from stickyproxy.providers.processes import CHROMIUM, PHANTOMJS, env_warnings


def test_an_inherited_certificate_directory_is_named_with_its_cost():
    (line,) = env_warnings(PHANTOMJS, {"SSL_CERT_DIR": "/etc/ssl/certs", "SSL_CERT_FILE": "/x.pem"})
    assert line.startswith('LOCAL_ENV_COSTLY var=SSL_CERT_DIR value="/etc/ssl/certs" browser=phantomjs')
    assert "4x" in line and "env -u SSL_CERT_DIR" in line


def test_nothing_to_say_without_it_or_for_a_browser_it_does_not_slow():
    assert env_warnings(PHANTOMJS, {"SSL_CERT_FILE": "/x.pem", "SSL_CERT_DIR": ""}) == []
    assert env_warnings(CHROMIUM, {"SSL_CERT_DIR": "/etc/ssl/certs"}) == []
