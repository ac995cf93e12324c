"""The compiled private forward as data: segments of SPU executables, jax-free.

Node processes load these from the owner's message and never import jax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import spu.libspu as libspu

# SPU variable names of the client's inputs (one-hot tokens, mask) and of the logits.
INPUT_NAMES = ("x:0", "x:1")
OUTPUT_NAME = "out:logits"
GROUPS = ("embedding", "linear", "attention_normaliser", "activation", "layernorm", "other")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One SPU executable: a run of consecutive ops of one group."""

    name: str
    group: str
    executable: bytes  # a serialized libspu.Executable
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    drop_after: tuple[str, ...]  # intermediates no later segment needs

    def load(self) -> libspu.Executable:
        exe = libspu.Executable()
        exe.ParseFromString(self.executable)
        return exe


@dataclasses.dataclass(frozen=True)
class CompiledForward:
    """A forward compiled for SPU: its segments, input names and output name.

    ``param_names`` are the SPU variable names of the flattened parameter leaves, in
    ``jax.tree_util`` order; the owner shares the weights under these names and the client its
    one-hot tokens and mask under ``input_names`` (shapes ``input_shapes``).
    """

    segments: tuple[Segment, ...]
    param_names: tuple[str, ...]
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_name: str
    output_shape: tuple[int, ...]
    compile_s: float
    attribution: str

    def to_wire(self) -> tuple[dict[str, Any], list[bytes]]:
        """JSON metadata plus one blob per executable."""
        meta = dataclasses.asdict(self)
        for seg in meta["segments"]:
            del seg["executable"]
        return meta, [s.executable for s in self.segments]

    @classmethod
    def from_wire(cls, meta: dict[str, Any], blobs: list[bytes]) -> CompiledForward:
        """Inverse of ``to_wire``."""
        segs = tuple(Segment(s["name"], s["group"], blob, tuple(s["input_names"]),
                             tuple(s["output_names"]), tuple(s["drop_after"]))
                     for s, blob in zip(meta["segments"], blobs, strict=True))
        return cls(segs, tuple(meta["param_names"]), tuple(meta["input_names"]),
                   tuple(tuple(s) for s in meta["input_shapes"]), meta["output_name"],
                   tuple(meta["output_shape"]), meta["compile_s"], meta["attribution"])


def program_digest(program: CompiledForward) -> str:
    """SHA-256 of everything a node runs: each segment's executable and wiring, the variable
    names and shapes. Compilation is deterministic (same SPU, jax and card give the same
    bytes), so a client can recompile from the public card and compare (``Client.verify``)."""
    h = hashlib.sha256()
    meta, blobs = program.to_wire()
    meta.pop("compile_s")
    h.update(json.dumps(meta, sort_keys=True).encode())
    for blob in blobs:
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()
