"""OC20 S2EF data: fairchem's raw downloads -> the LMDB folders our configs read.

Everything OC20-specific is fairchem's (imported, not copied): the archive links and split
sizes of ``fairchem.core.scripts.download_data``, ``uncompress`` for the ``.xz`` files,
``preprocess_ef`` for extxyz + txt -> LMDB (with ``--ref-energy``: OC20's published
normalisers in configs/s2ef/{200k,2M} describe referenced energies) and
``make_lmdb_sizes`` for the ``metadata.npz`` that the load-balancing sampler reads.
fairchem's own ``get_data`` is not used: it shells out without checking, reads its options
from ``sys.argv`` and writes straight into the final folders.

Raw layout (one archive per split, extracted as ``s2ef_train_2M/s2ef_train_2M/``): pairs
``<name>.extxyz`` (frames with energy, forces, tags, FixAtoms as ``move_mask``) and
``<name>.txt`` with one line per frame, ``random<sid>,frame<fid>,<reference energy>``
(or both ``.xz``-compressed). The test split ships as LMDBs
(``s2ef_test_lmdbs/test_data/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}``).

The raw files are checked before anything is written (pairs complete, every txt line
parsed, one line per extxyz frame); LMDBs and metadata are written into a staging folder
and moved into place at the end (``staged_outputs``), so a failure leaves no output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import urllib.request
import warnings
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from fairchem.core.scripts import download_data, make_lmdb_sizes, preprocess_ef, uncompress

from ocp_deq.data.lmdb_io import staged_outputs

SPLITS = tuple(download_data.DOWNLOAD_LINKS_s2ef["s2ef"])
TRAIN_SPLITS = ("200k", "2M", "20M", "all", "rattled", "md")  # fairchem: s2ef/<split>/train
TEST_SPLITS = ("test_id", "test_ood_ads", "test_ood_cat", "test_ood_both")


class RawDataError(ValueError):
    """A raw folder fairchem's preprocessing cannot use: the message names the file and what is wrong."""


def output_folders(split: str, data_dir: str | Path = "data") -> list[Path]:
    """Where fairchem's layout (and so our configs' ``dataset.*.src``) puts ``split``."""
    s2ef = Path(data_dir) / "s2ef"
    if split == "test":
        return [s2ef / "all" / name for name in TEST_SPLITS]
    return [s2ef / split / "train"] if split in TRAIN_SPLITS else [s2ef / "all" / split]


def download(split: str, download_dir: str | Path) -> Path:
    """Fetch fairchem's archive of ``split`` (reused if already there) and extract it; returns
    the extracted folder."""
    url = download_data.DOWNLOAD_LINKS_s2ef["s2ef"][split]
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    archive = download_dir / os.path.basename(url)
    if archive.exists():
        print(f"using the downloaded {archive}", flush=True)
    else:
        print(f"downloading {url} -> {archive}", flush=True)
        partial = archive.with_name(archive.name + ".part")
        try:
            urllib.request.urlretrieve(url, partial, reporthook=_Progress())
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OSError(f"downloading {url} failed: {err}") from err
        os.replace(partial, archive)
    print(f"extracting {archive}", flush=True)
    with tarfile.open(archive) as tar:
        tar.extractall(download_dir, filter="data")
    return download_dir / archive.name.split(".")[0]


