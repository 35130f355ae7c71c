"""Signed decision ids: compact, URL-safe, HMAC-SHA256, for single decisions and batches.

Binary layout before base64url (no padding)::

    header   1 byte   FORMAT_VERSION << 4 | flags (BATCH, NAMED)
    exp      uvarint id, or uvarint length + UTF-8 name when NAMED
    epoch    uvarint  allocation epoch
    issued   uvarint  milliseconds since the Unix epoch
    nonce    6 bytes signer instance id + uvarint counter
    single:  variant uvarint
    batch:   count uvarint, width byte (1, 2, 4, 8, 16 or 32 bits), packed variants
    tag      16 bytes HMAC-SHA256(key, everything above), truncated

Item ``i`` of a batch is the string ``<batch token>.<i>``. The variant array is inside the
signed bytes, so a caller can't redeem a batch item for another variant than the one chosen.

Dedup keys: a single decision's is its base64 tag; item ``i`` of a batch's is
``<base64 tag>.<i>`` (no hash per item, and the keys of one batch share a prefix, so they
land next to each other in the log's unique index). Tags are distinct per token (the
nonce), single keys have no dot, and ``i`` is canonical decimal, so keys never collide.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import importlib
import itertools
import math
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_BATCH_ITEMS",
    "Batch",
    "Decision",
    "ExpiredToken",
    "IndexOutOfRange",
    "InvalidToken",
    "TokenSigner",
    "batch_keys",
    "decision_key",
    "event_key",
    "load_or_create_secret",
    "new_secret",
]

FORMAT_VERSION = 1
_FLAG_BATCH = 0x1
_FLAG_NAMED = 0x2
# 128-bit tags: NIST SP 800-107 allows truncating HMAC output; 2^-128 forgery odds per try
# is far beyond what an online guesser can reach, and it keeps single tokens near 50 chars.
TAG_BYTES = 16
_INSTANCE_BYTES = 6
MAX_BATCH_ITEMS = 100_000
MAX_NAME_BYTES = 200
_MAX_UINT32 = 2**32 - 1
_MAX_VARINT_BYTES = 10
_WIDTHS = (1, 2, 4, 8, 16, 32)
# Worst case: a NAMED header, a full batch of 32-bit variants, all varints at full length.
_MAX_RAW_BYTES = 1 + 2 + MAX_NAME_BYTES + 8 * _MAX_VARINT_BYTES + 4 * MAX_BATCH_ITEMS + TAG_BYTES
MAX_TOKEN_CHARS = (_MAX_RAW_BYTES * 4 + 2) // 3 + 1 + 6
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
_SECRET_META_KEY = "token_secret"


class InvalidToken(ValueError):
    """Malformed, forged or tampered decision id; `reason` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid decision id: {reason}")
        self.reason = reason


class ExpiredToken(InvalidToken):
    """A genuine decision id older than the signer's TTL."""

    def __init__(self, age_seconds: float, ttl_seconds: float) -> None:
        super().__init__(f"expired: issued {age_seconds:.0f} s ago, TTL is {ttl_seconds:.0f} s")
        self.age_seconds = age_seconds
        self.ttl_seconds = ttl_seconds


class IndexOutOfRange(InvalidToken):
    """Item ``index`` (at ``position`` of the request) is not in a batch of ``size`` items."""

    def __init__(self, position: int, index: int, size: int) -> None:
        super().__init__(f"batch item {index} out of range (batch has {size} items)")
        self.position = position
        self.index = index
        self.size = size


