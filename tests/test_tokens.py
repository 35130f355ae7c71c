"""Tests for allocator.tokens: signed single and batch decision ids."""

from __future__ import annotations

import base64
import hmac
import importlib
import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator import tokens
from allocator.tokens import (
    MAX_BATCH_ITEMS,
    MAX_TOKEN_CHARS,
    Decision,
    ExpiredToken,
    IndexOutOfRange,
    InvalidToken,
    TokenSigner,
    _derive_key,
    _Sha256Mac,
    decision_key,
    event_key,
    load_or_create_secret,
    new_secret,
)

SECRET = b"s" * 32
NOW = 1_700_000_000.0
TTL = 3600.0


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(SECRET, ttl_seconds=TTL)


def _flip(token: str, pos: int) -> str:
    """The token with character `pos` replaced by a different base64url character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    c = token[pos]
    return token[:pos] + alphabet[(alphabet.index(c) + 1) % 64] + token[pos + 1 :]


# ---------------------------------------------------------------- single tokens


@pytest.mark.parametrize("experiment", [0, 7, 2**40, "checkout", "ünïcode-name"])
def test_single_round_trip(signer: TokenSigner, experiment: int | str) -> None:
    token = signer.issue(experiment, variant=3, epoch=12, now=NOW + 0.1234)
    decision = signer.verify(token, now=NOW + 5)
    assert decision == Decision(experiment, 3, 12, NOW + 0.123, decision.key, None)
    assert decision.key == decision_key(token)
    assert all(c.isalnum() or c in "-_" for c in token)


def test_single_token_is_compact(signer: TokenSigner) -> None:
    assert len(signer.issue(123, variant=4, epoch=2, now=NOW)) <= 48


def test_same_decision_twice_gives_distinct_tokens_and_keys(signer: TokenSigner) -> None:
    # Same experiment, variant, epoch and millisecond: the nonce must still separate them,
    # or two requests' rewards would share one dedup key.
    a = signer.issue(1, variant=0, epoch=0, now=NOW)
    b = signer.issue(1, variant=0, epoch=0, now=NOW)
    assert a != b
    assert signer.verify(a, NOW).key != signer.verify(b, NOW).key


def test_tampering_any_character_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue("exp", variant=1, epoch=0, now=NOW)
    for pos in range(len(token)):
        with pytest.raises(InvalidToken):
            signer.verify(_flip(token, pos), NOW)


def test_tampering_any_byte_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            forged = bytearray(raw)
            forged[i] ^= bit
            text = base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode()
            with pytest.raises(InvalidToken):
                signer.verify(text, NOW)


def test_wrong_secret_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    with pytest.raises(InvalidToken, match="bad signature"):
        TokenSigner(b"x" * 32, ttl_seconds=TTL).verify(token, NOW)


def test_retired_secret_still_verifies(signer: TokenSigner) -> None:
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    rotated = TokenSigner(b"n" * 32, ttl_seconds=TTL, retired_secrets=[SECRET])
    assert rotated.verify(token, NOW).variant == 1
    assert rotated.verify(token, NOW).key == signer.verify(token, NOW).key


def test_expired_token_carries_its_age(signer: TokenSigner) -> None:
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    assert signer.verify(token, NOW + TTL).variant == 1  # exactly at the TTL: still valid
    with pytest.raises(ExpiredToken) as info:
        signer.verify(token, NOW + TTL + 10)
    assert info.value.age_seconds == pytest.approx(TTL + 10)
    assert info.value.ttl_seconds == TTL
    assert isinstance(info.value, InvalidToken)


def test_token_from_the_future_is_rejected() -> None:
    signer = TokenSigner(SECRET, ttl_seconds=TTL, max_clock_skew_seconds=5)
    token = signer.issue(5, variant=1, epoch=0, now=NOW + 60)
    assert signer.verify(token, NOW + 56).variant == 1  # within the skew allowance
    with pytest.raises(InvalidToken, match="future"):
        signer.verify(token, NOW)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("!!!!", "not base64url"),
        ("abc=", "not base64url"),
        ("a+b/", "not base64url"),
        ("A", "not base64url"),
        ("AAAA", "too short"),
        ("A" * 40, "bad signature"),
        ("x" * (MAX_TOKEN_CHARS + 1), "longer than"),
        ("abc.def.ghi", "index"),
    ],
)
def test_malformed_tokens(signer: TokenSigner, bad: str, reason: str) -> None:
    with pytest.raises(InvalidToken, match=reason):
        signer.verify(bad, NOW)
    with pytest.raises(InvalidToken):
        decision_key(bad)


def test_unsigned_structure_errors_come_from_decision_key() -> None:
    # verify checks the MAC before parsing; decision_key parses, so it names the defect.
    with pytest.raises(InvalidToken, match="unknown format"):
        decision_key("A" * 40)


def test_non_canonical_base64_spelling_is_rejected(signer: TokenSigner) -> None:
    # Unused low bits of the last character don't change the decoded bytes; accepting them
    # would let one decision be redeemed under several strings.
    # Only a partial final base64 quantum has spare bits; vary the name length to get one.
    token = next(
        t for n in range(1, 4) if len(t := signer.issue("e" * n, variant=1, epoch=0, now=NOW)) % 4
    )
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[last | 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(token + "==")
    assert twin != token
    with pytest.raises(InvalidToken, match="non-canonical"):
        signer.verify(twin, NOW)


def test_single_token_with_index_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    with pytest.raises(InvalidToken, match="not a batch"):
        signer.verify(f"{token}.0", NOW)
    with pytest.raises(InvalidToken, match="single decision id"):
        decision_key(f"{token}.0")


def test_wrong_argument_types_raise_type_error(signer: TokenSigner) -> None:
    with pytest.raises(TypeError):
        signer.verify(b"abc", NOW)  # type: ignore[arg-type]
    # After ids of experiment 1, epoch 0 were issued (their prefix is cached, and True == 1
    # as a key): True is still refused, and epoch False too.
    signer.issue(1, variant=1, epoch=0, now=NOW)
    with pytest.raises(TypeError):
        signer.issue(True, variant=1, epoch=0, now=NOW)
    with pytest.raises(TypeError):
        signer.issue(1, variant=1, epoch=False, now=NOW)
    with pytest.raises(TypeError):
        signer.issue(1, variant=1.0, epoch=0, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"experiment": -1, "variant": 0, "epoch": 0, "now": NOW},
        {"experiment": "", "variant": 0, "epoch": 0, "now": NOW},
        {"experiment": "x" * 201, "variant": 0, "epoch": 0, "now": NOW},
        {"experiment": 1, "variant": -1, "epoch": 0, "now": NOW},
        {"experiment": 1, "variant": 2**32, "epoch": 0, "now": NOW},
        {"experiment": 1, "variant": 0, "epoch": -1, "now": NOW},
        {"experiment": 1, "variant": 0, "epoch": 0, "now": float("nan")},
        {"experiment": 1, "variant": 0, "epoch": 0, "now": -1.0},
    ],
)
def test_issue_rejects_out_of_range_fields(signer: TokenSigner, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        signer.issue(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("secret", "ttl", "error"),
    [
        (b"short", TTL, ValueError),
        ("text" * 8, TTL, TypeError),
        (SECRET, 0.0, ValueError),
        (SECRET, float("inf"), ValueError),
    ],
)
def test_signer_validates_settings(secret: object, ttl: float, error: type[Exception]) -> None:
    with pytest.raises(error):
        TokenSigner(secret, ttl_seconds=ttl)  # type: ignore[arg-type]


def test_negative_skew_is_rejected() -> None:
    with pytest.raises(ValueError):
        TokenSigner(SECRET, ttl_seconds=TTL, max_clock_skew_seconds=-1)


# ---------------------------------------------------------------- batch tokens


@pytest.mark.parametrize("arms", [1, 2, 3, 4, 16, 17, 256, 70_000, 2**32 - 1])
def test_batch_round_trip_every_width(signer: TokenSigner, arms: int) -> None:
    rng = np.random.default_rng(arms % 1000)
    variants = rng.integers(0, arms, size=1001, dtype=np.uint64).astype(np.uint32)
    variants[0] = arms - 1  # force the widest value into the batch
    token = signer.issue_batch("exp", variants, epoch=4, now=NOW)
    batch = signer.verify_batch(token, NOW)
    np.testing.assert_array_equal(batch.variants, variants)
    assert len(batch) == 1001
    for i in (0, 1, 500, 1000):
        d = signer.verify(f"{token}.{i}", NOW)
        assert (d.variant, d.batch_index, d.epoch, d.experiment) == (variants[i], i, 4, "exp")
        assert d.key == batch.key(i) == decision_key(f"{token}.{i}")


def test_batch_accepts_python_sequences(signer: TokenSigner) -> None:
    token = signer.issue_batch(9, [2, 0, 1], epoch=0, now=NOW)
    assert [signer.verify(f"{token}.{i}", NOW).variant for i in range(3)] == [2, 0, 1]


def test_batch_of_ten_thousand_is_small(signer: TokenSigner) -> None:
    variants = np.random.default_rng(0).integers(0, 4, size=10_000).astype(np.uint32)
    token = signer.issue_batch(1, variants, epoch=0, now=NOW)
    # 4 arms pack at 2 bits: 10,000 * 2 / 8 = 2,500 bytes -> ~3,340 base64 chars.
    assert len(token) < 3_400


def test_batch_item_keys_are_distinct(signer: TokenSigner) -> None:
    token = signer.issue_batch(1, np.zeros(1000, dtype=np.uint32), epoch=0, now=NOW)
    keys = {signer.verify(f"{token}.{i}", NOW).key for i in range(1000)}
    assert len(keys) == 1000
    single = signer.issue(1, variant=0, epoch=0, now=NOW)
    assert signer.verify(single, NOW).key not in keys


def test_batch_variant_array_is_signed(signer: TokenSigner) -> None:
    variants = np.array([0, 1, 0, 1, 1, 0, 0, 1] * 4, dtype=np.uint32)
    token = signer.issue_batch(1, variants, epoch=0, now=NOW)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    # The 1-bit packed variants are the 4 bytes just before the 16-byte tag.
    raw[-17] ^= 0x01  # turn item 24's 0 into a 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="bad signature"):
        signer.verify(f"{forged}.24", NOW)


def test_batch_tampering_any_character_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue_batch("e", [3, 1, 2, 0, 1], epoch=1, now=NOW)
    for pos in range(len(token)):
        with pytest.raises(InvalidToken):
            signer.verify(f"{_flip(token, pos)}.1", NOW)


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [
        ("5", "out of range"),
        ("99999999999", "canonical"),
        ("-1", "canonical"),
        ("+1", "canonical"),
        ("01", "canonical"),
        ("", "canonical"),
        (" 1", "canonical"),
        ("١", "canonical"),  # Arabic-Indic digit one: isdigit() but not ASCII
        ("1.2", "canonical"),
    ],
)
def test_batch_bad_indices(signer: TokenSigner, suffix: str, reason: str) -> None:
    token = signer.issue_batch("e", [3, 1, 2, 0, 1], epoch=1, now=NOW)
    with pytest.raises(InvalidToken, match=reason):
        signer.verify(f"{token}.{suffix}", NOW)
    with pytest.raises(InvalidToken):
        decision_key(f"{token}.{suffix}")


def test_bare_batch_token_is_not_a_decision(signer: TokenSigner) -> None:
    token = signer.issue_batch("e", [1, 2], epoch=1, now=NOW)
    with pytest.raises(InvalidToken, match="item index"):
        signer.verify(token, NOW)
    with pytest.raises(InvalidToken, match="item index"):
        decision_key(token)
    with pytest.raises(InvalidToken, match="not a batch"):
        signer.verify_batch(signer.issue("e", variant=1, epoch=1, now=NOW), NOW)


def test_batch_expiry(signer: TokenSigner) -> None:
    token = signer.issue_batch("e", [1, 2], epoch=1, now=NOW)
    signer.verify(f"{token}.1", NOW + 10)  # caches the verified batch
    with pytest.raises(ExpiredToken):
        signer.verify(f"{token}.1", NOW + TTL + 1)  # the cache must not skip the age check
    with pytest.raises(ExpiredToken):
        signer.verify_batch(token, NOW + TTL + 1)


def test_batch_index_out_of_range_on_batch_object(signer: TokenSigner) -> None:
    batch = signer.verify_batch(signer.issue_batch("e", [1, 2], epoch=1, now=NOW), NOW)
    with pytest.raises(InvalidToken, match="out of range"):
        batch.decision(2)
    with pytest.raises(InvalidToken, match="out of range"):
        batch.key(-1)
    assert not batch.variants.flags.writeable


def test_batch_keys_match_every_other_way_to_name_the_item(signer: TokenSigner) -> None:
    token = signer.issue_batch(3, np.arange(12, dtype=np.uint32) % 4, epoch=0, now=NOW)
    batch = signer.verify_batch(token, NOW)
    indices = np.array([11, 0, 5, 5], dtype=np.int64)
    keys = batch.keys(indices)
    assert keys == [batch.key(i) for i in (11, 0, 5, 5)]
    assert keys == [decision_key(f"{token}.{i}") for i in (11, 0, 5, 5)]
    assert keys == [signer.verify(f"{token}.{i}", NOW).key for i in (11, 0, 5, 5)]
    # No per-item hash: the batch's base64 tag, a dot, the canonical decimal index.
    assert all(k.startswith(keys[0].split(".")[0] + ".") for k in keys)
    assert batch.keys(np.array([], dtype=np.uint32)) == []


def test_batch_keys_of_two_batches_never_collide(signer: TokenSigner) -> None:
    a = signer.verify_batch(signer.issue_batch(1, [0] * 100, epoch=0, now=NOW), NOW)
    b = signer.verify_batch(signer.issue_batch(1, [0] * 100, epoch=0, now=NOW), NOW)
    every = np.arange(100)
    assert not set(a.keys(every)) & set(b.keys(every))


@pytest.mark.parametrize(("indices", "position", "index"), [([0, 3, 1], 1, 3), ([-1], 0, -1)])
def test_batch_keys_name_the_first_index_out_of_range(
    signer: TokenSigner, indices: list[int], position: int, index: int
) -> None:
    batch = signer.verify_batch(signer.issue_batch("e", [1, 2, 0], epoch=1, now=NOW), NOW)
    with pytest.raises(IndexOutOfRange, match="out of range") as err:
        batch.keys(np.array(indices, dtype=np.int64))
    assert (err.value.position, err.value.index, err.value.size) == (position, index, 3)
    assert isinstance(err.value, InvalidToken)


def test_batch_keys_reject_non_integer_indices(signer: TokenSigner) -> None:
    batch = signer.verify_batch(signer.issue_batch("e", [1, 2], epoch=1, now=NOW), NOW)
    with pytest.raises(TypeError, match="1-D integer"):
        batch.keys(np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D integer"):
        batch.keys(np.zeros((1, 2), dtype=np.int64))


@pytest.mark.parametrize(
    ("variants", "error"),
    [
        ([], ValueError),
        ([[0, 1]], ValueError),
        ([0, -1], ValueError),
        ([0, 2**32], ValueError),
        ([0.0, 1.0], TypeError),
        (np.zeros(MAX_BATCH_ITEMS + 1, dtype=np.uint32), ValueError),
    ],
)
def test_issue_batch_rejects_bad_arrays(
    signer: TokenSigner, variants: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        signer.issue_batch(1, variants, epoch=0, now=NOW)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzzing


def _assert_key_or_invalid(text: str) -> None:
    """decision_key checks structure only, so random input may parse: then it's a key."""
    try:
        key = decision_key(text)
    except InvalidToken:
        return
    assert len(key) == 22


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_only_raises_invalid_token(text: str) -> None:
    signer = TokenSigner(SECRET, ttl_seconds=TTL)
    with pytest.raises(InvalidToken):
        signer.verify(text, NOW)
    _assert_key_or_invalid(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.one_of(st.none(), st.integers(-5, 2**40)))
