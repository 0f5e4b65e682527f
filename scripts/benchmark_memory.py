"""Training-step memory and time: explicit EquiformerV2 at several depths vs the DEQ.

One batch of OC20-sized systems (fcc(111) slabs with an adsorbate, 60-100 atoms, EMT
energies and forces, fixed seed) is trained on by fairchem's ``equiformer_v2`` with 1, 2,
4, 8, 12 blocks and by ``deq_equiformer_v2`` (IFT, phantom and BPTT gradients) at the same
width. A training step is forward + loss (energy MAE + force L2-MAE) + backward + AdamW step.
Each configuration runs in its own process.

Memory on CPU is the peak resident set size during the measured steps above the RSS before
them (after model, batch, optimiser and one warm-up step): the kernel's high-water mark is
reset (/proc/self/clear_refs) and read back with ``getrusage``; glibc is told to return
large blocks to the OS at once, so that freed activations leave the RSS. On GPU it is
``torch.cuda.max_memory_allocated`` above the allocation before the steps. The DEQ's
effective depth is its mean number of solver evaluations of f times the blocks in f.

    python scripts/benchmark_memory.py --model-sizes 32:2:2,64:3:2 --batch 4 --steps 2 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import ocp_deq  # noqa: E402,F401  (before fairchem: stand-ins and registry)
import torch  # noqa: E402
from ase.build import add_adsorbate, fcc111  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.constraints import FixAtoms  # noqa: E402
from fairchem.core.common.registry import registry  # noqa: E402
from fairchem.core.datasets import data_list_collater  # noqa: E402
from fairchem.core.preprocessing import AtomsToGraphs  # noqa: E402

GRADIENTS = ("ift", "phantom", "bptt")
METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
ADSORBATES = ("O", "H", "C", "N")
# (a, b, layers) of the fcc(111) slab: 64-96 metal atoms
SLAB_SIZES = ((4, 4, 4), (5, 4, 4), (4, 4, 5), (5, 5, 3), (6, 4, 4), (4, 5, 4))


def make_systems(count: int, seed: int = 0) -> list:
    """``count`` fcc(111) slabs + one adsorbate atom with EMT labels, as fairchem Data."""
    rng = np.random.default_rng(seed)
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False, r_distances=False)
    systems = []
    for sid in range(count):
        size = SLAB_SIZES[rng.integers(len(SLAB_SIZES))]
        slab = fcc111(METALS[rng.integers(len(METALS))], size=size, vacuum=7.0, periodic=True)
        layer = np.round(slab.positions[:, 2], 3)
        bottom = np.unique(layer)[:2]
        slab.set_constraint(FixAtoms(mask=np.isin(layer, bottom)))
        site = ("fcc", "hcp", "ontop", "bridge")[rng.integers(4)]
        add_adsorbate(slab, ADSORBATES[rng.integers(len(ADSORBATES))], 1.6, site)
        slab.set_tags(np.append(np.isin(layer, bottom, invert=True), 2))  # OC20: 0 sub-, 1 surface, 2 adsorbate
        slab.rattle(0.05, seed=int(rng.integers(1 << 31)))
        slab.calc = EMT()
        data = a2g.convert(slab)
        data.sid = sid
        systems.append(data)
    return systems


def model_kwargs(width: int, lmax: int = 2, mmax: int = 2) -> dict:
    """EquiformerV2 at ``width`` channels and lmax/mmax, OC20 graph settings (12 A, 20 neighbours)."""
    return dict(
        use_pbc=True, regress_forces=True, otf_graph=True, max_neighbors=20, max_radius=12.0, max_num_elements=90,
        sphere_channels=width, attn_hidden_channels=max(width // 2, 8), num_heads=max(width // 16, 2),
        attn_alpha_channels=max(width // 4, 4), attn_value_channels=max(width // 8, 4), ffn_hidden_channels=width,
        edge_channels=width, lmax_list=[lmax], mmax_list=[mmax], num_distance_basis=128, num_sphere_samples=32,
        alpha_drop=0.0, drop_path_rate=0.0, proj_drop=0.0,
    )


def build_model(kind: str, layers: int, width: int, lmax: int = 2, mmax: int = 2):
    kwargs = model_kwargs(width, lmax, mmax)
    if kind == "explicit":
        return registry.get_model_class("equiformer_v2")(num_layers=layers, **kwargs)
    return registry.get_model_class("deq_equiformer_v2")(num_layers=layers, deq={"gradient": kind}, **kwargs)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so getrusage reports the
    peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        raise RuntimeError(f"CPU memory needs a resettable RSS peak (/proc/self/clear_refs): {error}") from error


def measure(kind: str, layers: int, width: int, batch_size: int, steps: int, device: str,
            lmax: int = 2, mmax: int = 2) -> dict:
    """Peak memory and time of ``steps`` training steps of one configuration (this process)."""
    torch.manual_seed(0)
    model = build_model(kind, layers, width, lmax, mmax).to(device).train()
    systems = make_systems(batch_size)
    batch = data_list_collater(systems, otf_graph=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nsteps = []

    def step():
        out = model(batch)
        energy_loss = (out["energy"].view(-1) - batch.energy.view(-1)).abs().mean()
        force_loss = (out["forces"] - batch.forces).norm(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        (energy_loss + 100 * force_loss).backward()
        optimizer.step()
        if "deq_nstep" in out:
            nsteps.append(out["deq_nstep"].float())

    step()  # warm-up: lazy caches and optimiser state exist before the baseline
    nsteps.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        _reset_peak_rss()
        baseline = _rss_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mean_nstep = torch.stack(nsteps).mean().item() if nsteps else None
    return {
        "model": "equiformer_v2" if kind == "explicit" else "deq_equiformer_v2",
        "gradient": None if kind == "explicit" else kind,
        "blocks": layers,
        "mean_solver_evals": mean_nstep,
        # BPTT unrolls until the slowest graph of the batch has converged
        "max_solver_evals": torch.stack(nsteps).max().item() if nsteps else None,
        "effective_depth": layers if mean_nstep is None else mean_nstep * layers,
        "peak_memory_mb": (peak - baseline) / 2**20,
        "baseline_memory_mb": baseline / 2**20,
        "time_per_step_s": float(np.mean(times)),
        "atoms": int(batch.natoms.sum()),
        "systems": batch_size,
        "width": width,
        "lmax": lmax,
        "mmax": mmax,
        "steps": steps,
        "device": device,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_isolated(kind: str, layers: int, size: tuple, args) -> dict:
    """One configuration in a fresh process; glibc returns blocks >= 64 KiB to the OS at free."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    width, lmax, mmax = size
    command = [sys.executable, __file__, "--worker", kind, str(layers), "--model-sizes", f"{width}:{lmax}:{mmax}",
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
               "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} with {layers} blocks failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    try:
        sizes = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 3 for size in sizes):
        raise SystemExit(f"--model-sizes {text!r}: expected width:lmax:mmax[,width:lmax:mmax...], e.g. 32:2:2,64:3:2")
    return sizes