class _Progress:
    """urlretrieve hook printing every 5% (the archives are GBs)."""

    def __init__(self):
        self.shown = -1

    def __call__(self, blocks: int, block_size: int, total: int):
        percent = min(100, blocks * block_size * 100 // total) if total > 0 else 0
        if percent // 5 > self.shown:
            self.shown = percent // 5
            print(f"  {percent}% of {total / 1e9:.2f} GB", flush=True)


def count_frames(path: Path) -> int:
    """Frames in an extxyz file, by its atom-count lines (no parsing: 2M-frame splits)."""
    frames, lineno = 0, 0
    with open(path, "rb") as handle:
        for line in handle:
            lineno += 1
            if not line.strip():
                continue
            try:
                natoms = int(line)
            except ValueError:
                raise RawDataError(f"{path} line {lineno}: expected the atom count of frame {frames}, "
                                   f"found {line[:60]!r}") from None
            body = sum(1 for _ in islice(handle, natoms + 1))
            lineno += body
            if body < natoms + 1:
                raise RawDataError(f"{path}: frame {frames} is truncated ({max(body - 1, 0)} of {natoms} atom lines)")
            frames += 1
    return frames


def _txt_line_ok(line: str) -> bool:
    """The fields fairchem's preprocessing reads: ``random<sid>``, ``frame<fid>``, the reference energy."""
    fields = line.split(",")
    try:
        int(fields[0].split("random")[1]), int(fields[1].split("frame")[1]), float(fields[2])
    except (IndexError, ValueError):
        return False
    return True


def _check_pair(txt: Path) -> int:
    """One txt file against its extxyz: every line parses, one line per frame."""
    lines = txt.read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not _txt_line_ok(line):
            raise RawDataError(f"{txt} line {lineno}: {line[:80]!r} is not "
                               "'random<sid>,frame<fid>,<reference energy>'")
    extxyz = txt.with_suffix(".extxyz")
    frames = count_frames(extxyz)
    if frames != len(lines):
        raise RawDataError(f"{txt} has {len(lines)} lines but {extxyz} has {frames} frames "
                           "(one line per frame: the txt and the extxyz do not belong together)")
    return frames


def check_raw(folder: Path, workers: int = 2) -> int:
    """Check the extxyz + txt pairs of ``folder`` (:class:`RawDataError` if unusable); returns the frame count."""
    txts, extxyzs = sorted(folder.glob("*.txt")), sorted(folder.glob("*.extxyz"))
    if not txts:
        raise RawDataError(f"{folder}: no *.txt files (a raw S2EF folder holds <name>.extxyz + <name>.txt "
                           "pairs, or their .xz files)")
    for missing, have, kind in ((set(t.with_suffix(".extxyz") for t in txts) - set(extxyzs), "txt", "extxyz"),
                                (set(x.with_suffix(".txt") for x in extxyzs) - set(txts), "extxyz", "txt")):
        if missing:
            names = ", ".join(sorted(p.name for p in missing)[:5]) + (", ..." if len(missing) > 5 else "")
            raise RawDataError(f"{folder}: {len(missing)} {kind} file(s) missing for their {have} file: {names}")
    with Pool(min(workers, len(txts))) as pool:
        return sum(pool.map(_check_pair, txts))


def _fairchem_args(parser, **options):
    """Namespace of a fairchem script's parser from keyword options (flags for True)."""
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def write_sizes(folder: Path, workers: int = 2) -> None:
    """fairchem's ``metadata.npz`` (atom counts per frame) for an LMDB folder."""
    try:
        with warnings.catch_warnings():  # we store no edges: atom-wise balancing is what the configs use
            warnings.filterwarnings("ignore", message="edge_index information not found")
            make_lmdb_sizes.make_lmdb_sizes(_fairchem_args(make_lmdb_sizes.get_lmdb_sizes_parser(),
                                                           data_path=folder, num_workers=workers))
    finally:  # fairchem keeps the dataset in a module global: its open LMDBs would block reopening them here
        make_lmdb_sizes.dataset = None


@contextlib.contextmanager
def _staged(outputs: list[Path]):
    """``staged_outputs`` for sibling folders; on failure also removes the (empty) parents it created."""
    parent = outputs[0].parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        with staged_outputs(parent, [p.name for p in outputs]) as stage:
            yield stage
    except BaseException:
        for folder in created:
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _raw_folder(raw: Path, patterns: tuple[str, ...]) -> Path:
    """``raw``, or the same-name folder fairchem's archives nest inside it, whichever holds ``patterns``."""
    for folder in (raw, raw / raw.name):
        if any(any(folder.glob(p)) for p in patterns):
            return folder
    raise RawDataError(f"{raw}: no {' or '.join(patterns)} files here or in {raw / raw.name} "
                       "(give the extracted S2EF archive folder)")


def _prepare_raw(raw: Path, output: Path, workers: int, expected: int | None, keep: bool) -> int:
    folder = _raw_folder(raw, ("*.txt", "*.txt.xz"))
    unpacked = None
    if not any(folder.glob("*.txt")):
        unpacked = folder.with_name(folder.name + "_uncompressed")
        print(f"uncompressing {folder} -> {unpacked}", flush=True)
        uncompress.main(_fairchem_args(uncompress.get_parser(), ipdir=folder, opdir=unpacked, num_workers=workers))
        folder = unpacked
    print(f"checking {folder}", flush=True)
    frames = check_raw(folder, workers)
    if expected is not None and frames != expected:
        raise RawDataError(f"{folder}: {frames} frames, but fairchem's split has {expected} (incomplete download?)")
    print(f"{frames} frames in {len(list(folder.glob('*.txt')))} files; writing LMDBs", flush=True)
    with _staged([output]) as stage:
        staged = stage / output.name
        preprocess_ef.main(_fairchem_args(preprocess_ef.get_parser(), data_path=folder, out_path=staged,
                                          num_workers=workers, ref_energy=True))
        print("writing metadata.npz", flush=True)
        write_sizes(staged, workers)
        written = len(np.load(staged / "metadata.npz")["natoms"])
        if written != frames:
            raise RawDataError(f"{folder}: fairchem's preprocessing wrote {written} of {frames} frames")
    if unpacked is not None and not keep:
        shutil.rmtree(unpacked)
    return frames


def _prepare_test(raw: Path, outputs: list[Path], workers: int) -> int:
    candidates = (raw, raw / "test_data" / "s2ef" / "all")
    folder = next((c for c in candidates if (c / TEST_SPLITS[0]).is_dir()), raw)
    missing = [name for name in TEST_SPLITS if not any((folder / name).glob("*.lmdb"))]
    if missing:
        raise RawDataError(f"{folder}: no *.lmdb files in {', '.join(missing)} (expected the folders "
                           f"{', '.join(TEST_SPLITS)} of fairchem's s2ef_test_lmdbs archive)")
    with _staged(outputs) as stage:
        for name in TEST_SPLITS:
            print(f"copying {folder / name}", flush=True)
            shutil.copytree(folder / name, stage / name)
            if not (stage / name / "metadata.npz").exists():
                print(f"writing {name}/metadata.npz", flush=True)
                write_sizes(stage / name, workers)
    return sum(len(np.load(out / "metadata.npz")["natoms"]) for out in outputs)


def prepare(split: str, data_dir: str | Path = "data", raw: str | Path | None = None,
            download_dir: str | Path | None = None, workers: int = 2, overwrite: bool = False,
            keep: bool = False) -> list[Path]:
    """Put S2EF ``split`` where the configs read it, from the raw folder ``raw`` or, without
    it, from fairchem's download. Downloads (and uncompressed copies of ``.xz`` files) are
    removed after success unless ``keep``. Returns the output folders."""
    if split not in SPLITS:
        raise ValueError(f"unknown S2EF split {split!r} (fairchem's: {', '.join(SPLITS)})")
    outputs = output_folders(split, data_dir)
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s) (--overwrite replaces)")
    download_dir = Path(download_dir or Path(data_dir) / "downloads")
    extracted = download(split, download_dir) if raw is None else Path(raw)
    if not extracted.is_dir():
        raise RawDataError(f"{extracted}: no such folder")
    if split == "test":
        frames = _prepare_test(extracted, outputs, workers)
    else:
        expected = download_data.S2EF_COUNTS["s2ef"][split] if raw is None else None
        frames = _prepare_raw(extracted, outputs[0], workers, expected, keep)
    if raw is None and not keep:
        shutil.rmtree(extracted)
        (download_dir / os.path.basename(download_data.DOWNLOAD_LINKS_s2ef["s2ef"][split])).unlink()
    print(f"{split}: {frames} frames -> {', '.join(map(str, outputs))}", flush=True)
    return outputs