def test_arbitrary_base64_payloads_only_raise_invalid_token(raw: bytes, index: int | None) -> None:
    # Well-formed base64 reaches the binary parser; decision_key parses without the MAC.
    signer = TokenSigner(SECRET, ttl_seconds=TTL)
    text = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    if index is not None:
        text = f"{text}.{index}"
    with pytest.raises(InvalidToken):
        signer.verify(text, NOW)
    _assert_key_or_invalid(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50), st.data())
def test_batch_items_round_trip(variants: list[int], data: st.DataObject) -> None:
    signer = TokenSigner(SECRET, ttl_seconds=TTL)
    token = signer.issue_batch(3, variants, epoch=2, now=NOW)
    i = data.draw(st.integers(0, len(variants) - 1))
    assert signer.verify(f"{token}.{i}", NOW).variant == variants[i]


# ---------------------------------------------------------------- keys and secrets


def test_event_key_separates_experiments_and_ids() -> None:
    keys = {event_key(1, "a"), event_key(2, "a"), event_key("1", "a"), event_key(1, "b")}
    assert len(keys) == 4
    assert event_key("exp", "evt-1") == event_key("exp", "evt-1")
    assert len(event_key("exp", "evt-1")) == 22


def test_new_secret_is_random_and_long() -> None:
    a, b = new_secret(), new_secret()
    assert len(a) == 32
    assert a != b