@dataclass(frozen=True, slots=True)
class Decision:
    """What a verified decision id says; `key` is its canonical reward-dedup key."""

    experiment: int | str
    variant: int
    epoch: int
    issued_at: float
    key: str
    batch_index: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Batch:
    """A verified batch token: one signature over all its variants.

    >>> signer = TokenSigner(b"k" * 32, ttl_seconds=3600)
    >>> batch = signer.verify_batch(signer.issue_batch(7, [0, 2, 1], epoch=0, now=100.0), 101.0)
    >>> batch.decision(1).variant
    2
    """

    experiment: int | str
    epoch: int
    issued_at: float
    variants: npt.NDArray[np.uint32]
    tag: bytes

    def __len__(self) -> int:
        return int(self.variants.shape[0])

    def key(self, index: int) -> str:
        """Dedup key of item `index` (same as `decision_key("<batch>.<index>")`)."""
        self._check_index(index)
        return _batch_item_key(self.tag, index)

    def keys(self, indices: npt.NDArray[np.integer]) -> list[str]:
        """Dedup keys of items `indices` (1-D); IndexOutOfRange names the first bad one.

        >>> signer = TokenSigner(b"k" * 32, ttl_seconds=3600)
        >>> batch = signer.verify_batch(signer.issue_batch(7, [0, 2], epoch=0, now=1.0), 2.0)
        >>> batch.keys(np.array([1, 0])) == [batch.key(1), batch.key(0)]
        True
        """
        self.check_indices(indices)
        prefix = _b64(self.tag) + "."
        return [prefix + i for i in map(str, indices.tolist())]

    def check_indices(self, indices: npt.NDArray[np.integer]) -> None:
        """IndexOutOfRange for the first of `indices` outside [0, len(self))."""
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be a 1-D integer array, got {indices.dtype}")
        n = len(self)
        if indices.size and not (int(indices.min()) >= 0 and int(indices.max()) < n):
            pos = int(np.flatnonzero((indices < 0) | (indices >= n))[0])
            raise IndexOutOfRange(pos, int(indices[pos]), n)

    def decision(self, index: int) -> Decision:
        """Decision of item `index`; InvalidToken when out of range."""
        self._check_index(index)
        return Decision(
            self.experiment,
            int(self.variants[index]),
            self.epoch,
            self.issued_at,
            _batch_item_key(self.tag, index),
            index,
        )

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise InvalidToken(f"batch item {index} out of range (batch has {len(self)} items)")


@dataclass(frozen=True, slots=True)
class _Parsed:
    experiment: int | str
    epoch: int
    issued_ms: int
    variant: int  # -1 for a batch
    variants: npt.NDArray[np.uint32] | None
    tag: bytes


class SupportsMeta(Protocol):
    """The slice of the store that secret bootstrap needs."""

    def set_meta_if_absent(self, key: str, value: str) -> str:
        """Store `value` under `key` unless present; return the value in force."""
        ...


def new_secret() -> bytes:
    """A fresh 256-bit token secret."""
    return secrets.token_bytes(32)


def load_or_create_secret(meta: SupportsMeta, key: str = _SECRET_META_KEY) -> bytes:
    """The shared token secret, generated once; racing replicas all end up with the winner's."""
    stored = meta.set_meta_if_absent(key, new_secret().hex())
    return bytes.fromhex(stored)


