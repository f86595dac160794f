"""Every seed a run derives from its own (meta.seed), declared once, so that the data a task sees
depend on the task and the iteration, never on which worker, process or command draws them:

  task_seed(seed, i)            task i's emulator / RNG seed (fleet, joint pre-training, bench), and
                                with an evaluation seed and a game's place, a fine-tuning job's
                                (`metarl eval`, its RLlib learner, `probe`)
  iteration_seed(task_seed, t)  a task's data seed at meta-iteration t (stacked workers reseed with
                                it; joint pre-training too, so it draws the tasks the meta-learners do)
  key_seed(*keys)               one seed from several integers (run seed, iteration, ...): PPO's
                                minibatches in the outer and inner loops
"""

from __future__ import annotations


def task_seed(seed: int, index: int) -> int:
    """Each task's RNG/emulator seed depends on the run seed and the task's place in the list,
    not on which worker owns it."""
    return int(seed) * 10_007 + 7919 * (index + 1)


def iteration_seed(task_seed: int, iteration: int) -> int:
    """The data seed of one task at one meta-iteration (distinct for every pair a run meets)."""
    return (int(task_seed) * 1_000_003 + 7919 * int(iteration)) % (2**63)


def key_seed(*keys: int) -> int:
    """One seed from integers (run seed, iteration, ...), the same on every process."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) * 7919 + 1) % (2**62)
    return seed
