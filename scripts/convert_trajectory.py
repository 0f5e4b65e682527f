"""Convert one MD trajectory (sGDML .npz, extended XYZ, ASE .traj or .db) into OCP LMDBs.

    python scripts/convert_trajectory.py md17_aspirin.npz -o data/md17/aspirin            # 950/50/rest, random
    python scripts/convert_trajectory.py run.xyz -o data/run --split ordered --train 800 --val 100 --test 100
    python scripts/convert_trajectory.py rmd17_aspirin.npz -o data/rmd17/aspirin --positions-key coords \\
        --numbers-key nuclear_charges --energy-key energies --forces-key forces --energy-unit kcal/mol

Writes OUT/train/data.lmdb, OUT/val/data.lmdb, OUT/test/data.lmdb (point a fairchem config's
dataset.{train,val,test}.src at those folders) and OUT/conversion.json. Split modes and
fields: see ocp_deq/data/splits.py and ocp_deq/data/converters.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ocp_deq  # noqa: E402,F401  (before fairchem / torch_geometric: stand-ins)
from ocp_deq.data.converters import FORMATS, ConversionError, convert_trajectory  # noqa: E402
from ocp_deq.data.splits import SPLIT_MODES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="trajectory file")
    parser.add_argument("-o", "--out", required=True, help="output folder (gets train/ val/ test/)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="default: from the extension")
    parser.add_argument("--split", choices=SPLIT_MODES, default="random")
    parser.add_argument("--train", type=int, default=950, help="training frames (default 950)")
    parser.add_argument("--val", type=int, default=50, help="validation frames (default 50)")
    parser.add_argument("--test", type=int, default=None, help="test frames (default: all the rest)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (random / overlapping)")
    parser.add_argument("--sid", default="0", help="system id of the trajectory (an integer, or a name)")
    parser.add_argument("--energy-unit", help="eV, meV, kcal/mol, kJ/mol, Hartree, Ry (default: the npz's "
                        "e_unit, else eV)")
    parser.add_argument("--force-unit", help="<energy>/<length>, e.g. kcal/mol/Ang (default: energy/length)")
    parser.add_argument("--length-unit", help="Ang, Bohr, nm (default: the npz's r_unit, else Ang)")
    for name, npz_key in (("positions", "R"), ("numbers", "z"), ("energy", "E"), ("forces", "F"), ("cell", "lattice")):
        ase_note = f"; ASE sources: default '{name}'" if name in ("energy", "forces") else ""
        parser.add_argument(f"--{name}-key", help=f"npz key of the {name} (default '{npz_key}'){ase_note}")
    parser.add_argument("--overwrite", action="store_true", help="replace existing LMDBs in OUT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    keys = {name: getattr(args, f"{name}_key") for name in ("positions", "numbers", "energy", "forces", "cell")}
    keys = {name: key for name, key in keys.items() if key is not None}
    sid = int(args.sid) if args.sid.lstrip("-").isdigit() else args.sid
    try:
        record = convert_trajectory(
            args.input, args.out, fmt=None if args.format == "auto" else args.format, split=args.split,
            n_train=args.train, n_val=args.val, n_test=args.test, seed=args.seed, sid=sid, keys=keys,
            energy_unit=args.energy_unit, force_unit=args.force_unit, length_unit=args.length_unit,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    units, factors = record["units"], record["factors_to_eV_A"]
    print(f"read {record['frames']} frames from {record['source']} ({record['format']}), sid {record['sid']!r}")
    print(f"units: energy {units['energy']} (x{factors['energy']:.6g} -> eV), forces {units['forces']} "
          f"(x{factors['forces']:.6g} -> eV/A), positions {units['length']} (x{factors['length']:.6g} -> A)")
    split = record["split"]
    print(f"split: {split['mode']}, seed {split['seed']}")
    for name, entry in record["written"].items():
        if entry["path"] is None:
            print(f"  {name:5s}: 0 frames (not written)")
            continue
        fids = entry["fids"]
        shown = ", ".join(map(str, fids[:5])) + (", ..." if len(fids) > 5 else "")
        print(f"  {name:5s}: {entry['frames']} frames -> {entry['path']} (fid {shown}; range {fids[0]}..{fids[-1]})")
    print(f"record: {Path(args.out) / 'conversion.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