class TokenSigner:
    """Issues and verifies decision ids.

    >>> signer = TokenSigner(new_secret(), ttl_seconds=3600)
    >>> token = signer.issue("checkout", variant=1, epoch=3, now=1_700_000_000.0)
    >>> signer.verify(token, now=1_700_000_060.0).variant
    1

    `retired_secrets` are still accepted by `verify` so a secret can be rotated without
    rejecting the decision ids already in flight.
    """

    def __init__(
        self,
        secret: bytes,
        ttl_seconds: float,
        *,
        max_clock_skew_seconds: float = 60.0,
        retired_secrets: Sequence[bytes] = (),
    ) -> None:
        for s in (secret, *retired_secrets):
            if not isinstance(s, bytes):
                raise TypeError(f"secret must be bytes, got {type(s).__name__}")
            if len(s) < 16:
                raise ValueError(f"secret must be at least 16 bytes, got {len(s)}")
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"ttl_seconds must be finite and > 0, got {ttl_seconds}")
        if not (math.isfinite(max_clock_skew_seconds) and max_clock_skew_seconds >= 0):
            raise ValueError(f"max_clock_skew_seconds must be >= 0, got {max_clock_skew_seconds}")
        self.ttl_seconds = float(ttl_seconds)
        self.max_clock_skew_seconds = float(max_clock_skew_seconds)
        self._mac = _Sha256Mac(_derive_key(secret))
        self._verify_macs = (self._mac, *(_Sha256Mac(_derive_key(s)) for s in retired_secrets))
        # The nonce makes two decisions issued in the same millisecond for the same variant
        # distinct tokens, hence distinct dedup keys (else their rewards would merge).
        self._instance = os.urandom(_INSTANCE_BYTES)
        self._counter = itertools.count()
        self._parse_batch = functools.lru_cache(maxsize=64)(self._parse_batch_uncached)
        # Every id of an epoch starts with the same bytes, built once (an Assign is
        # microseconds: building them per call was a third of signing). ``typed``: True
        # and 1 are equal keys, and True must still be refused.
        self._prefix = functools.lru_cache(maxsize=1024, typed=True)(self._prefix_uncached)

    def issue(self, experiment: int | str, variant: int, epoch: int, now: float) -> str:
        """Sign one decision."""
        _check_uint("variant", variant, _MAX_UINT32)
        out = self._head(experiment, epoch, now, batch=False)
        _put_uvarint(out, variant)
        return self._seal(out)

    def issue_batch(
        self,
        experiment: int | str,
        variants: Sequence[int] | npt.NDArray[np.integer],
        epoch: int,
        now: float,
    ) -> str:
        """Sign a whole batch once; item `i` is redeemed as `f"{token}.{i}"`."""
        arr = np.asarray(variants)
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise ValueError(f"variants must be a non-empty 1-D sequence, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"variants must be integers, got dtype {arr.dtype}")
        if arr.shape[0] > MAX_BATCH_ITEMS:
            raise ValueError(f"batch of {arr.shape[0]} exceeds MAX_BATCH_ITEMS={MAX_BATCH_ITEMS}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _MAX_UINT32:
            raise ValueError(f"variants must be in [0, 2**32), got range [{lo}, {hi}]")
        width = next(w for w in _WIDTHS if hi < (1 << w))
        out = self._head(experiment, epoch, now, batch=True)
        _put_uvarint(out, int(arr.shape[0]))
        out.append(width)
        out += _pack(arr, width)
        return self._seal(out)

    def verify(self, token: str, now: float) -> Decision:
        """Check signature and age of a single id or a `<batch>.<i>` item."""
        if not isinstance(token, str):
            raise TypeError(f"token must be str, got {type(token).__name__}")
        body, dot, index_text = token.partition(".")
        if not dot:
            parsed = self._parse_verified(body)
            if parsed.variants is not None:
                raise InvalidToken("batch token without an item index")
            self._check_age(parsed.issued_ms, now)
            return Decision(
                parsed.experiment,
                parsed.variant,
                parsed.epoch,
                parsed.issued_ms / 1000.0,
                _b64(parsed.tag),
            )
        if _INDEX.fullmatch(index_text) is None:
            raise InvalidToken("batch item index must be a canonical decimal number")
        return self.verify_batch(body, now).decision(int(index_text))

    def verify_batch(self, batch_token: str, now: float) -> Batch:
        """Check a bare batch token; verified batches are cached (one MAC per batch)."""
        if not isinstance(batch_token, str):
            raise TypeError(f"token must be str, got {type(batch_token).__name__}")
        batch = self._parse_batch(batch_token)
        self._check_age(round(batch.issued_at * 1000.0), now)
        return batch

    def _head(self, experiment: int | str, epoch: int, now: float, *, batch: bool) -> bytearray:
        if not (math.isfinite(now) and now >= 0):
            raise ValueError(f"now must be a finite non-negative time, got {now}")
        out = bytearray(self._prefix(experiment, epoch, batch))
        _put_uvarint(out, round(now * 1000.0))
        out += self._instance
        _put_uvarint(out, next(self._counter))
        return out

    def _prefix_uncached(self, experiment: int | str, epoch: int, batch: bool) -> bytes:
        """Header byte, experiment and epoch: the same for every id of an epoch."""
        _check_uint("epoch", epoch, 2**63 - 1)
        flags = _FLAG_BATCH if batch else 0
        out = bytearray(1)
        if isinstance(experiment, str):
            name = experiment.encode()
            if not 0 < len(name) <= MAX_NAME_BYTES:
                raise ValueError(f"experiment name must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
            flags |= _FLAG_NAMED
            _put_uvarint(out, len(name))
            out += name
        else:
            _check_uint("experiment", experiment, 2**63 - 1)
            _put_uvarint(out, experiment)
        out[0] = FORMAT_VERSION << 4 | flags
        _put_uvarint(out, epoch)
        return bytes(out)

    def _seal(self, out: bytearray) -> str:
        out += self._mac.digest(out)[:TAG_BYTES]
        return _b64(out)

    def _parse_verified(self, body: str) -> _Parsed:
        raw = _decode(body)
        msg, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        for mac in self._verify_macs:
            if hmac.compare_digest(mac.digest(msg)[:TAG_BYTES], tag):
                return _parse(raw)
        raise InvalidToken("bad signature")

    def _parse_batch_uncached(self, batch_token: str) -> Batch:
        parsed = self._parse_verified(batch_token)
        if parsed.variants is None:
            raise InvalidToken("not a batch token")
        return Batch(
            parsed.experiment,
            parsed.epoch,
            parsed.issued_ms / 1000.0,
            parsed.variants,
            parsed.tag,
        )

    def _check_age(self, issued_ms: int, now: float) -> None:
        age = now - issued_ms / 1000.0
        if age > self.ttl_seconds:
            raise ExpiredToken(age, self.ttl_seconds)
        if age < -self.max_clock_skew_seconds:
            raise InvalidToken(f"issued {-age:.0f} s in the future (clock skew?)")


def decision_key(token: str) -> str:
    """Canonical dedup key of a decision id (structure only; verify the signature first)."""
    if not isinstance(token, str):
        raise TypeError(f"token must be str, got {type(token).__name__}")
    body, dot, index_text = token.partition(".")
    parsed = _parse(_decode(body))
    if not dot:
        if parsed.variants is not None:
            raise InvalidToken("batch token without an item index")
        return _b64(parsed.tag)
    if parsed.variants is None:
        raise InvalidToken("single decision id with an item index")
    if _INDEX.fullmatch(index_text) is None:
        raise InvalidToken("batch item index must be a canonical decimal number")
    index = int(index_text)
    if index >= parsed.variants.shape[0]:
        raise InvalidToken(f"batch item {index} out of range")
    return _batch_item_key(parsed.tag, index)


def batch_keys(token: str) -> list[str]:
    """Dedup keys of every item of a batch token, decoded once (structure only).

    >>> signer = TokenSigner(b"k" * 32, ttl_seconds=3600)
    >>> tok = signer.issue_batch(7, [0, 2], epoch=0, now=1.0)
    >>> batch_keys(tok) == [decision_key(f"{tok}.0"), decision_key(f"{tok}.1")]
    True
    """
    parsed = _parse(_decode(token))
    if parsed.variants is None:
        raise InvalidToken("not a batch token")
    prefix = _b64(parsed.tag) + "."
    return [prefix + str(i) for i in range(parsed.variants.shape[0])]


def event_key(experiment: int | str, event_id: str) -> str:
    """Dedup key for a reward sent as (experiment, event_id) instead of a decision id."""
    out = bytearray(b"\x02")
    if isinstance(experiment, str):
        name = experiment.encode()
        out.append(1)
        _put_uvarint(out, len(name))
        out += name
    else:
        out.append(0)
        _put_uvarint(out, experiment)
    out += event_id.encode()
    return _b64(hashlib.sha256(out).digest()[:16])


class _HashState(Protocol):
    def copy(self) -> _HashState: ...
    def update(self, data: bytes | bytearray, /) -> None: ...
    def digest(self) -> bytes: ...


def _own_sha256() -> Callable[[bytes], _HashState] | None:
    """CPython 3.11's own SHA-256 (``_sha256``); None in FIPS mode or where it is missing.

    hashlib's is OpenSSL's EVP: as fast for a short id in a quiet loop (0.6 us per MAC),
    but in the loaded server, whose caches the gRPC threads keep cold, signing one Assign
    id took a median 9.1-11.0 us with this one against 14.1-14.6 us with OpenSSL's (two
    A/B runs of the unary benchmark, timed inside the handler; the cause was not profiled).
    Only 3.11's: it never releases the GIL, where 3.12's ``_sha2`` does on every update.
    Not in FIPS mode, where hashlib alone decides which implementation may be used.
    """
    try:
        if importlib.import_module("_hashlib").get_fips_mode():
            return None
        return cast(Callable[[bytes], _HashState], importlib.import_module("_sha256").sha256)
    except (ImportError, AttributeError):  # another Python, or a build without them
        return None


_OWN_SHA256 = _own_sha256()
# Messages from this size on are MAC'd with OpenSSL's SHA-256: several times faster on
# long inputs (a 5 KB batch token: 3.5 against 16 us), and it releases the GIL there.
_LONG_MSG = 2048


class _Sha256Mac:
    """HMAC-SHA256 (RFC 2104) under one key, from precomputed inner and outer pad states.

    Equal to ``hmac.digest(key, msg, "sha256")`` (tested), but that call releases the GIL
    around OpenSSL's one-shot HMAC on every call, so in a thread-pool server each issued
    or verified id handed the GIL away and queued to get it back behind the other handler
    threads (unary Assign at 0.68x the echo ceiling from this alone). The pads are hashed
    once per key instead of per call: with :data:`_OWN_SHA256` for short messages (single
    ids, small batches; it keeps the GIL), with hashlib's from :data:`_LONG_MSG` bytes on.
    """

    __slots__ = ("_long", "_short")

    def __init__(self, key: bytes) -> None:
        block = 64  # SHA-256's block size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        inner, outer = bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)
        self._long: tuple[_HashState, _HashState] = (hashlib.sha256(inner), hashlib.sha256(outer))
        own = _OWN_SHA256
        self._short = self._long if own is None else (own(inner), own(outer))

    def digest(self, msg: bytes | bytearray) -> bytes:
        pads = self._short if len(msg) < _LONG_MSG else self._long
        inner = pads[0].copy()
        inner.update(msg)
        outer = pads[1].copy()
        outer.update(inner.digest())
        return outer.digest()


def _derive_key(secret: bytes) -> bytes:
    # Domain separation: the same configured secret may key other MACs without cross-use.
    return hmac.digest(secret, b"allocator decision token v1", "sha256")


def _batch_item_key(tag: bytes, index: int) -> str:
    return f"{_b64(tag)}.{index}"


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(raw: bytes | bytearray) -> str:
    # base64.urlsafe_b64encode, without its two Python-level calls per id.
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _decode(body: str) -> bytes:
    if not body:
        raise InvalidToken("empty")
    if len(body) > MAX_TOKEN_CHARS:
        raise InvalidToken(f"longer than {MAX_TOKEN_CHARS} characters")
    if _B64URL.fullmatch(body) is None:
        raise InvalidToken("not base64url")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as e:
        raise InvalidToken("not base64url") from e
    # Non-zero unused trailing bits decode to the same bytes: demand the one canonical
    # spelling so a client can't present one decision under two strings.
    if _b64(raw) != body:
        raise InvalidToken("non-canonical base64")
    if len(raw) < TAG_BYTES + 1:
        raise InvalidToken("too short")
    return raw


def _parse(raw: bytes) -> _Parsed:
    end = len(raw) - TAG_BYTES
    header = raw[0]
    if header >> 4 != FORMAT_VERSION or header & 0x0F & ~(_FLAG_BATCH | _FLAG_NAMED):
        raise InvalidToken(f"unknown format byte 0x{header:02x}")
    pos = 1
    experiment: int | str
    if header & _FLAG_NAMED:
        length, pos = _get_uvarint(raw, pos, end)
        if not 0 < length <= MAX_NAME_BYTES or pos + length > end:
            raise InvalidToken("bad experiment name length")
        try:
            experiment = raw[pos : pos + length].decode()
        except UnicodeDecodeError as e:
            raise InvalidToken("experiment name is not UTF-8") from e
        pos += length
    else:
        experiment, pos = _get_uvarint(raw, pos, end)
    epoch, pos = _get_uvarint(raw, pos, end)
    issued_ms, pos = _get_uvarint(raw, pos, end)
    pos += _INSTANCE_BYTES
    _, pos = _get_uvarint(raw, pos, end)
    variant = -1
    variants = None
    if header & _FLAG_BATCH:
        count, pos = _get_uvarint(raw, pos, end)
        if not 0 < count <= MAX_BATCH_ITEMS or pos >= end:
            raise InvalidToken("bad batch size")
        width = raw[pos]
        pos += 1
        if width not in _WIDTHS:
            raise InvalidToken("bad variant width")
        size = (count * width + 7) // 8
        if pos + size != end:
            raise InvalidToken("batch length mismatch")
        variants = _unpack(raw[pos:end], width, count)
    else:
        variant, pos = _get_uvarint(raw, pos, end)
        if variant > _MAX_UINT32 or pos != end:
            raise InvalidToken("bad variant field")
    return _Parsed(experiment, epoch, issued_ms, variant, variants, raw[end:])


_INTEGERS = (int, np.integer)


def _check_uint(field: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, _INTEGERS):
        raise TypeError(f"{field} must be an int, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{field} must be in [0, {limit}], got {value}")


def _put_uvarint(out: bytearray, n: int) -> None:
    n = int(n)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _get_uvarint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and raw[pos] < 0x80:
        return raw[pos], pos + 1
    result = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        if pos >= end:
            raise InvalidToken("truncated")
        b = raw[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
    raise InvalidToken("varint too long")


def _pack(arr: npt.NDArray[np.integer], width: int) -> bytes:
    if width >= 8:
        return arr.astype(f"<u{width // 8}").tobytes()
    per = 8 // width
    padded = np.zeros(-(-arr.shape[0] // per) * per, dtype=np.uint8)
    padded[: arr.shape[0]] = arr
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(width)
    packed = np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1)
    return packed.astype(np.uint8).tobytes()


def _unpack(data: bytes, width: int, count: int) -> npt.NDArray[np.uint32]:
    if width >= 8:
        out = np.frombuffer(data, dtype=f"<u{width // 8}").astype(np.uint32)
    else:
        per = 8 // width
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(width)
        b = np.frombuffer(data, dtype=np.uint8)
        mask = np.uint8((1 << width) - 1)
        out = ((b[:, None] >> shifts) & mask).ravel()[:count].astype(np.uint32)
    out.flags.writeable = False
    return out