def size_name(size) -> str:
    width, lmax, mmax = size if isinstance(size, tuple) else (size["width"], size["lmax"], size["mmax"])
    return f"width {width}, lmax {lmax}, mmax {mmax}"


def label(row: dict) -> str:
    blocks = f"{row['blocks']} block{'s' if row['blocks'] > 1 else ''}"
    if row["gradient"] is None:
        return f"explicit, {blocks}"
    return f"DEQ {'phantom' if row['gradient'] == 'phantom' else row['gradient'].upper()}, {blocks} in f"


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"{first['systems']} systems ({first['atoms']} atoms), {first['device']} ({first['threads']} thread(s));"
        f" {first['steps']} training steps after a warm-up step: peak memory above the memory held before them,"
        " mean time per step.",
        "",
        "| size | model | effective depth | peak memory (MB) | time / step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        depth = f"{row['effective_depth']:.0f}" if row["gradient"] is None else (
            f"{row['effective_depth']:.1f} ({row['mean_solver_evals']:.1f} evals, max {row['max_solver_evals']:.0f}, x {row['blocks']})")
        lines.append(f"| {size_name(row)} | {label(row)} | {depth} | {row['peak_memory_mb']:.0f} | {row['time_per_step_s']:.2f} |")
    lines.append("")
    for size in dict.fromkeys(size_name(r) for r in rows):
        sub = [r for r in rows if size_name(r) == size]
        ift = [r for r in sub if r["gradient"] == "ift"]
        one = [r for r in sub if r["gradient"] is None and r["blocks"] == 1]
        if ift and one:
            lines.append(f"{size}: DEQ-IFT peak / explicit 1-block peak: {ift[0]['peak_memory_mb'] / one[0]['peak_memory_mb']:.2f}x")
        for row in sub:
            if ift and row["gradient"] is None and row["blocks"] in (8, 12):
                lines.append(f"{size}: explicit {row['blocks']}-block peak / DEQ-IFT peak: "
                             f"{row['peak_memory_mb'] / ift[0]['peak_memory_mb']:.1f}x")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the user's backend stays as it is

    sizes = list(dict.fromkeys(size_name(r) for r in rows))
    fig = Figure(figsize=(6 * len(sizes), 4))
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        sub = [r for r in rows if size_name(r) == size]
        explicit = [r for r in sub if r["gradient"] is None]
        ax.plot([r["effective_depth"] for r in explicit], [r["peak_memory_mb"] for r in explicit], "o-",
                label="explicit EquiformerV2")
        for row, marker in zip([r for r in sub if r["gradient"] is not None], "s^D"):
            ax.plot(row["effective_depth"], row["peak_memory_mb"], marker, markersize=9, label=label(row))
        ax.set_xlabel("(effective) depth: blocks, or DEQ solver evaluations x blocks in f")
        ax.set_ylabel("peak training-step memory (MB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{sub[0]['systems']} systems, {sub[0]['atoms']} atoms, {size}, {sub[0]['device']}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,12", help="explicit EquiformerV2 depths (comma separated)")
    parser.add_argument("--gradients", default=",".join(GRADIENTS), help="DEQ gradient modes (comma separated, or none)")
    parser.add_argument("--deq-blocks", type=int, default=1, help="transformer blocks inside the DEQ's f")
    parser.add_argument("--model-sizes", default="32:2:2,64:3:2",
                        help="width:lmax:mmax per model size, comma separated (the other widths follow the width)")
    parser.add_argument("--batch", type=int, default=4, help="systems in the batch (60-100 atoms each)")
    parser.add_argument("--steps", type=int, default=2, help="measured training steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement (torch.set_num_threads)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for memory.json/.md/.png")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        kind, layers = args.worker
        torch.set_num_threads(args.threads)
        width, lmax, mmax = parse_sizes(args.model_sizes)[0]
        print(json.dumps(measure(kind, int(layers), width, args.batch, args.steps, args.device, lmax, mmax)))
        return

    gradients = [g for g in args.gradients.split(",") if g and g != "none"]
    unknown = sorted(set(gradients) - set(GRADIENTS))
    if unknown:
        parser.error(f"--gradients: unknown mode(s) {unknown}; choose from {GRADIENTS}")
    configs = [(size, "explicit", int(n)) for size in parse_sizes(args.model_sizes) for n in args.sizes.split(",") if n]
    configs += [(size, g, args.deq_blocks) for size in parse_sizes(args.model_sizes) for g in gradients]
    configs.sort(key=lambda c: c[0])
    rows = []
    for i, (size, kind, layers) in enumerate(configs, 1):
        start = time.time()
        print(f"[{i}/{len(configs)}] {size_name(size)}: {kind}, {layers} block(s) ...", end="", flush=True)
        rows.append(run_isolated(kind, layers, size, args))
        row = rows[-1]
        print(f" {row['peak_memory_mb']:.0f} MB, {row['time_per_step_s']:.2f} s/step"
              + (f", {row['mean_solver_evals']:.1f} solver evals" if row["mean_solver_evals"] else "")
              + f" ({time.time() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=1))
    (args.out / "memory.md").write_text(markdown(rows))
    plot(rows, args.out / "memory.png")
    print(markdown(rows))
    print(f"wrote {args.out / 'memory.json'}, memory.md, memory.png")


if __name__ == "__main__":
    main()