class _Meta:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def set_meta_if_absent(self, key: str, value: str) -> str:
        return self.values.setdefault(key, value)


def test_load_or_create_secret_keeps_the_first() -> None:
    meta = _Meta()
    first = load_or_create_secret(meta)
    assert load_or_create_secret(meta) == first
    assert len(first) == 32


# ---------------------------------------------------------------- the MAC itself


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_mac_is_rfc2104_hmac_sha256(key: bytes, msg: bytes) -> None:
    # Keys longer than SHA-256's 64-byte block are hashed first, as RFC 2104 says.
    assert _Sha256Mac(key).digest(msg) == hmac.digest(key, msg, "sha256")


def test_mac_uses_cpythons_own_sha256_for_short_messages() -> None:
    # OpenSSL's SHA-256 (hashlib's) made signing one id ~40% slower in the loaded server.
    if importlib.util.find_spec("_sha256") is None:
        pytest.skip("not CPython 3.11 with its own SHA-256 (hashlib's is used throughout)")
    if importlib.import_module("_hashlib").get_fips_mode():
        assert tokens._OWN_SHA256 is None  # FIPS mode: hashlib decides, for every message
    else:
        assert tokens._OWN_SHA256 is importlib.import_module("_sha256").sha256


@pytest.mark.parametrize("size", [0, 1, 63, 64, 2047, 2048, 2049, 60_000])
def test_mac_is_hmac_sha256_on_both_sides_of_the_long_message_switch(size: int) -> None:
    # Short messages are hashed with CPython's SHA-256, long ones with OpenSSL's.
    key, msg = b"k" * 32, bytes(i % 251 for i in range(size))
    assert _Sha256Mac(key).digest(msg) == hmac.digest(key, msg, "sha256")
    assert _Sha256Mac(key).digest(bytearray(msg)) == hmac.digest(key, msg, "sha256")


def test_tag_is_hmac_of_the_body_so_older_ids_still_verify(signer: TokenSigner) -> None:
    raw = base64.urlsafe_b64decode(signer.issue(5, variant=1, epoch=0, now=NOW) + "==")
    body, tag = raw[:-16], raw[-16:]
    assert tag == hmac.digest(_derive_key(SECRET), body, "sha256")[:16]


def test_issue_and_verify_keep_the_gil(
    signer: TokenSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hmac.digest releases the GIL around OpenSSL on every call; in the thread-pool server
    # each Assign then queued behind the other handler threads to get it back. The hot
    # path must not use it (its short messages are hashed with CPython 3.11's SHA-256,
    # which never releases the GIL; hashlib's releases it from 2 KiB on).
    def released(*args: object) -> bytes:
        raise AssertionError("hmac.digest on the hot path")

    monkeypatch.setattr(hmac, "digest", released)
    token = signer.issue(5, variant=1, epoch=0, now=NOW)
    assert signer.verify(token, NOW).variant == 1
    batch = signer.issue_batch(5, np.array([0, 1, 2]), epoch=0, now=NOW)
    assert signer.verify(f"{batch}.2", NOW).variant == 2
