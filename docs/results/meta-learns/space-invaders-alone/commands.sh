#!/bin/bash
# Issue #22 item 4c (measured 2026-12-08, AMD EPYC, one core, code at d1413f3): Space Invaders alone, FOMAML skip 1,
# 307,200 env steps per run, seeds 0-9. Then: metarl training "PPO outer loop, 32x16=runs/cheap/ppo-s0" ... --out DIR
for s in 0 1 2 3 4 5 6 7 8 9; do
  base=(metarl run --config configs/minatar.yaml --local --seed $s --set 'tasks.train=[space_invaders]' --set log.wandb_mode=disabled)
  "${base[@]}" --iterations 300 --out runs/cheap/ppo-s$s                                   # PPO 4x4 on 32x16 rollouts (the config)
  "${base[@]}" --iterations 1200 --set env.rollout_len=4 --set meta.outer_epochs=1 --set meta.outer_minibatches=1 \
      --set meta.outer_clip=0 --set meta.outer_lr=0.001 --out runs/cheap/onestep-s$s       # one unclipped step per 32x4 rollout
  "${base[@]}" --iterations 1200 --set env.rollout_len=4 --out runs/cheap/ppo4-s$s         # PPO 4x4 on 32x4 rollouts
done
