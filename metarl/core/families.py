"""What each task family can do, declared once: where it is built, which config sections it
takes, whether its tasks stack, whether it has a policy distribution, whether its tasks are
episodic games, and what its task names look like. Config validation, the fleet, `metarl eval`,
`bench` and the RLlib export read these traits instead of lists of family names."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")



@dataclass(frozen=True)
class Traits:
    name: str
    module: str
    """metarl.tasks.<module> holds the TaskFamily class `cls` (imported only when built)."""
    cls: str
    sections: tuple[str, ...]
    """Config sections the family's constructor takes, in order."""
    stacked: bool
    """Has a TaskStack: whole groups in one batched pass (meta.task_batching)."""
    policy: bool
    """Stacked with a policy distribution: the KL-constrained outer step (meta.outer = trpo)."""
    games: bool
    """Episodic games against an emulator: `metarl eval`, `sweep`, `learn`, `bench`, RLlib export."""
    names: str
    """How its task names look (for messages)."""
    pattern: str = ""
    """A regular expression every task name matches (cheap families); empty: a list of games."""

    def check_names(self, names: tuple[str, ...]) -> str | None:
        """The first name this family does not know, or None."""
        if self.pattern:
            return next((n for n in names if not re.fullmatch(self.pattern, n)), None)
        valid = set(self.valid_games())
        return next((n for n in names if n not in valid), None)

    def valid_games(self) -> tuple[str, ...]:
        if self.name == "atari":
            from ale_py import roms

            return tuple(sorted(roms.get_all_rom_ids()))
        return MINATAR_GAMES if self.name == "minatar" else ()

    def family_class(self) -> type:
        return getattr(importlib.import_module(f"metarl.tasks.{self.module}"), self.cls)


TRAITS = {
    "atari": Traits("atari", "atari", "AtariFamily", ("env", "loss"), stacked=False, policy=False, games=True,
                    names="ALE game ids (pong, breakout, ...)"),
    "minatar": Traits("minatar", "minatar", "MinAtarFamily", ("env", "minatar", "loss"), stacked=False,
                      policy=False, games=True, names=f"MinAtar games ({', '.join(MINATAR_GAMES)})"),
    "sinusoid": Traits("sinusoid", "sinusoid", "SinusoidFamily", ("sinusoid",), stacked=True, policy=False,
                       games=False, names="sine-<index>, e.g. sine-0017", pattern=r"sine-\d+"),
    "nav2d": Traits("nav2d", "nav2d", "Nav2dFamily", ("nav2d", "loss"), stacked=True, policy=True, games=False,
                    names="goal-<index>, e.g. goal-0017", pattern=r"goal-\d+"),
}
