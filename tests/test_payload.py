"""Score payload codec: round trip, size target, and every rejection path."""

import hashlib
import struct
import zlib

import numpy as np
import pytest

from feddale.method.payload import MAGIC, VERSION, PayloadError, PayloadHeader, decode_scores, encode_scores

DIGEST = hashlib.sha256(b"public set").hexdigest()


def _header(count: int, **overrides) -> PayloadHeader:
    fields = dict(version=VERSION, public_digest=DIGEST, run_id="run-1", round=3, client_id="client-0", count=count)
    fields.update(overrides)
    return PayloadHeader(**fields)


def _random_scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def test_round_trip_within_quantization_error():
    scores = _random_scores(500)
    blob = encode_scores(scores, _header(500))
    header, decoded = decode_scores(blob, public_digest=DIGEST, run_id="run-1", round=3, count=500)
    assert header == _header(500)
    assert decoded.dtype == np.float64 and decoded.shape == (500,)
    assert np.max(np.abs(decoded - scores)) <= 0.5 / 255 + 1e-12
    np.testing.assert_array_equal(decoded * 255, np.rint(scores * 255))


def test_endpoints_are_exact():
    _, decoded = decode_scores(encode_scores(np.array([0.0, 1.0, 0.5]), _header(3)))
    assert decoded[0] == 0.0 and decoded[1] == 1.0


def test_size_target_for_2000_sessions_random_scores():
    blob = encode_scores(_random_scores(2000), _header(2000, run_id="r" * 64, client_id="c" * 64))
    assert len(blob) <= 1.1 * 2000


def test_repetitive_scores_are_compressed():
    scores = np.tile([0.91, 0.93, 0.1], 700)[:2000]
    blob = encode_scores(scores, _header(2000))
    assert blob[5] & 0x01  # zlib flag set
    assert len(blob) < 300
    _, decoded = decode_scores(blob, count=2000)
    np.testing.assert_allclose(decoded, np.rint(scores * 255) / 255)


def test_incompressible_scores_are_sent_raw():
    blob = encode_scores(_random_scores(2000, seed=1), _header(2000))
    assert blob[5] == 0


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (np.array([0.2, np.nan]), "score 1 is NaN"),
        (np.array([0.2, 1.5]), "outside"),
        (np.array([-0.01, 0.5]), "outside"),
        (np.zeros((2, 1)), "1-D"),
        (np.array([0.1, 0.2, 0.3]), "count is 2"),
    ],
)
def test_encode_rejects_bad_scores(scores, message):
    with pytest.raises(PayloadError, match=message):
        encode_scores(scores, _header(2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": 2}, "version"),
        ({"public_digest": "abc"}, "public_digest"),
        ({"public_digest": DIGEST.upper()}, "public_digest"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "r" * 65}, "run_id"),
        ({"client_id": "é" * 33}, "client_id"),
        ({"round": 70000}, "round"),
        ({"round": -1}, "round"),
        ({"count": 0}, "count"),
    ],
)
def test_header_validation(overrides, message):
    with pytest.raises(PayloadError, match=message):
        _header(**{"count": 2, **overrides})


@pytest.fixture
def blob() -> bytes:
    return encode_scores(_random_scores(100), _header(100))


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ({"public_digest": hashlib.sha256(b"other").hexdigest()}, "public_digest"),
        ({"run_id": "run-2"}, "run_id"),
        ({"round": 4}, "round"),
        ({"count": 99}, "count"),
        ({"max_bytes": 50}, "more than the allowed 50"),
    ],
)
def test_decode_rejects_mismatches(blob, expect, message):
    with pytest.raises(PayloadError, match=message):
        decode_scores(blob, **expect)


def test_decode_rejects_wrong_magic(blob):
    with pytest.raises(PayloadError, match="magic"):
        decode_scores(b"XXXX" + blob[4:])


def test_decode_rejects_wrong_version(blob):
    with pytest.raises(PayloadError, match="version 9"):
        decode_scores(MAGIC + bytes([9]) + blob[5:])


def test_decode_rejects_unknown_flags(blob):
    with pytest.raises(PayloadError, match="flags"):
        decode_scores(blob[:5] + bytes([0x80]) + blob[6:])


@pytest.mark.parametrize("cut", [3, 10, 40, 45, 60, -1])
def test_decode_rejects_truncation(blob, cut):
    with pytest.raises(PayloadError, match="truncated"):
        decode_scores(blob[:cut])


def test_decode_rejects_trailing_bytes(blob):
    with pytest.raises(PayloadError, match="trailing"):
        decode_scores(blob + b"\x00")


def test_decode_rejects_non_bytes():
    with pytest.raises(PayloadError, match="bytes"):
        decode_scores("not bytes")  # type: ignore[arg-type]


def _with_body(flags: int, count: int, body: bytes) -> bytes:
    head = encode_scores(np.zeros(count), _header(count))
    prefix_len = len(head) - (len(zlib.compress(bytes(count), 9)) if head[5] else count)
    prefix = bytearray(head[:prefix_len])
    prefix[5] = flags
    return bytes(prefix) + body


def test_compressed_body_errors():
    count = 1000
    assert decode_scores(_with_body(1, count, zlib.compress(bytes(count))))[1].shape == (count,)
    with pytest.raises(PayloadError, match="more than the 1000"):
        decode_scores(_with_body(1, count, zlib.compress(bytes(count + 1))))
    with pytest.raises(PayloadError, match="truncated"):
        decode_scores(_with_body(1, count, zlib.compress(bytes(count - 1))))
    with pytest.raises(PayloadError, match="trailing"):
        decode_scores(_with_body(1, count, zlib.compress(bytes(count)) + b"junk"))
    with pytest.raises(PayloadError, match="corrupt"):
        decode_scores(_with_body(1, count, b"\x78\x9c garbage that is not deflate"))


def test_count_field_is_big_endian_u32(blob):
    header, _ = decode_scores(blob)
    count_at = 4 + 2 + 32 + 1 + len("run-1") + 2 + 1 + len("client-0")
    assert struct.unpack(">I", blob[count_at : count_at + 4])[0] == header.count == 100


def test_payload_error_is_value_error():
    assert issubclass(PayloadError, ValueError)
