"""Streaming, sharded, atomic safetensors writer.

The tensors' names, dtypes and shapes are known before any data exists (a merge's
output has the base's layout), so every shard's header is written first and the
tensors are then streamed in order, one at a time: memory never holds more than the
tensor being written. Output goes to a temporary name that is renamed into place
only when everything is written, so an interrupted run leaves nothing half-written
where the user expects a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergeguard.checkpoint.paths import check_parents, make_parents
from mergeguard.checkpoint.reader import DTYPE_CODES
from mergeguard.errors import MergeguardError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MiB' / '123' -> bytes; None, 0 or 'none' -> no sharding."""
    if text is None or isinstance(text, int):
        return text or None
    t = text.strip()
    if t.lower() in ("", "none", "0"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", t)
    if not m or m.group(2).upper() not in _UNITS:
        raise MergeguardError(f"--shard-size {text!r} is not a size in bytes such as 5GB or 500MB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


_OURS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|README\.md|\..*")


def _ours(name: str) -> bool:
    """Files a mergeguard output folder holds (the only ones --overwrite may replace)."""
    return bool(_OURS.fullmatch(name))


def _shards(plan: Sequence[PlannedTensor], shard_size: int | None) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shard_size and shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class CheckpointWriter:
    """Write tensors in a fixed, pre-declared order to `out` (a `.safetensors` file or a folder).

    Use as a context manager: on leaving without `commit()` (error, Ctrl-C) the
    temporary output is removed and `out` is untouched.
    """

    def __init__(
        self,
        out: str | Path,
        plan: Sequence[PlannedTensor],
        metadata: dict[str, str] | None = None,
        *,
        shard_size: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out)
        self.plan = list(plan)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.single_file = self.out.suffix == ".safetensors"
        self.shards = _shards(self.plan, shard_size)
        if self.single_file and len(self.shards) > 1:
            raise MergeguardError(
                f"the output is larger than --shard-size and must be sharded; give a folder "
                f"instead of {self.out}."
            )
        if self.out.exists() and not overwrite:
            raise MergeguardError(f"{self.out} already exists; pass --overwrite to replace it.")
        if self.out.exists() and self.single_file and self.out.is_dir():
            raise MergeguardError(f"{self.out} is a folder; give a file path ending in .safetensors.")
        if self.out.is_dir():
            foreign = [p.name for p in self.out.iterdir() if not _ours(p.name)]
            if foreign:
                raise MergeguardError(
                    f"{self.out} holds files mergeguard did not write (e.g. {foreign[0]}); refusing to replace it."
                )
        if self.out.exists() and not self.single_file and not self.out.is_dir():
            raise MergeguardError(f"{self.out} is a file; give a folder, or a path ending in .safetensors.")
        check_parents(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._pos = 0
        self._shard_i = -1
        self._in_shard = 0
        self._file: BinaryIO | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the last write handed to the background thread
        self._names: list[str] = []
        self.extra_files: dict[str, str] = {}
        self.committed = False

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        make_parents(self.out)
        self._remove(self.tmp)
        if not self.single_file:
            self.tmp.mkdir()
        self._next_shard()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            try:
                self._close()
            except Exception:
                if exc_type is None:
                    raise
                # the error already on its way out is the one to report
            finally:
                self._remove(self.tmp)

    def _shard_name(self, i: int) -> str:
        if len(self.shards) == 1:
            return SINGLE_FILE
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _next_shard(self) -> None:
        self._close()
        self._shard_i += 1
        self._in_shard = 0
        path = self.tmp if self.single_file else self.tmp / self._shard_name(self._shard_i)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close
        self._file.write(_header(self.shards[self._shard_i], self.metadata))

    def _flush(self) -> None:
        """Wait for the background write in flight (and re-raise its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _close(self) -> None:
        self._flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    # -- writing ---------------------------------------------------------------------
    @property
    def next_name(self) -> str | None:
        return self.plan[self._pos].name if self._pos < len(self.plan) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (names must come in plan order)."""
        expected = self.plan[self._pos] if self._pos < len(self.plan) else None
        if expected is None or expected.name != name:
            raise ValueError(f"writer expected {expected and expected.name!r}, got {name!r}")
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ValueError(
                f"{name}: planned {expected.dtype} {expected.shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if self._in_shard == len(self.shards[self._shard_i]):
            self._next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert self._file is not None
        # The file write runs on a background thread (it releases the GIL), overlapping the
        # caller's next computation; one write is in flight at a time, so order is kept.
        self._flush()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeguard-write")
        self._pending = self._pool.submit(self._file.write, memoryview(data.numpy()))
        self._pos += 1
        self._in_shard += 1

    def commit(self) -> Path:
        """Finish: write the index and extra files, then move everything into place."""
        if self._pos != len(self.plan):
            raise ValueError(f"writer: {len(self.plan) - self._pos} planned tensors were never written")
        self._close()
        if not self.single_file:
            if len(self.shards) > 1:
                weight_map = {
                    t.name: self._shard_name(i) for i, shard in enumerate(self.shards) for t in shard
                }
                index = {
                    "metadata": {"total_size": sum(t.nbytes for t in self.plan), **self.metadata},
                    "weight_map": weight_map,
                }
                (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
            for fname, text in self.extra_files.items():
                (self.tmp / fname).write_text(text)
        self._replace()
        self.committed = True
        return self.out

    def _replace(self) -> None:
        if self.single_file or not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        self._remove(old)


def write_tensors(out: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  *, overwrite: bool = False, shard_size: int | None = None) -> Path:
    """Write a dict of in-memory tensors (small files: heads, triggers, encoders) atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(out, plan, metadata, shard_size=shard_size, overwrite=overwrite) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
        return writer.commit()


@contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """A folder to write a command's outputs into (OUT/.partial/outputs); when the block ends without an
    error, each file is renamed into OUT and OUT/.partial (with the run's checkpoint) removed. A killed
    run leaves OUT as it was, and its checkpoint, which `--resume` finishes from."""
    stage = out / ".partial" / "outputs"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    yield stage
    for item in sorted(stage.iterdir()):
        os.replace(item, out / item.name)
    shutil.rmtree(out / ".partial", ignore_errors=True)
