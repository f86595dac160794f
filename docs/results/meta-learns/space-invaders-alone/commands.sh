#!/bin/bash
# Issue #22 item 4c: PPO outer loop (32x16, 300 it.) vs one unclipped step per 32x4 rollout (1,200 it., beta 1e-3),
# Space Invaders alone, 307,200 env steps each, seeds 0-3, one core, code pinned in /work/exp7.
cd /work/exp7 && . /work/main/.venv/bin/activate
for s in 0 1 2 3 4 5 6 7 8 9; do
  for kind in ppo onestep; do
    out=/work/runs/cheap/$kind-s$s
    [ -f $out/done ] && continue
    rm -rf $out
    if [ $kind = ppo ]; then extra="--iterations 300"; else
      extra="--iterations 1200 --set env.rollout_len=4 --set meta.outer_epochs=1 --set meta.outer_minibatches=1 --set meta.outer_clip=0 --set meta.outer_lr=0.001"; fi
    /usr/bin/time -f "%e s" -o $out.time env PYTHONPATH=/work/exp7 nice -n 5 python -m metarl run --config configs/minatar.yaml --local --seed $s \
      --set 'tasks.train=[space_invaders]' --set log.wandb_mode=disabled --no-progress $extra --out $out > $out.log 2>&1 && touch $out/done
  done
done
# third arm: PPO outer loop 4x4 (clip 0.2, beta 5e-4) on 32x4 rollouts, 1,200 iterations = 307,200 env steps
cd /work/exp7 && . /work/main/.venv/bin/activate
for s in 0 1 2 3 4 5 6 7 8 9; do
  out=/work/runs/cheap/ppo4-s$s; [ -f $out/done ] && continue; rm -rf $out
  /usr/bin/time -f "%e s" -o $out.time env PYTHONPATH=/work/exp7 nice -n 5 python -m metarl run --config configs/minatar.yaml --local --seed $s \
    --set 'tasks.train=[space_invaders]' --set log.wandb_mode=disabled --no-progress --iterations 1200 --set env.rollout_len=4 \
    --out $out > $out.log 2>&1 && touch $out/done
done
