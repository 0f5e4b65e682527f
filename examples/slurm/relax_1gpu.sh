#!/usr/bin/env bash
# Relax the OC20 IS2RS test structures (fairchem's layout, data/is2re/all/test_<split>/data.lmdb)
# with the trained DEQ, one 1-GPU SLURM job per split, then merge the relaxed positions
# into the EvalAI IS2RS submission file and the relaxed energies into the IS2RE one. Run from
# the repository root:
#
#   CHECKPOINT=runs/checkpoints/deq_small_l3_2M/best_checkpoint.pt PARTITION=gpu bash examples/slurm/relax_1gpu.sh
#   # when the four jobs are done:
#   python scripts/make_submission_file.py --is2rs --results-dir runs/relax/results --out is2rs_submission.npz
#   python scripts/make_submission_file.py --is2re --results-dir runs/relax/results --out is2re_submission.npz
#
# OC20's relaxation settings: 200 L-BFGS steps, fmax 0.02 eV/A; positions are written to
# runs/relax/results/<split>/relaxed_positions.npz, trajectories (IS2RE reads their last frames'
# energies) to runs/relax/results/<split>/trajectories/<sid>.traj.
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the trained checkpoint}"
optional=()
[[ -n "${ACCOUNT:-}" ]] && optional+=(--slurm-account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && optional+=(--slurm-qos "$QOS")
for split in id ood_ads ood_cat ood_both; do
  python main.py --submit --num-gpus 1 \
    --mode run-relaxations --config-yml 2M/deq_equiformer_v2_small_l3.yml --checkpoint "$CHECKPOINT" \
    --run-dir runs/relax --timestamp-id "$split" --identifier "relax_$split" --logdir runs/slurm \
    --slurm-partition "${PARTITION:?set PARTITION to your GPU partition}" --slurm-mem 64 --slurm-timeout 24 \
    ${optional[@]+"${optional[@]}"} dataset.relax.src="data/is2re/all/test_$split/data.lmdb" \
    task.relaxation_steps=200 task.relaxation_fmax=0.02 task.write_pos=True \
    task.relax_opt.traj_dir="runs/relax/results/$split/trajectories" \
    task.relax_opt.maxstep=0.04 task.relax_opt.memory=50 task.relax_opt.damping=1.0 task.relax_opt.alpha=70.0 \
    "$@"
done
