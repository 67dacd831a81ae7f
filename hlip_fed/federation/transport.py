"""How a site's trained arrays travel to the server: fp32, fp16 or bf16, weights or deltas.

A site's reply is the bulk of a round's traffic (2.25 MB for the tiny model, 349 MB for the ViT-B
preset, per site and round). ``federation.transport`` halves it:

* ``fp32``: the arrays as trained (the default; nothing is encoded or decoded),
* ``fp16``: IEEE half precision, round-to-nearest-even. Its range ends at 65504: an array that a
  site cannot represent fails on the site with a message, instead of arriving as ``inf`` and being
  rejected by the server's screening,
* ``bf16``: bfloat16, fp32's range with 8 mantissa bits. Flower's ``Array`` serialises through
  numpy, which has no bfloat16, so bf16 travels as its **uint16 bit pattern** (the upper half of
  the fp32 word, rounded to nearest even by torch). The wire dtype is therefore ``uint16``; that is
  what the site's audit log records.

With ``federation.send_deltas`` the site sends Δ = w_site − w_global (computed in fp32, then
encoded) instead of its weights. An update is far smaller than the weights it changes, so the
rounding error of fp16/bf16 is relative to the update, not to the weight (and bf16 weights alone
cannot even express an update smaller than 1/256 of a weight). In fp32, Δ reconstructs the site's
weights exactly whenever site and global weight are within a factor of two of each other (Sterbenz:
the subtraction is then exact), otherwise within one fp32 rounding.

Only the uplink is compressed: the ServerApp sends the global arrays in fp32, so every site starts
from the exact global model and the server can add the same global model back to a delta. (A
compressed downlink would round the global model every round, and updates smaller than its rounding
step would be lost.)

Nothing travels to say how arrays are encoded: the codec is part of the run config, which the server
and every site read alike. The server decodes every reply (:func:`decode_replies`: cast to fp32, add
the global model back for deltas) **before** screening and aggregation, so shape, finiteness and
update-norm screening, FedAvg and FedOpt all see fp32 weights. A reply whose arrays do not carry the
run's wire dtype is rejected by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from hlip_fed.errors import HlipError
from hlip_fed.federation.screen import Rejection

TRANSPORTS = ("fp32", "fp16", "bf16")
WIRE_DTYPE = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


def _check(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise HlipError(f"federation.transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")


def _fp32(value) -> np.ndarray:
    """A C-contiguous fp32 numpy copy-or-view of a tensor or array (0-d stays 0-d)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    return np.array(value, dtype=np.float32, order="C", copy=None)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 -> bfloat16 bit patterns as uint16 (torch's round-to-nearest-even, NaN kept NaN)."""
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> fp32 (exact: bf16 is the upper half of an fp32 word)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def wire_bytes(arrays: Mapping[str, object], transport: str) -> int:
    """Payload bytes of ``arrays`` (tensors or numpy arrays) once encoded for ``transport``."""
    _check(transport)
    size = WIRE_DTYPE[transport].itemsize
    return int(sum(int(np.prod(tuple(v.shape), dtype=np.int64)) * size for v in arrays.values()))


def encode_arrays(
    arrays: Mapping[str, object],
    reference: Mapping[str, object] | None,
    transport: str,
    deltas: bool = False,
) -> dict[str, np.ndarray]:
    """What a site sends: ``arrays`` (or ``arrays - reference`` with ``deltas``) in the wire dtype.

    ``reference`` is the global model the site received this round (needed for deltas only).
    Raises :class:`HlipError` when a finite value does not fit the wire dtype (fp16 beyond 65504),
    so the site learns why instead of the server rejecting an ``inf``. Non-finite values (a
    diverged site) are sent as they are; the server's screening rejects them.
    """
    _check(transport)
    if deltas and reference is None:
        raise HlipError("federation.send_deltas: the site has no global model to take the update from")
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        x = _fp32(value)
        if deltas:
            if key not in reference:
                raise HlipError(f"federation.send_deltas: array {key!r} is not in the global model received")
            ref = _fp32(reference[key])
            if ref.shape != x.shape:
                raise HlipError(f"federation.send_deltas: array {key!r} has shape {x.shape}, global {ref.shape}")
            x = np.asarray(x - ref, dtype=np.float32)  # 0-d arithmetic yields a numpy scalar
        if transport == "fp32":
            out[key] = x
            continue
        with np.errstate(over="ignore"):
            wire = x.astype(np.float16) if transport == "fp16" else _bf16_bits(x)
        back = wire.astype(np.float32) if transport == "fp16" else _from_bf16_bits(wire)
        overflow = np.isfinite(x) & ~np.isfinite(back)
        if overflow.any():
            worst = float(np.abs(x[overflow]).max())
            what = "update" if deltas else "array"
            raise HlipError(f"federation.transport={transport}: {what} {key!r} holds {worst:.4g}, beyond "
                            f"{transport}'s range; use bf16 or fp32")
        out[key] = wire
    return out


def decode_arrays(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    transport: str,
    deltas: bool = False,
) -> dict[str, np.ndarray]:
    """fp32 weights from arrays in the wire dtype: the inverse of :func:`encode_arrays`.

    Raises :class:`HlipError` for an array that is not in the wire dtype, or (deltas) not in the
    ``reference`` with the same shape.
    """
    _check(transport)
    wire = WIRE_DTYPE[transport]
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype != wire:
            raise HlipError(f"array {key!r} travels as {value.dtype}, but federation.transport={transport} "
                            f"sends {wire}")
        x = _from_bf16_bits(value) if transport == "bf16" else value.astype(np.float32)
        if deltas:
            if reference is None or key not in reference:
                raise HlipError(f"update {key!r} has no global array to be added to")
            ref = np.asarray(reference[key], dtype=np.float32)
            if ref.shape != x.shape:
                raise HlipError(f"update {key!r} has shape {x.shape}, the global array {ref.shape}")
            x = np.asarray(ref + x, dtype=np.float32)
        out[key] = np.array(x, dtype=np.float32, order="C", copy=None)
    return out


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, kept in the dtype given (uint16 for bf16 bit patterns)."""
    return ArrayRecord({k: Array(np.array(v, order="C", copy=None)) for k, v in arrays.items()})


def decode_replies(
    replies: list[Message],
    reference: Mapping[str, np.ndarray] | None,
    transport: str,
    deltas: bool = False,
    node_of: Callable[[Message], int] | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """Training replies with their arrays decoded to fp32 weights, and the replies that could not be.

    ``reference`` is the global model sent this round (the server's fp32 arrays). With the default
    transport (fp32 weights) the replies are returned as they are. Otherwise each reply with
    exactly one ArrayRecord gets a copy with that record decoded; replies of another form (errors,
    no or several ArrayRecords) pass through untouched for :func:`screen_replies` to reject with
    its own reason, and so do arrays it will reject anyway (unknown keys, wrong shapes). A reply
    with an array in another dtype than the wire dtype is rejected here. The received messages
    are not modified, so what a site sent stays available as sent.
    """
    _check(transport)
    if transport == "fp32" and not deltas:
        return list(replies), []
    if deltas and not reference:
        raise HlipError("federation.send_deltas: the server has no global model to add the updates to")
    node_of = node_of or (lambda m: m.metadata.src_node_id)
    decoded: list[Message] = []
    rejected: list[Rejection] = []
    for msg in replies:
        if msg.has_error() or len(msg.content.array_records) != 1:
            decoded.append(msg)
            continue
        (name, record), = msg.content.array_records.items()
        arrays = {}
        for key, array in record.items():
            values = array.numpy()
            known = reference is not None and key in reference and tuple(np.shape(reference[key])) == values.shape
            arrays[key] = (values, known or not deltas)
        try:
            plain = decode_arrays({k: v for k, (v, ok) in arrays.items() if ok}, reference, transport, deltas)
        except HlipError as exc:
            rejected.append(Rejection(node_of(msg), str(exc)))
            continue
        out = ArrayRecord({k: Array(plain[k]) if ok else record[k] for k, (_, ok) in arrays.items()})
        content = RecordDict({n: out if n == name else rec for n, rec in msg.content.items()})
        decoded.append(Message(content=content, metadata=msg.metadata))
    return decoded, rejected
