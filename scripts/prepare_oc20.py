"""Prepare an OC20 S2EF split in the folders the configs read (fairchem's layout under --data-dir).

    python scripts/prepare_oc20.py --split 2M --download        # -> data/s2ef/2M/train/
    python scripts/prepare_oc20.py --split val_id --download    # -> data/s2ef/all/val_id/
    python scripts/prepare_oc20.py --split test --download      # -> data/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}/
    python scripts/prepare_oc20.py --split 200k --raw ~/oc20/s2ef_train_200K   # an extracted archive

fairchem's preprocessing (preprocess_ef with --ref-energy: referenced energies, as the
configs' normalisers assume) writes data.NNNN.lmdb per worker, and make_lmdb_sizes the
metadata.npz the load-balancing sampler reads. A raw folder holds <name>.extxyz + <name>.txt
pairs (or their .xz files, uncompressed next to it into <folder>_uncompressed); the test
split is fairchem's LMDB archive. Everything is checked first and written into a staging
folder moved into place at the end: on an error (exit 2) nothing is left half written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ocp_deq  # noqa: E402,F401  (before fairchem: stand-ins)
from ocp_deq.data.oc20 import SPLITS, RawDataError, prepare  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, choices=SPLITS, help="fairchem's S2EF split name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--download", action="store_true", help="fetch fairchem's archive of the split")
    source.add_argument("--raw", metavar="DIR", help="an already downloaded and extracted archive folder")
    parser.add_argument("--data-dir", default="data", help="root of the output layout (default: data)")
    parser.add_argument("--download-dir", metavar="DIR", help="archives go here (default: <data-dir>/downloads)")
    parser.add_argument("--workers", type=int, default=2, help="processes (and LMDB files) of the "
                        "preprocessing (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    parser.add_argument("--keep", action="store_true", help="keep downloads and uncompressed raw files")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prepare(args.split, data_dir=args.data_dir, raw=args.raw, download_dir=args.download_dir,
                workers=args.workers, overwrite=args.overwrite, keep=args.keep)
    except (RawDataError, OSError) as err:  # OSError: FileExistsError, download and disk errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
