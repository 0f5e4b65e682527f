#!/usr/bin/env bash
# Train the DEQ EquiformerV2 on OC20 S2EF-2M on 2 nodes x 8 GPUs (16 DDP ranks, NCCL).
# Run from the repository root on a SLURM login node: submitit writes the sbatch script,
# submits it and returns; logs go to runs/slurm/<job id>/<job id>_<rank>_log.{out,err}.
#
#   PARTITION=gpu [ACCOUNT=...] [QOS=...] [RUN=deq_small_l3_2M] bash examples/slurm/train_2x8gpu.sh [overrides]
#
# Timeout / preemption: SLURM signals the job (USR2, 90 s before the time limit; on
# preemption only with SlurmctldParameters=preempt_send_user_signal); rank 0 saves
# runs/checkpoints/$RUN/checkpoint.pt and the job requeues itself and resumes there (up to 3
# timeouts; preemptions requeue without limit). After a crash, a kill or a node failure, run
# this same command again: --timestamp-id makes the run find its checkpoint and resume.
# checkpoint.pt is written every 2000 steps (~1/15 epoch here; fairchem's default: per epoch).
# Extra sbatch options go in the yml's `slurm:` block or as overrides, e.g. slurm.constraint=a100.
set -euo pipefail
RUN=${RUN:-deq_small_l3_2M}
optional=()
[[ -n "${ACCOUNT:-}" ]] && optional+=(--slurm-account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && optional+=(--slurm-qos "$QOS")
python main.py --distributed --submit --num-nodes 2 --num-gpus 8 \
  --mode train --config-yml 2M/deq_equiformer_v2_small_l3.yml \
  --run-dir runs --timestamp-id "$RUN" --identifier "$RUN" --logdir runs/slurm \
  --slurm-partition "${PARTITION:?set PARTITION to your GPU partition}" --slurm-mem 480 --slurm-timeout 72 \
  ${optional[@]+"${optional[@]}"} optim.checkpoint_every=2000 "$@"
