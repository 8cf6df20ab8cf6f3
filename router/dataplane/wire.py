"""A tiny protobuf wire codec for the few top-level fields the router reads or rewrites.

The hot path never deserializes Spark Connect messages with the generated classes: it
walks the top-level fields of the raw bytes, skipping every length-delimited payload
without looking inside, so the cost is proportional to the number of top-level fields,
not to the size of a query plan or an Arrow batch.

Invariants:
- Only well-formed wire data is accepted; anything else raises `WireError` (a
  `ValueError`), never IndexError or anything else.
- Proto3 semantics: for a scalar field the *last* occurrence wins; occurrences of an
  embedded message merge, which on the wire is the concatenation of their payloads.
- Rewriting keeps every other byte (unknown fields included) as it was.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

_MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at `pos`; return (value, position after it)."""
    end = len(buf)
    if pos < end and buf[pos] < 0x80:  # one byte: nearly every tag and length on the hot path
        return buf[pos], pos + 1
    result = 0
    shift = 0
    for i in range(pos, min(pos + _MAX_VARINT_BYTES, end)):
        b = buf[i]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result >> 64:
                raise WireError(f"varint at byte {pos} overflows 64 bits")
            return result, i + 1
        shift += 7
    if end - pos >= _MAX_VARINT_BYTES:
        raise WireError(f"varint at byte {pos} is longer than 10 bytes")
    raise WireError(f"truncated varint at byte {pos}")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a varint."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _skip_group(buf: bytes, pos: int, field: int, depth: int) -> int:
    """Skip a deprecated group whose start tag was just read; return position after its end tag."""
    if depth > 64:
        raise WireError("groups nested too deeply")
    end = len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos)
        number, wtype = tag >> 3, tag & 7
        if wtype == EGROUP:
            if number != field:
                raise WireError(f"group {field} closed by end tag of field {number}")
            return pos
        pos = _skip_value(buf, pos, number, wtype, depth + 1)
    raise WireError(f"truncated group {field}")


def _skip_value(buf: bytes, pos: int, number: int, wtype: int, depth: int = 0) -> int:
    """Return the position after the value of a field whose tag ended at `pos`."""
    if number == 0:
        raise WireError("field number 0 is invalid")
    if wtype == VARINT:
        return read_varint(buf, pos)[1]
    if wtype == LEN:
        size, pos = read_varint(buf, pos)
        end = pos + size
        if end > len(buf):
            raise WireError(f"field {number} claims {size} bytes, only {len(buf) - pos} left")
        return end
    if wtype == I64:
        end = pos + 8
    elif wtype == I32:
        end = pos + 4
    elif wtype == SGROUP:
        return _skip_group(buf, pos, number, depth)
    else:
        raise WireError(f"field {number} has invalid wire type {wtype}")
    if end > len(buf):
        raise WireError(f"truncated fixed-width field {number}")
    return end


def iter_fields(
    buf: bytes | memoryview, partial: bool = False
) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field number, wire type, tag start, value start, value end) per top-level field.

    For LEN fields the value span is the payload (after the length prefix); for other
    types it is the encoded value itself. `buf` may be a memoryview (no copies). With
    `partial`, `buf` may be a prefix of a message (the journal reads decompressed
    prefixes): a LEN field that runs past the end is yielded clipped and the walk stops
    there, as it stops quietly at a truncated or malformed tag.
    """
    data: bytes = buf  # type: ignore[assignment]  # memoryview: only indexing and len()
    pos = 0
    end = len(data)
    while pos < end:
        start = pos
        try:
            # One-byte tags and lengths are read inline: this walk is on every call's path.
            tag = data[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = read_varint(data, pos)
            number, wtype = tag >> 3, tag & 7
            if wtype == LEN:
                if pos < end and data[pos] < 0x80:
                    size = data[pos]
                    pos += 1
                else:
                    size, pos = read_varint(data, pos)
                value_end = pos + size
                if number == 0:
                    raise WireError("field number 0 is invalid")
                if value_end > end:
                    if partial:
                        yield number, wtype, start, pos, end
                        return
                    raise WireError(f"field {number} claims {size} bytes, only {end - pos} left")
            else:
                value_end = _skip_value(data, pos, number, wtype)
        except WireError:
            if partial:
                return
            raise
        yield number, wtype, start, pos, value_end
        pos = value_end


def read_bytes(buf: bytes, field: int) -> bytes | None:
    """The last value of a top-level LEN field (string/bytes), or None when absent."""
    found: bytes | None = None
    for number, wtype, _, start, end in iter_fields(buf):
        if number == field:
            if wtype != LEN:
                raise WireError(f"field {field} has wire type {wtype}, expected length-delimited")
            found = buf[start:end]
    return found


def read_string(buf: bytes, field: int) -> str | None:
    """The last value of a top-level string field, or None when absent."""
    raw = read_bytes(buf, field)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"field {field} is not valid UTF-8") from exc


def read_message(buf: bytes, field: int) -> bytes | None:
    """The merged payload of a top-level embedded-message field, or None when absent."""
    parts: list[bytes] = []
    for number, wtype, _, start, end in iter_fields(buf):
        if number == field:
            if wtype != LEN:
                raise WireError(f"field {field} has wire type {wtype}, expected length-delimited")
            parts.append(buf[start:end])
    return b"".join(parts) if parts else None


def read_strings(buf: bytes, fields: tuple[int, ...]) -> dict[int, bytes]:
    """One pass over the top level: the last LEN payload of each of `fields` that is present."""
    out: dict[int, bytes] = {}
    for number, wtype, _, start, end in iter_fields(buf):
        if number in fields:
            if wtype != LEN:
                raise WireError(f"field {number} has wire type {wtype}, expected length-delimited")
            out[number] = buf[start:end]
    return out


def strip_field(buf: bytes, field: int) -> bytes:
    """The message without any occurrence of the top-level `field`."""
    return strip_fields(buf, (field,))


def strip_fields(buf: bytes, fields: Collection[int]) -> bytes:
    """The message without any occurrence of the top-level `fields`, other bytes untouched."""
    pieces: list[bytes] = []
    keep_from = 0
    for number, _, tag_start, _, end in iter_fields(buf):
        if number in fields:
            pieces.append(buf[keep_from:tag_start])
            keep_from = end
    if not pieces:
        return buf
    pieces.append(buf[keep_from:])
    return b"".join(pieces)


def encode_len_field(field: int, value: bytes) -> bytes:
    """Encode one length-delimited field (tag, length, payload)."""
    return encode_varint((field << 3) | LEN) + encode_varint(len(value)) + value


def replace_string(buf: bytes, field: int, value: str) -> bytes:
    """The message with every occurrence of top-level string `field` replaced by one `value`.

    The new field is appended at the end, which protobuf parsers accept in any order.
    """
    return strip_field(buf, field) + encode_len_field(field, value.encode("utf-8"))
