"""Lazy, per-tensor reads of safetensors checkpoints (single file or shards).

The header is parsed once; each tensor is read with a positional read into a fresh
buffer when asked for. Nothing is memory-mapped, so resident memory holds only the
tensors the caller keeps alive, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeguard.errors import MergeguardError

# safetensors dtype codes <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

KIND_KEY = "mergeguard.kind"
PARTIAL_KEY = "mergeguard.partial"
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0  # absolute byte offset of the data in `file`
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: tensor infos (file order) and `__metadata__`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise MergeguardError(f"{path} is empty or truncated: it is not a safetensors file.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise MergeguardError(f"{path} is truncated or is not a safetensors file.")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise MergeguardError(f"cannot read {path}: {exc.strerror or exc}.") from exc
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise MergeguardError(f"{path} is corrupt: its safetensors header is not valid JSON.") from exc

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergeguardError(f"{path} is corrupt: its __metadata__ is not a mapping of strings.")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in spec["shape"]):
                raise ValueError("bad shape")
            shape = tuple(spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeguardError(
                f"{path} is corrupt or uses an unsupported dtype: tensor {name!r} has header {spec!r}."
            ) from exc
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or begin < 0:
            raise MergeguardError(f"{path} is corrupt: tensor {name!r} has inconsistent offsets.")
        if end > data_len:
            raise MergeguardError(
                f"{path} is truncated: tensor {name!r} ends past the end of the file "
                f"({data_start + end} > {size} bytes)."
            )
        entries.append((begin, name, dtype, shape, end - begin))
    entries.sort(key=lambda e: e[0])
    position = 0
    for begin, name, _, _, nbytes in entries:  # tensors must tile the data region, as safetensors requires
        if begin != position:
            raise MergeguardError(f"{path} is corrupt: tensor {name!r} overlaps another or leaves a gap.")
        position = begin + nbytes
    infos = {
        name: TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
        for begin, name, dtype, shape, nbytes in entries
    }
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from its file into a new CPU tensor."""
    assert info.file is not None
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        view = memoryview(buf.numpy())
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:]], info.offset + done)
                if n <= 0:
                    raise MergeguardError(f"{info.file} is truncated: tensor {info.name!r} is cut short.")
                done += n
        except OSError as exc:
            raise MergeguardError(f"cannot read {info.file}: {exc.strerror or exc}.") from exc
        finally:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


@dataclass
class Checkpoint:
    """A set of named tensors from one source, read lazily, with its metadata and provenance.

    `spec` is what the user typed; `provenance` says where it resolved to (path and
    digest, or Hub repo and commit); `adapter_config` is set for PEFT LoRA adapters.
    """

    spec: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    adapter_config: dict | None = None
    _tensors: dict[str, torch.Tensor] | None = None  # in-memory sources (pickles)

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk now."""
        if self._tensors is not None:
            return self._tensors[name]
        return read_tensor(self.infos[name])

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.get(name)

    @property
    def reads_fresh(self) -> bool:
        """True when `get` returns a new tensor each call (read from disk), which callers may modify."""
        return self._tensors is None

    @property
    def kind(self) -> str:
        """'task_vector', 'lora_adapter' or 'model'."""
        if self.adapter_config is not None:
            return "lora_adapter"
        return self.metadata.get(KIND_KEY, "model")

    @property
    def is_task_vector(self) -> bool:
        return self.kind == "task_vector"

    @property
    def is_partial(self) -> bool:
        """A partial task vector (from a LoRA adapter): absent tensors mean a zero delta."""
        return self.metadata.get(PARTIAL_KEY) == "true"

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @property
    def label(self) -> str:
        """A short name for messages and tables."""
        return self.spec


def from_tensors(spec: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 provenance: dict | None = None) -> Checkpoint:
    """Wrap tensors already in memory (e.g. a pickle loaded on request) as a Checkpoint."""
    infos = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise MergeguardError(f"{spec}: entry {name!r} is not a tensor.")
        infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), None, 0, t.numel() * t.element_size())
    return Checkpoint(spec, infos, dict(metadata or {}), [], dict(provenance or {}), None, dict(tensors))
