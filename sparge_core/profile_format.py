"""Reading a profile file: the safetensors bytes, checked before anything is built from them.

A profile is a file a user may download from anyone, so this module is strict on purpose: it must
never execute or trust file content. Nothing is unpickled (a pickle / torch.save file is refused
by its first bytes), the header is parsed as plain JSON and checked (length field, JSON object,
string-to-string metadata, tensor offsets inside the file) before safetensors' own parser sees
the bytes, and anything oversized is refused unread. Every problem is a ValueError whose message
names the file and says what is wrong (truncated, a pickle, a corrupt header...); what the
metadata and tensors MEAN is checked by SpargeProfile (profiles.py).
"""
from __future__ import annotations

import json
import os
import struct
from typing import NoReturn

MAX_FILE_BYTES = 64 << 20  # profiles are a few KB; refuse to read anything huge


def fail(path, msg: str) -> NoReturn:
    """Raise the ValueError of a bad profile: 'Sparge profile <path>: <msg>' (path may be None)."""
    where = f"{path}: " if path is not None else ""
    raise ValueError(f"Sparge profile {where}{msg}")


def read_bytes(path) -> bytes:
    """The whole file, refused unread when it is larger than a profile can be."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            fail(path, f"file is {size} bytes; a profile is a few KB (refusing to read it)")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(path, f"cannot read the file ({e.strerror or e})")


def meta_int(meta: dict, name: str, path) -> int:
    """Metadata value `name` as an int (metadata values are strings)."""
    raw = meta.get(name)
    if raw is None:
        fail(path, f"metadata {name!r} is missing")
    try:
        return int(raw)
    except (TypeError, ValueError):
        fail(path, f"metadata {name!r} must be an integer, got {raw!r}")


def parse_header(data: bytes, path):
    """The safetensors header (8-byte little-endian length + JSON), checked before the tensor
    parser sees the file, for clear messages. Nothing here can execute file content."""
    if data[:1] == b"\x80" or data[:2] == b"PK":
        fail(path, "this is a pickle / torch.save file, not safetensors (it was NOT loaded: pickles can run code)")
    if len(data) < 8:
        fail(path, f"file is truncated ({len(data)} bytes; a safetensors file starts with an 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        if n > MAX_FILE_BYTES:
            fail(path, "not a safetensors file (the header length field is implausible)")
        fail(path, f"file is truncated (header needs {n} bytes, only {len(data) - 8} present)")
    raw = data[8:8 + n]
    if not raw.lstrip().startswith(b"{"):
        fail(path, "not a safetensors file (no JSON header)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        fail(path, "not a safetensors file or corrupt header (header is not valid JSON)")
    if not isinstance(header, dict):
        fail(path, "corrupt header (not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        fail(path, "corrupt header (__metadata__ must map strings to strings)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            fail(path, f"corrupt header entry for tensor {name!r}")
        end = max(end, offs[1])
    if 8 + n + end > len(data):
        fail(path, f"file is truncated (tensor data needs {8 + n + end} bytes, the file has {len(data)})")
    return header, meta


def load_tensors(data: bytes, path) -> dict:
    """name -> tensor, by safetensors' own parser (never torch.load / pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        fail(path, f"the safetensors parser rejected the file ({e})")
