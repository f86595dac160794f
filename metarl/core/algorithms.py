"""What each outer algorithm does, declared once (as metarl.core.families does for task families):
which worker call a group's leader makes, whether members evaluate theta', whether leaders pull
the members' gradients back through their inner steps, and what an iteration costs in rollouts.
Pure Python, no torch: config validation, the fleet, the meta-iteration, `sweep` and `bench` read
these traits instead of comparing algorithm names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    leader: int
    """Index of the task whose data adapts theta' for the whole group."""
    members: tuple[int, ...]
    """Indices of the tasks that evaluate theta' (the leader included)."""


@dataclass(frozen=True)
class Algorithm:
    """What the driver needs to know of an outer algorithm; the math is in metarl.core.meta."""

    name: str
    leader_call: str
    """The TaskWorker method a group's leader runs on theta: adapt (-> theta') or reptile (-> theta - theta')."""
    evaluates: bool
    """Members evaluate the leader's theta' and send first-order gradients (fomaml, maml); Reptile
    uses the leaders' directions alone."""
    corrects: bool
    """Each leader pulls its group's summed gradient back through its inner steps (maml)."""

    def gradient_tasks(self, group: Group) -> tuple[int, ...]:
        """The tasks whose results make the group's contribution to the meta-gradient."""
        return group.members if self.evaluates else (group.leader,)

    @property
    def ships(self) -> bool:
        """A member's gradient needs only theta' and the member's own batch (first order, no
        leader correction), so the batch can be shipped and scored elsewhere (meta.grad_on = learner)."""
        return self.evaluates and not self.corrects


ALGORITHMS = {
    "fomaml": Algorithm("fomaml", "adapt", evaluates=True, corrects=False),
    "maml": Algorithm("maml", "adapt", evaluates=True, corrects=True),
    "reptile": Algorithm("reptile", "reptile", evaluates=False, corrects=False),
}


def rollouts_per_iteration(num_tasks: int, skip: int, inner_steps: int, algo: str) -> int:
    """Rollouts of one meta-iteration at skip k, for tasks that sample fresh data at every inner
    step (the games): ceil(N/k) leaders adapt with S rollouts each, and every one of the N tasks
    evaluates theta' with one more, except under Reptile, which evaluates none."""
    evaluations = num_tasks if ALGORITHMS[algo].evaluates else 0
    return math.ceil(num_tasks / skip) * inner_steps + evaluations
