"""Speed: the DEQ (phantom and IFT gradients, 1 block in f) vs explicit EquiformerV2 with
1, 4 and 8 blocks, same width, same batches, side by side in one process.

Toy S2EF data (``data/toy_s2ef``, generated if missing), batches of 8 frames, two model
sizes (32 channels lmax 2; 64 channels lmax 3 mmax 2; graph and other settings of the toy
configs). Training: every model starts from its own seed-0 initialisation and takes the
same training steps (forward, energy + force loss as in the toy config, backward, AdamW),
round-robin over the models so that machine noise hits all of them alike. Then, on the
validation batches: eval forward time cold, and warm (reusing the fixed point of the same
frames before their atoms moved by 0.02 A). Reported per DEQ: f evaluations executed
(graph-evaluations of the active-set solver) against the sum of per-graph iterations and
against what a whole-batch solver would run (graphs x slowest graph), and the solver's own
overhead (solve time outside f) as a share of the DEQ forward.

    python scripts/benchmark_speed.py --steps 40 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import ocp_deq  # noqa: E402,F401  (before fairchem: stand-ins and registry)
import torch  # noqa: E402
from fairchem.core.common.registry import registry  # noqa: E402
from fairchem.core.common.utils import load_config  # noqa: E402
from fairchem.core.datasets import data_list_collater  # noqa: E402

from ocp_deq.data import read_lmdb  # noqa: E402
from ocp_deq.data.toy_s2ef import ToySpec, ensure_toy_data  # noqa: E402
from ocp_deq.models.distance_expansion import band_gaussians  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # name -> EquiformerV2 widths
    "32ch_l2": dict(sphere_channels=32, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
                          attn_value_channels=8, ffn_hidden_channels=32, edge_channels=32, lmax_list=[2], mmax_list=[2]),
    "64ch_l3m2": dict(sphere_channels=64, attn_hidden_channels=32, num_heads=4, attn_alpha_channels=16,
                                  attn_value_channels=16, ffn_hidden_channels=64, edge_channels=64, lmax_list=[3],
                                  mmax_list=[2]),
}
SIZE_TITLES = {"32ch_l2": "32 channels, lmax 2", "64ch_l3m2": "64 channels, lmax 3, mmax 2"}
MODELS = (("explicit", 1), ("explicit", 4), ("explicit", 8), ("phantom", 1), ("ift", 1))


def toy_model_config() -> dict:
    config, _, _ = load_config(str(REPO / "configs" / "s2ef" / "toy" / "deq_equiformer_v2_toy.yml"))
    return config


def build(kind: str, layers: int, size: dict, base: dict):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in base.items() if k not in ("name", "deq", "num_layers")}
    kwargs.update(size)
    if kind == "explicit":  # with the DEQ's banded Gaussian distance expansion: a fair race
        model = registry.get_model_class("equiformer_v2")(num_layers=layers, **kwargs)
        band_gaussians(model)
        return model
    return registry.get_model_class("deq_equiformer_v2")(num_layers=layers, deq={**base["deq"], "gradient": kind}, **kwargs)


def label(kind: str, layers: int) -> str:
    if kind == "explicit":
        return f"explicit, {layers} block{'s' if layers > 1 else ''}"
    return f"DEQ {'phantom' if kind == 'phantom' else 'IFT'}, {layers} block in f"


class Runner:
    """One model, its optimiser and what it measured."""

    def __init__(self, kind, layers, size, config):
        self.kind, self.layers, self.name = kind, layers, label(kind, layers)
        self.model = build(kind, layers, size, config["model"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config["optim"]["lr_initial"],
                                           weight_decay=config["optim"]["optimizer_params"]["weight_decay"])
        self.e_mean, self.e_std, self.f_std = config["target_statistics"]
        weights = {name: spec["coefficient"] for entry in config["loss_functions"] for name, spec in entry.items()}
        self.e_weight, self.f_weight = weights["energy"], weights["forces"]
        self.train_times, self.train_solves, self.eval = [], [], {"cold": [], "warm": []}

    def train_step(self, batch) -> None:
        self.model.train()
        start = time.perf_counter()
        out = self.model(batch)
        free = batch.fixed == 0
        energy = (out["energy"].view(-1) - (batch.energy - self.e_mean) / self.e_std).abs().mean()
        forces = (out["forces"][free] - batch.forces[free] / self.f_std).norm(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        (self.e_weight * energy + self.f_weight * forces).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 100)
        self.optimizer.step()
        self.train_times.append(time.perf_counter() - start)
        if "deq_work" in out:
            self.train_solves.append(solve_record(out, self.train_times[-1]))

    def eval_forward(self, batch, mode: str) -> None:
        self.model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(batch)
        seconds = time.perf_counter() - start
        record = solve_record(out, seconds) if "deq_work" in out else {"seconds": seconds}
        self.eval[mode].append(record)


def solve_record(out: dict, seconds: float) -> dict:
    work, nstep = out["deq_work"], out["deq_nstep"]
    return {"seconds": seconds, "graph_evaluations": work.graph_evaluations, "sum_nstep": float(nstep.sum()),
            "whole_batch_evaluations": float(nstep.max() * nstep.numel()), "mean_nstep": float(nstep.mean()),
            "max_nstep": float(nstep.max()), "unconverged": float((~out["deq_converged"]).float().mean()),
            "solver_seconds": work.seconds, "f_seconds": work.f_seconds}


def moved(batch, seed: int, amplitude: float = 0.02):
    gen = torch.Generator().manual_seed(seed)
    other = batch.clone()
    free = (other.fixed == 0).float()[:, None]
    other.pos = other.pos + amplitude * torch.randn(other.pos.shape, generator=gen) * free
    return other


def summarise(runner: Runner, skip: int) -> dict:
    row = {"model": runner.name, "kind": runner.kind, "blocks": runner.layers,
           "train_step_s": float(np.mean(runner.train_times[skip:])),
           "eval_cold_s": float(np.mean([r["seconds"] for r in runner.eval["cold"]])),
           "eval_warm_s": float(np.mean([r["seconds"] for r in runner.eval["warm"]]))}
    for phase, records in (("train", runner.train_solves[skip:]), ("cold", runner.eval["cold"]),
                           ("warm", runner.eval["warm"])):
        if not records or "graph_evaluations" not in records[0]:
            continue
        total = {key: float(np.sum([r[key] for r in records])) for key in records[0]}
        row[phase] = {
            "mean_nstep": float(np.mean([r["mean_nstep"] for r in records])),
            "max_nstep": float(np.max([r["max_nstep"] for r in records])),
            "unconverged": float(np.mean([r["unconverged"] for r in records])),
            "executed_over_sum_nstep": total["graph_evaluations"] / total["sum_nstep"],
            "whole_batch_over_sum_nstep": total["whole_batch_evaluations"] / total["sum_nstep"],
            "solver_overhead_share": (total["solver_seconds"] - total["f_seconds"]) / total["seconds"],
        }
    return row


def run_size(name: str, size: dict, config: dict, train_batches, eval_batches, steps: int, skip: int) -> list:
    runners = [Runner(kind, layers, size, config) for kind, layers in MODELS]
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        for runner in runners:
            runner.train_step(batch)
        if (step + 1) % 5 == 0 or step + 1 == steps:
            line = ", ".join(f"{r.name}: {r.train_times[-1]:.2f}s" for r in runners)
            print(f"  [{name}] step {step + 1}/{steps}: {line}", flush=True)
    for i, batch in enumerate(eval_batches):
        for runner in runners:
            runner.eval_forward(batch, "cold")
            if runner.kind == "explicit":
                runner.eval_forward(moved(batch, i), "warm")  # explicit: nothing to reuse
                continue
            with runner.model.reusing() as cache, cache.keys(list(range(batch.natoms.numel()))):
                runner.model.eval()
                with torch.no_grad():
                    runner.model(batch)  # the fixed points of these frames
                runner.eval_forward(moved(batch, i), "warm")
    rows = [summarise(r, skip) for r in runners]
    reference = next(r for r in rows if r["kind"] == "explicit" and r["blocks"] == 4)
    for row in rows:
        row["size"] = name
        row["train_step_vs_explicit4"] = row["train_step_s"] / reference["train_step_s"]
        row["eval_cold_vs_explicit4"] = row["eval_cold_s"] / reference["eval_cold_s"]
        row["eval_warm_vs_explicit4"] = row["eval_warm_s"] / reference["eval_warm_s"]
    return rows


def markdown(rows: list, meta: dict) -> str:
    lines = [f"{meta['steps']} training steps per model (first {meta['skip']} not timed), batches of "
             f"{meta['batch']} toy S2EF frames; {meta['eval_batches']} validation batches cold and warm; "
             f"{meta['threads']} thread(s), one process, models round-robin. Ratios: to explicit 4 blocks.", ""]
    lines += ["| size | model | train step (s) | ratio | eval cold (s) | ratio | eval warm (s) | ratio | "
              "evals/graph train / cold / warm | executed / sum of per-graph evals | whole-batch / sum | solver overhead |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        deq = "train" in r
        evals = f"{r['train']['mean_nstep']:.1f} / {r['cold']['mean_nstep']:.1f} / {r['warm']['mean_nstep']:.1f}" if deq else "-"
        executed = f"{r['train']['executed_over_sum_nstep']:.2f}" if deq else "-"
        whole = f"{r['train']['whole_batch_over_sum_nstep']:.2f}" if deq else "-"
        overhead = (f"{100 * r['train']['solver_overhead_share']:.1f}% / {100 * r['cold']['solver_overhead_share']:.1f}%"
                    if deq else "-")
        lines.append(f"| {r['size']} | {r['model']} | {r['train_step_s']:.3f} | {r['train_step_vs_explicit4']:.2f} | "
                     f"{r['eval_cold_s']:.3f} | {r['eval_cold_vs_explicit4']:.2f} | {r['eval_warm_s']:.3f} | "
                     f"{r['eval_warm_vs_explicit4']:.2f} | {evals} | {executed} | {whole} | {overhead} |")
    lines += ["", "Solver overhead: time inside the solver but outside f, as a share of the training step / "
              "of the cold eval forward. Whole-batch / sum: the work a solver that iterates every graph until "
              "the slowest converges would do, relative to the per-graph sum."]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    from matplotlib.figure import Figure

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig = Figure(figsize=(5 * len(sizes), 4))
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        sub = [r for r in rows if r["size"] == size]
        x = np.arange(len(sub))
        for offset, key, name in ((-0.27, "train_step_s", "training step"), (0, "eval_cold_s", "eval cold"),
                                  (0.27, "eval_warm_s", "eval warm")):
            ax.bar(x + offset, [r[key] for r in sub], width=0.27, label=name)
        ax.set_xticks(x, [r["model"].replace(", ", "\n") for r in sub], fontsize=7)
        ax.set_ylabel("seconds per batch")
        ax.set_title(SIZE_TITLES[size], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per model and size")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the timing (warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma separated, from {list(SIZES)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data", type=Path, default=REPO / "data" / "toy_s2ef")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = toy_model_config()
    ensure_toy_data(args.data, ToySpec(seed=config.get("toy_data", {}).get("seed", 0)))
    rng = np.random.default_rng(0)
    train = read_lmdb(args.data / "train")
    energies = torch.tensor([float(frame.energy) for frame in train])
    forces = torch.cat([frame.forces for frame in train])
    # the loss normalises the targets by the training split's statistics, as the configs' fitted normalisers do
    config["target_statistics"] = (energies.mean().item(), energies.std().item(), forces.pow(2).mean().sqrt().item())
    order = rng.permutation(len(train))
    train_batches = [data_list_collater([train[i] for i in order[k:k + args.batch]], otf_graph=True)
                     for k in range(0, len(order) - args.batch + 1, args.batch)]
    val = read_lmdb(args.data / "val")
    eval_batches = [data_list_collater(val[k:k + args.batch], otf_graph=True)
                    for k in range(0, min(len(val), args.eval_batches * args.batch), args.batch)]
    rows = []
    for name in args.sizes.split(","):
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}; choose from {list(SIZES)}")
        print(f"{name}: {len(MODELS)} models x {args.steps} training steps", flush=True)
        rows += run_size(name, SIZES[name], config, train_batches, eval_batches, args.steps, args.skip)
    meta = {"steps": args.steps, "skip": args.skip, "batch": args.batch, "eval_batches": len(eval_batches),
            "threads": args.threads, "command": " ".join(["python scripts/benchmark_speed.py", *(argv or sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "speed.md").write_text(markdown(rows, meta))
    plot(rows, args.out / "speed.png")
    print(markdown(rows, meta))
    print(f"wrote {args.out / 'speed.json'}, speed.md, speed.png")


if __name__ == "__main__":
    main()
