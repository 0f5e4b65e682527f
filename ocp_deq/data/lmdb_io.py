"""Read and write LMDBs in the layout fairchem's ``LmdbDataset`` reads.

Keys are ascii integers "0".."N-1" plus a pickled ``length`` key; values are pickled
``torch_geometric.data.Data``. Writing goes to a temporary file renamed into place at the
end, so a failed write never leaves a partial LMDB behind; a split folder also gets the
``metadata.npz`` (atom counts) that fairchem's load-balancing sampler reads, and whole sets
of outputs are written beside the old ones and swapped in together (:func:`staged_outputs`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np
import torch

_MAP_SIZE = 1 << 40  # sparse file: only what is written takes disk space


def write_lmdb(path: str | Path, frames: Iterable) -> int:
    """Write ``frames`` (Data objects) to the LMDB file ``path``; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        env = lmdb.open(str(tmp), subdir=False, map_size=_MAP_SIZE, meminit=False, map_async=True)
        with env.begin(write=True) as txn:
            for count, frame in enumerate(frames, start=1):
                txn.put(str(count - 1).encode("ascii"), pickle.dumps(frame, protocol=-1))
            txn.put(b"length", pickle.dumps(count, protocol=-1))
        env.sync()
        env.close()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-lock")):
            if leftover.exists():
                leftover.unlink()
    return count


def write_split(folder: str | Path, frames: list) -> int:
    """``folder/data.lmdb`` and ``folder/metadata.npz`` (natoms per frame, in key order)."""
    folder = Path(folder)
    count = write_lmdb(folder / "data.lmdb", frames)
    np.savez(folder / "metadata.npz", natoms=np.array([int(frame.natoms) for frame in frames], dtype=np.int64))
    return count


@contextlib.contextmanager
def staged_outputs(folder: str | Path, names: Iterable[str]):
    """Write the outputs ``names`` (files or folders) of ``folder`` into a staging folder
    (yielded); only when the block completes are they swapped in together, the old ones
    removed. If it fails, the old outputs stay as they were and nothing new is left."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=folder))
    for name in names:
        if (folder / name).exists():
            os.rename(folder / name, replaced / name)
    for name in names:
        if (stage / name).exists():
            os.rename(stage / name, folder / name)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


class UnsafeFrameError(pickle.UnpicklingError, ValueError):
    """An LMDB value that asks to unpickle something a PyG ``Data`` frame never holds."""


class LMDBFileError(ValueError):
    """A file that is not LMDB, or is truncated (the message names it)."""


def check_lmdb_file(path: Path) -> None:
    """Open an LMDB file as fairchem will, and refuse one that is not LMDB or is truncated,
    before anything reads it (reading a truncated file's missing pages kills the process
    with SIGBUS, without a message)."""
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_readers=1)
    except lmdb.Error as error:
        raise LMDBFileError(f"'{path}' is not a readable LMDB file ({error})") from None
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = Path(path).stat().st_size
        if size < needed:
            raise LMDBFileError(f"LMDB file '{path}' is truncated: {size} bytes, its pages need {needed}")
    finally:
        env.close()


def _load_storage(data: bytes):
    # torch.storage._load_from_bytes would torch.load these bytes with weights_only=False
    return torch.load(io.BytesIO(data), weights_only=True)


class FrameUnpickler(pickle.Unpickler):
    """Unpickles what a PyG ``Data`` frame is made of and nothing else: a crafted LMDB value
    cannot run code."""

    ALLOWED = {
        ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"), ("torch", "Size"), ("builtins", "set"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # PyG Data and its storages (classes only: functions of torch_geometric.data such as
        # download_url or extract_zip would run with the pickle's arguments)
        ("torch_geometric.data.data", "Data"), ("torch_geometric.data.data", "DataEdgeAttr"),
        ("torch_geometric.data.data", "DataTensorAttr"), ("torch_geometric.data.storage", "GlobalStorage"),
        ("torch_geometric.data.storage", "NodeStorage"), ("torch_geometric.data.storage", "EdgeStorage"),
    }

    def __init__(self, file, where: str = "LMDB value"):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafeFrameError(f"{self.where}: refusing to unpickle {module}.{name} (not part of a PyG Data frame)")


def load_frame(raw: bytes, where: str = "LMDB value"):
    """One pickled LMDB value (a frame, or the ``length``), through :class:`FrameUnpickler`."""
    return FrameUnpickler(io.BytesIO(raw), where).load()


def read_lmdb(path: str | Path) -> list:
    """All frames of one LMDB file (or of every ``*.lmdb`` in a folder), in key order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.lmdb"))
    if not files:
        raise FileNotFoundError(f"no LMDB file at '{path}'")
    frames = []
    for file in files:
        check_lmdb_file(file)
        env = lmdb.open(str(file), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            raw = txn.get(b"length")
            length = load_frame(raw, f"{file} key 'length'") if raw is not None else env.stat()["entries"]
            frames.extend(load_frame(txn.get(str(i).encode("ascii")), f"{file} key '{i}'") for i in range(length))
        env.close()
    return frames
