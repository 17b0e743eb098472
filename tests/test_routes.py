import pytest

from stickyproxy.routes import PREFIX, Rewriter, parse, public_id, route_of

KEY = b"k3y"


def test_a_public_id_routes_back_to_its_backend_and_session():
    public = public_id(KEY, "http://10.1.2.3:8910", "abc-123", "user:ada")
    parsed = parse(KEY, public, "user:ada")
    assert parsed.route == route_of("http://10.1.2.3:8910/") and parsed.backend_sid == "abc-123"
    assert not parsed.bridged and parse(KEY, public_id(KEY, "http://x", "s", bridged=True)).bridged
    assert public.endswith("abc-123") and len(public) == PREFIX + len("abc-123")


@pytest.mark.parametrize("tamper", [
    lambda p: p[:-1] + ("x" if p[-1] != "x" else "y"),  # another backend session
    lambda p: ("0" if p[0] != "0" else "1") + p[1:],  # another route
    lambda p: p[:16] + ("b" if p[16] == "p" else "p") + p[17:],  # bridged flag flipped
    lambda p: p[:20] + ("0" if p[20] != "0" else "1") + p[21:],  # signature
    lambda p: p[:PREFIX],  # no backend id
])
def test_forged_or_altered_ids_are_refused(tamper):
    public = public_id(KEY, "http://10.1.2.3:8910", "abc-123")
    assert parse(KEY, tamper(public)) is None


def test_an_id_is_bound_to_its_owner_and_key():
    public = public_id(KEY, "http://b:1", "s1", "user:ada")
    assert parse(KEY, public, "user:eve") is None
    assert parse(b"other", public, "user:ada") is None


@pytest.mark.parametrize("sizes", [[1], [3, 3, 3], [5, 1, 100], [2] * 40])
def test_rewriter_replaces_across_chunk_boundaries(sizes):
    text = b'{"sessionId": "abc-123", "v": "abc-123abc-12", "end": "abc-123"}'
    chunks, at = [], 0
    for size in sizes * 10:
        chunks.append(text[at:at + size])
        at += size
    chunks.append(text[at:])
    rewriter = Rewriter(b"abc-123", b"PUBLICabc-123")
    out = b"".join(rewriter.feed(c) for c in chunks) + rewriter.close()
    assert out == text.replace(b"abc-123", b"PUBLICabc-123")
