#!/usr/bin/env bash
# Predict energies and forces on the four OC20 S2EF test splits (fairchem's layout,
# data/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}/), one 1-GPU SLURM job per split,
# then merge them into the EvalAI submission file. Run from the repository root:
#
#   CHECKPOINT=runs/checkpoints/deq_small_l3_2M/best_checkpoint.pt PARTITION=gpu bash examples/slurm/predict_1gpu.sh
#   # when the four jobs are done (squeue -u $USER is empty):
#   python scripts/make_submission_file.py --results-dir runs/predict/results --out s2ef_submission.npz
#
# Each split's predictions land in runs/predict/results/<split>/ocp_predictions.npz
# (float16; add task.prediction_dtype=float32 and --float32 for float32). A preempted
# job requeues and predicts its split again.
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the trained checkpoint}"
optional=()
[[ -n "${ACCOUNT:-}" ]] && optional+=(--slurm-account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && optional+=(--slurm-qos "$QOS")
for split in id ood_ads ood_cat ood_both; do
  python main.py --submit --num-gpus 1 \
    --mode predict --config-yml 2M/deq_equiformer_v2_small_l3.yml --checkpoint "$CHECKPOINT" \
    --run-dir runs/predict --timestamp-id "$split" --identifier "predict_$split" --logdir runs/slurm \
    --slurm-partition "${PARTITION:?set PARTITION to your GPU partition}" --slurm-mem 64 --slurm-timeout 24 \
    ${optional[@]+"${optional[@]}"} dataset.test.src="data/s2ef/all/test_$split/" "$@"
done
