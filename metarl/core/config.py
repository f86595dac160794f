"""Typed, strict configuration: YAML -> frozen dataclasses, validated before anything starts.

Every field carries a one-line doc (the string written under it, read by `_field_docs`) that the README and
`metarl run --help-config` print. Unknown keys, unknown games, a skip count that does not fit and
non-positive step sizes are rejected with one line naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from metarl.core.algorithms import ALGORITHMS
from metarl.core.families import TRAITS


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2."""


# Enumerations: typed on their fields (Literal) and checked in one place (`check_enums`); the
# tuples of allowed values below are read off the types, for argparse choices and messages.
Family = Literal["atari", "minatar", "sinusoid", "nav2d"]
Algo = Literal["fomaml", "maml", "reptile"]
LrDecay = Literal["constant", "linear", "cosine"]
GradOn = Literal["auto", "worker", "learner"]
GradReduce = Literal["task", "worker", "node"]
TaskBatching = Literal["auto", "stacked", "per_task"]
StepLoss = Literal["last", "mean"]
Outer = Literal["adam", "trpo"]
Follow = Literal["shift", "exact"]
LearnerGpus = Literal["auto", "0", "1"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
FinetuneOptimizer = Literal["sgd", "adam"]

ALGOS, FAMILIES, LR_DECAYS = typing.get_args(Algo), typing.get_args(Family), typing.get_args(LrDecay)
GRAD_ON, GRAD_REDUCE, TASK_BATCHING = typing.get_args(GradOn), typing.get_args(GradReduce), typing.get_args(TaskBatching)
OUTERS, WANDB_MODES, FINETUNE_OPTIMIZERS = typing.get_args(Outer), typing.get_args(WandbMode), typing.get_args(FinetuneOptimizer)
# what each family can do is declared in metarl.core.families (TRAITS); these tuples are read off it
GAME_FAMILIES = tuple(n for n, t in TRAITS.items() if t.games)  # `metarl eval`, `sweep`, `bench` apply
STACKED_FAMILIES = tuple(n for n, t in TRAITS.items() if t.stacked)
POLICY_STACKED = tuple(n for n, t in TRAITS.items() if t.stacked and t.policy)  # meta.outer = trpo


@dataclass(frozen=True)
class TasksConfig:
    family: Family = "atari"
    """Task family: atari (one ALE game per task), minatar (one MinAtar game per task: the CPU-scale Atari), sinusoid or nav2d (cheap MAML-paper families)."""
    train: tuple[str, ...] = ("pong", "breakout")
    """Training task names: ALE game ids for atari, MinAtar games for minatar, or 'task-<i>' style names for the cheap families."""
    heldout: tuple[str, ...] = ()
    """Held-out task names used by `metarl eval` and `metarl sweep`."""
    resample: bool = False
    """sinusoid/nav2d: every training task draws a new curve/goal each iteration (the MAML paper's p(T)); names then label meta-batch slots. Needs stacked tasks."""


@dataclass(frozen=True)
class EnvConfig:
    num_envs: int = 8
    """Parallel emulators per task (one AtariVectorEnv per task; B MinAtar games for minatar); the batch B of every rollout."""
    rollout_len: int = 32
    """Steps per env per rollout (T); one rollout is T x B agent steps (atari and minatar)."""
    env_threads: int = 1
    """C++ threads per AtariVectorEnv; keep workers x threads <= cores."""
    sticky_actions: float = 0.25
    """Probability the emulator repeats the previous action (Machado et al. 2018)."""
    frameskip: int = 4
    """Emulator frames per agent step (max-pooled over the last two)."""
    noop_max: int = 30
    """Up to this many no-op actions at episode start."""
    reward_clip: bool = True
    """Clip training rewards to their sign; logged returns are always the raw game score."""
    max_episode_frames: int = 108000
    """Truncate an episode after this many emulator frames (30 minutes of play)."""


@dataclass(frozen=True)
class LossConfig:
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda for the advantages."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    norm_adv: bool = True
    """Normalise advantages per batch before the policy-gradient term."""
    grad_chunk: int = 256
    """Samples per forward+backward of an Atari gradient (summed over chunks, same result): bounds a worker's memory; 0 = whole batch."""




@dataclass(frozen=True)
class MetaConfig:
    algo: Algo = "fomaml"
    """Meta-gradient: fomaml (first order), maml (second order via HVPs) or reptile."""
    skip: int = 1
    """Task skip count k: N tasks form ceil(N/k) groups; one leader per group adapts theta'."""
    inner_lr: float = 0.01
    """alpha: step size of the inner SGD adaptation."""
    inner_steps: int = 1
    """S: inner SGD steps per adaptation, each on a fresh rollout; 0 (fomaml only): no inner loop, every task's loss at theta itself = joint multi-task pre-training."""
    outer_lr: float = 1e-4
    """beta: Adam step size of the meta-update."""
    outer_lr_decay: LrDecay = "constant"
    """beta's schedule over meta.iterations: constant, linear or cosine (to 0 at the last)."""
    max_grad_norm: float = 1.0
    """Clip the averaged meta-gradient to this global norm."""
    grad_on: GradOn = "auto"
    """Where evaluation gradients are computed: worker, learner (batches shipped; Atari fomaml), auto = learner iff it has a GPU the workers lack."""
    step_loss: StepLoss = "last"
    """last: the members' loss after all S inner steps (MAML); mean: averaged over the points after each of the S steps (multi-step loss, Antoniou et al. 2019; stacked tasks, maml/fomaml)."""
    outer: Outer = "adam"
    """The outer optimiser: adam (outer_lr, outer_lr_decay, max_grad_norm) or trpo: a KL-constrained natural-gradient step on the post-update policies (the MAML paper's for RL; stacked policy families: nav2d; maml or fomaml)."""
    max_kl: float = 0.01
    """trpo: the step's bound on the mean KL between the post-update policies before and after it (delta)."""
    cg_iters: int = 10
    """trpo: conjugate-gradient iterations per step."""
    fisher_fraction: float = 0.25
    """trpo: share of each batch's samples used for the curvature (KL-Hessian) products; 1 uses all."""
    outer_epochs: int = 1
    """Passes over each iteration's evaluation rollouts (PPO's epochs in the outer loop); 1 with outer_minibatches 1 and outer_clip 0 is one actor-critic step per iteration."""
    outer_minibatches: int = 1
    """Adam steps on theta per pass, each on a random 1/outer_minibatches of every member's rollout (all members' gradients summed)."""
    outer_clip: float = 0.0
    """PPO's ratio and value clip of the outer loss, the ratio against the log-probabilities recorded when the rollout was sampled; 0: no clipping."""
    inner_epochs: int = 1
    """Passes over each inner step's rollout; with inner_minibatches, inner_epochs x inner_minibatches clipped SGD steps of alpha per inner step (PPO's update as the inner loop; fomaml or reptile on game families). 1 x 1: one actor-critic SGD step on the whole rollout (the MAML form)."""
    inner_minibatches: int = 1
    """SGD steps per inner pass, each on a random 1/inner_minibatches of the rollout."""
    inner_clip: float = 0.2
    """PPO's ratio and value clip of the inner loss when inner_epochs x inner_minibatches > 1."""
    follow: Follow = "shift"
    """How theta' follows theta between the outer steps of one iteration: shift (theta' moves by theta's own displacement, dtheta'/dtheta = I, no extra gradient) or exact (the leader's inner steps redone from the current theta on its stored adaptation batches)."""
    task_batching: TaskBatching = "auto"
    """stacked: each worker computes whole groups, all their tasks in one batched pass (sinusoid, nav2d); per_task: one worker call per task; auto: stacked where the family can."""
    iterations: int = 100
    """Meta-iterations to run (a resumed run stops at the same total)."""
    checkpoint_every: int = 10
    """Write an atomic checkpoint every C iterations (and always after the last)."""
    seed: int = 0
    """Seed for grouping, network initialisation and every worker's RNG."""

    @property
    def outer_updates(self) -> int:
        """Adam steps on theta per meta-iteration (outer_epochs x outer_minibatches)."""
        return self.outer_epochs * self.outer_minibatches

    @property
    def inner_updates(self) -> int:
        """SGD steps per inner step (inner_epochs x inner_minibatches); 1: the MAML form."""
        return self.inner_epochs * self.inner_minibatches

    @property
    def reused_outer(self) -> bool:
        """The outer loop is PPO's (several clipped or reused steps per iteration), not one
        actor-critic step."""
        return self.outer_updates > 1 or self.outer_clip > 0


@dataclass(frozen=True)
class RayConfig:
    workers: int = 0
    """Task worker actors; 0 means one per training task. Fewer workers own several tasks each."""
    cpus_per_worker: float = 0.5
    """Ray CPUs reserved per task worker (fractional, so 12 fit on a laptop)."""
    gpus_per_worker: float = 0.0
    """Ray GPUs per task worker (fractional) when the cluster has GPUs; 0 keeps workers on CPU."""
    learner_gpus: LearnerGpus = "auto"
    """Learner GPU: 'auto' takes one when the cluster has any, '0' forces CPU, '1' requires one."""
    address: str = ""
    """Ray address to attach to; empty uses RAY_ADDRESS when set, else starts a local Ray."""
    num_cpus: int = 0
    """CPUs of a locally started Ray; 0 lets Ray detect them."""
    call_timeout_s: float = 900.0
    """Seconds one worker call may take before the worker counts as hung."""
    max_worker_restarts: int = 1000
    """Times Ray restarts a dead task worker (a lost node or OOM kill restarts it elsewhere)."""
    task_downtime_s: float = 600.0
    """A task dropped from every iteration for this long stops the run (resume once fixed)."""
    stop_grace_s: float = 20.0
    """On SIGTERM/Ctrl-C: finish the iteration in flight if it ends within this many seconds, else
    abandon it; then checkpoint and exit. Keep it below the scheduler's kill delay (Kubernetes'
    terminationGracePeriodSeconds and Slurm's KillWait: 30 s by default) minus a checkpoint write."""
    grad_reduce: GradReduce = "worker"
    """Where task gradients are summed before the learner: worker (one message per worker per
    iteration), node (then one per node), or task (every task's gradient goes to the learner)."""


@dataclass(frozen=True)
class LogConfig:
    experiment: str = "metarl"
    """Experiment name: the W&B group and the prefix of run names."""
    wandb_project: str = "metarl"
    """W&B project."""
    wandb_mode: WandbMode = "auto"
    """auto (online with WANDB_API_KEY, else offline), online, offline or disabled."""
    progress: bool = True
    """Show a progress bar on stderr."""
    every: int = 1
    """Log one row per E iterations (metrics.jsonl, W&B): numbers averaged over the E, drops and skips summed."""


@dataclass(frozen=True)
class SinusoidConfig:
    k_shot: int = 10
    """K: support (and query) points per task and adaptation step."""
    amp_range: tuple[float, float] = (0.1, 5.0)
    """Amplitude range of the sine tasks."""
    phase_range: tuple[float, float] = (0.0, 3.141592653589793)
    """Phase range of the sine tasks."""
    x_range: tuple[float, float] = (-5.0, 5.0)
    """Input range."""
    hidden: tuple[int, ...] = (40, 40)
    """Hidden layer widths of the ReLU regressor."""


@dataclass(frozen=True)
class Nav2dConfig:
    episodes: int = 20
    """Episodes per rollout (the batch B)."""
    horizon: int = 100
    """Steps per episode (H)."""
    goal_range: tuple[float, float] = (-0.5, 0.5)
    """Goals are drawn uniformly from this square."""
    hidden: tuple[int, ...] = (100, 100)
    """Hidden layer widths of the Gaussian policy."""
    max_action: float = 0.1
    """A move is max_action * clip(a, -1, 1) per coordinate: the policy acts in normalised units."""
    goal_tolerance: float = 0.01
    """An episode ends early when both coordinates are within this distance of the goal."""
    init_log_std: float = 0.0
    """Initial log-std of the Gaussian policy in normalised action units (part of theta)."""


@dataclass(frozen=True)
class MinAtarConfig:
    sticky_actions: float = 0.1
    """Probability a game repeats the previous action (MinAtar's default, Young & Tian 2019)."""
    difficulty_ramping: bool = True
    """MinAtar's difficulty ramping (games speed up as they go on): its default."""
    max_episode_steps: int = 10000
    """Truncate an episode after this many steps (0: never; MinAtar itself only ends Freeway on time)."""


@dataclass(frozen=True)
class FinetuneConfig:
    optimizer: FinetuneOptimizer = "sgd"
    """The learner `metarl eval` and `sweep` fine-tune held-out tasks with: sgd (the inner loop's plain SGD, one step per rollout) or adam."""
    lr: float = 0.0
    """Its step size; 0 takes meta.inner_lr (alpha)."""
    max_grad_norm: float = 0.0
    """Clip each fine-tuning gradient to this global norm; 0: no clipping (the inner loop's form)."""
    rollout_len: int = 0
    """T of each fine-tuning rollout (one update per num_envs x T steps); 0 takes env.rollout_len,
    the inner loop's rollout. Smaller T gives more, noisier updates per env step (A2C uses 5)."""
    epochs: int = 1
    """Passes over each rollout (PPO's epochs). 1 with minibatches 1 is one gradient per rollout,
    the inner loop's form; more makes the update PPO's clipped one (Schulman et al. 2017)."""
    minibatches: int = 1
    """Updates per epoch, each on a random 1/minibatches of the rollout's num_envs x T samples."""
    clip: float = 0.1
    """PPO's ratio and value clip (used when epochs x minibatches > 1)."""
    lr_decay: LrDecay = "constant"
    """The fine-tuning step size over the budget: constant, or falling to 0 (linear, cosine)."""
    bf16: bool = False
    """Run the network's matrix work in bfloat16 (torch.autocast; weights and optimizer stay float32):
    a PPO update 1.5-2x faster on one core of CPUs with AVX-512 BF16 or AMX (README: the learner on a GPU)."""
    gpus: float = 0.0
    """GPU share of each fine-tuning job (Ray num_gpus, e.g. 0.25: four jobs per GPU); > 0 runs the
    fine-tuner's network on cuda, acting and updates alike (emulators stay on the CPU)."""


@dataclass(frozen=True)
class Config:
    tasks: TasksConfig = field(default_factory=TasksConfig)
    """Which tasks to meta-train on and which to hold out."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Atari environment and rollout settings."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Actor-critic surrogate settings."""
    meta: MetaConfig = field(default_factory=MetaConfig)
    """Meta-learning algorithm and step sizes."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Actors and resources."""
    log: LogConfig = field(default_factory=LogConfig)
    """Experiment naming and W&B."""
    sinusoid: SinusoidConfig = field(default_factory=SinusoidConfig)
    """Sinusoid regression family (used when tasks.family = sinusoid)."""
    nav2d: Nav2dConfig = field(default_factory=Nav2dConfig)
    """2D navigation family (used when tasks.family = nav2d)."""
    minatar: MinAtarConfig = field(default_factory=MinAtarConfig)
    """MinAtar family (used when tasks.family = minatar); B and T come from env.num_envs and env.rollout_len."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The held-out fine-tuning learner of `metarl eval`, `learn` and `sweep` (also RLlib's PPO: `ppo`, `eval --learner rllib-ppo`)."""

    @property
    def finetuning(self) -> "Config":
        """This config with env.rollout_len set to the fine-tuner's rollout (finetune.rollout_len)."""
        if not self.finetune.rollout_len:
            return self
        return dataclasses.replace(self, env=dataclasses.replace(self.env, rollout_len=self.finetune.rollout_len))

    @property
    def finetune_lr(self) -> float:
        """The fine-tuner's step size (finetune.lr, or alpha when it is 0)."""
        return self.finetune.lr or self.meta.inner_lr

    # ---- derived values -------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks.train)

    @property
    def num_workers(self) -> int:
        n = self.ray.workers or self.num_tasks
        return min(n, self.num_tasks)

    @property
    def stacked(self) -> bool:
        """Every worker holds every task and computes whole groups in one batched call: where the
        family has a stacked form, unless meta.task_batching = per_task (validation refuses
        `stacked` for a family without one)."""
        return TRAITS[self.tasks.family].stacked and self.meta.task_batching != "per_task"

    @property
    def grads_can_ship(self) -> bool:
        """The members' evaluation gradients can be computed on the learner from shipped batches
        (meta.grad_on = learner): an algorithm whose member gradients need only theta' and the
        batch (fomaml), on game batches."""
        return ALGORITHMS[self.meta.algo].ships and TRAITS[self.tasks.family].games

    @property
    def run_name(self) -> str:
        algo = "joint" if self.meta.inner_steps == 0 else self.meta.algo
        return f"{self.log.experiment}-{algo}-skip{self.meta.skip}-seed{self.meta.seed}"

    @property
    def label(self) -> str:
        """The configuration a run trains, as sweeps and the W&B view name it: joint or skip<k>."""
        return "joint" if self.meta.inner_steps == 0 else f"skip{self.meta.skip}"

    def labelled_name(self, label: str = "") -> str:
        """run_name, with a sweep's own configuration label appended where it differs from `label`
        (skip2-updates trains at skip 2 beside skip2)."""
        return self.run_name if label in ("", self.label) else f"{self.run_name}-{label}"


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, strictly


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field (parsed from the source once)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value).strip()  # type: ignore[union-attr]
    return docs


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {sorted(f.name for f in fields(tp))}")
        return _build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} entries, got {list(value)!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is Literal:  # an enumeration of strings: coerced as a string, checked by check_enums
        return _coerce(value, str, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            hint = " (YAML reads on/off/yes/no as true/false: quote the word)" if isinstance(value, bool) else ""
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{key}'; allowed in {where}: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON and W&B."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config file must be a YAML mapping of sections (tasks, env, loss, meta, ray, log)")
    return _build(Config, data)


def load(path: str | Path | None) -> Config:
    """Load a YAML config file (None -> built-in defaults). Raises ConfigError."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file, e.g. configs/smoke.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{p}' is not valid YAML{where}; fix the syntax") from None
    return from_dict(data)


def override(cfg: Config, dotted: str, raw: Any) -> Config:
    """Return cfg with `section.key` set to raw (a string is parsed as YAML: 0.1, true, [a, b])."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{dotted}' must look like section.key, e.g. meta.inner_lr=0.05")
    section, key = parts
    if section not in {f.name for f in fields(Config)}:
        raise ConfigError(f"unknown config section '{section}'; allowed: {', '.join(f.name for f in fields(Config))}")
    sub = getattr(cfg, section)
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
    new_sub = _build(type(sub), {**{f.name: getattr(sub, f.name) for f in fields(sub)}, key: raw}, section)
    return replace(cfg, **{section: new_sub})


# ---------------------------------------------------------------------------------------------
# semantic validation


def check_enums(cfg: Config) -> None:
    """Every enumerated field (typed Literal) holds one of its values: the one place they are checked."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sub))
        for f in fields(sub):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            if allowed and getattr(sub, f.name) not in allowed:
                raise ConfigError(f"{section.name}.{f.name} '{getattr(sub, f.name)}' is unknown; "
                                  f"allowed: {', '.join(allowed)}")


def _positive(*pairs: tuple[str, float], at_least_one: bool = False) -> None:
    for key, v in pairs:
        if at_least_one and v < 1:
            raise ConfigError(f"{key} = {v} must be at least 1")
        if not at_least_one and not v > 0:
            raise ConfigError(f"{key} = {v} must be positive")


def _check_tasks(cfg: Config) -> None:
    t = cfg.tasks
    if not t.train:
        raise ConfigError("tasks.train is empty; list at least one training task")
    if len(set(t.train)) != len(t.train):
        dup = sorted({g for g in t.train if t.train.count(g) > 1})
        raise ConfigError(f"tasks.train lists {', '.join(dup)} more than once; each task once")
    traits = TRAITS[t.family]
    for key, names in (("tasks.train", t.train), ("tasks.heldout", t.heldout)):
        bad = traits.check_names(names)
        if bad is not None and traits.games:
            label = {"atari": "Atari game", "minatar": "MinAtar game"}[t.family]
            raise ConfigError(f"{key}: unknown {label} '{bad}'; valid games: {', '.join(traits.valid_games())}")
        if bad is not None:
            raise ConfigError(f"{key}: {t.family} task '{bad}' must be named {traits.names}")


def _check_env(cfg: Config) -> None:
    e = cfg.env
    _positive(("env.num_envs", e.num_envs), ("env.rollout_len", e.rollout_len), ("env.env_threads", e.env_threads),
              ("env.frameskip", e.frameskip), at_least_one=True)
    if not 0.0 <= e.sticky_actions <= 1.0:
        raise ConfigError(f"env.sticky_actions = {e.sticky_actions} must be a probability in [0, 1]")
    if e.noop_max < 0:
        raise ConfigError(f"env.noop_max = {e.noop_max} must be >= 0")


def _check_loss(cfg: Config) -> None:
    if cfg.loss.grad_chunk < 0:
        raise ConfigError(f"loss.grad_chunk = {cfg.loss.grad_chunk} must be >= 0 (0: the whole batch at once)")
    if not 0.0 < cfg.loss.gamma <= 1.0 or not 0.0 <= cfg.loss.gae_lambda <= 1.0:
        raise ConfigError("loss.gamma must be in (0, 1] and loss.gae_lambda in [0, 1]")


def _check_meta(cfg: Config) -> None:
    m = cfg.meta
    _positive(("meta.inner_lr", m.inner_lr), ("meta.outer_lr", m.outer_lr), ("meta.max_grad_norm", m.max_grad_norm))
    _positive(("meta.iterations", m.iterations), ("meta.checkpoint_every", m.checkpoint_every), at_least_one=True)
    if m.inner_steps < 0 or (m.inner_steps == 0 and m.algo != "fomaml"):
        raise ConfigError(f"meta.inner_steps = {m.inner_steps}: use >= 1, or 0 with algo fomaml (joint pre-training, "
                          f"no inner loop); got algo {m.algo}")
    if m.outer_epochs < 1 or m.outer_minibatches < 1 or not 0 <= m.outer_clip < math.inf:
        raise ConfigError(f"meta.outer_epochs and meta.outer_minibatches must be >= 1 and meta.outer_clip >= 0 "
                          f"(0: no clipping); got {m.outer_epochs}, {m.outer_minibatches}, {m.outer_clip}")
    if m.inner_epochs < 1 or m.inner_minibatches < 1 or not 0 <= m.inner_clip < math.inf:
        raise ConfigError(f"meta.inner_epochs and meta.inner_minibatches must be >= 1 and meta.inner_clip >= 0 "
                          f"(0: no clipping); got {m.inner_epochs}, {m.inner_minibatches}, {m.inner_clip}")
    if m.outer == "trpo":
        if m.algo == "reptile" or m.step_loss != "last":
            raise ConfigError(f"meta.outer = trpo constrains the post-update policy of maml or fomaml with "
                              f"meta.step_loss = last; got algo {m.algo}, step_loss {m.step_loss} (use meta.outer = adam)")
        if not (0 < m.max_kl < math.inf) or m.cg_iters < 1 or not 0 < m.fisher_fraction <= 1:
            raise ConfigError(f"meta.max_kl must be positive, meta.cg_iters >= 1 and meta.fisher_fraction in (0, 1]; "
                              f"got {m.max_kl}, {m.cg_iters}, {m.fisher_fraction}")


def _check_ray(cfg: Config) -> None:
    r = cfg.ray
    if r.workers < 0 or r.cpus_per_worker < 0 or r.gpus_per_worker < 0:
        raise ConfigError("ray.workers, ray.cpus_per_worker and ray.gpus_per_worker must be >= 0")
    if r.call_timeout_s <= 0 or r.task_downtime_s <= 0:
        raise ConfigError("ray.call_timeout_s and ray.task_downtime_s must be positive")
    if r.stop_grace_s < 0:
        raise ConfigError(f"ray.stop_grace_s must be >= 0 (0: abandon the iteration in flight at once), got {r.stop_grace_s:g}")


def _check_log(cfg: Config) -> None:
    if cfg.log.every < 1:
        raise ConfigError(f"log.every must be a whole number >= 1 (iterations per logged row), got {cfg.log.every}")


def _check_finetune(cfg: Config) -> None:
    f = cfg.finetune
    if f.rollout_len < 0:
        raise ConfigError(f"finetune.rollout_len = {f.rollout_len} must be >= 0 (0: env.rollout_len)")
    if f.lr < 0 or f.max_grad_norm < 0:
        raise ConfigError(f"finetune.lr and finetune.max_grad_norm must be >= 0 (0: alpha / no clipping); got {f.lr}, {f.max_grad_norm}")
    if f.gpus < 0:
        raise ConfigError(f"finetune.gpus = {f.gpus} must be >= 0 (0: the CPU)")
    if f.epochs < 1 or f.minibatches < 1:
        raise ConfigError(f"finetune.epochs and finetune.minibatches must be >= 1; got {f.epochs}, {f.minibatches}")
    if f.epochs * f.minibatches > 1:
        if not f.clip > 0:
            raise ConfigError(f"finetune.clip = {f.clip} must be > 0 (PPO's ratio clip, e.g. 0.1)")
        if cfg.tasks.family not in ("atari", "minatar"):
            raise ConfigError(f"finetune.epochs / minibatches > 1 (PPO) need a rollout family (atari, minatar), "
                              f"not {cfg.tasks.family}; set both to 1")
        samples = cfg.env.num_envs * (f.rollout_len or cfg.env.rollout_len)
        if f.minibatches > samples:
            raise ConfigError(f"finetune.minibatches = {f.minibatches} exceeds the rollout's {samples} samples "
                              f"(env.num_envs x finetune.rollout_len)")


def _check_families(cfg: Config) -> None:
    """The sections of the cheap families and MinAtar (checked whatever tasks.family is)."""
    s, n = cfg.sinusoid, cfg.nav2d
    for key, (lo, hi) in (("sinusoid.amp_range", s.amp_range), ("sinusoid.phase_range", s.phase_range),
                          ("sinusoid.x_range", s.x_range), ("nav2d.goal_range", n.goal_range)):
        if not lo <= hi:
            raise ConfigError(f"{key} = [{lo}, {hi}] must be [low, high] with low <= high")
    if not n.max_action > 0 or n.goal_tolerance < 0:
        raise ConfigError("nav2d.max_action must be positive and nav2d.goal_tolerance >= 0")
    _positive(("sinusoid.k_shot", s.k_shot), ("nav2d.episodes", n.episodes), ("nav2d.horizon", n.horizon),
              at_least_one=True)
    if not 0.0 <= cfg.minatar.sticky_actions <= 1.0 or cfg.minatar.max_episode_steps < 0:
        raise ConfigError("minatar.sticky_actions must be a probability in [0, 1] and minatar.max_episode_steps >= 0")


SECTION_CHECKS = (_check_tasks, _check_env, _check_loss, _check_meta, _check_ray, _check_log, _check_finetune,
                  _check_families)


# Cross-field rules: each returns None or the one line that says what does not fit and how to fix it.
def _skip_fits(cfg: Config) -> str | None:
    n = len(cfg.tasks.train)
    if not 1 <= cfg.meta.skip <= n:
        return f"meta.skip = {cfg.meta.skip} does not fit {n} training tasks; choose 1..{n}"
    return None


def _grad_on_learner(cfg: Config) -> str | None:
    m = cfg.meta
    if m.grad_on == "learner" and not cfg.grads_can_ship:
        return (f"meta.grad_on = learner ships game batches (atari, minatar) for first-order gradients; it does not apply to "
                f"algo {m.algo} on {cfg.tasks.family} (use worker or auto)")
    return None


def _stacking(cfg: Config) -> str | None:
    m, fam, stacked = cfg.meta, cfg.tasks.family, cfg.stacked
    if m.task_batching == "stacked" and not TRAITS[fam].stacked:
        return (f"meta.task_batching = stacked needs a family computed in stacks ({', '.join(STACKED_FAMILIES)}); "
                f"{fam} runs task by task: use auto or per_task")
    if m.step_loss == "mean" and (m.algo == "reptile" or not stacked):
        return (f"meta.step_loss = mean needs maml or fomaml on stacked {' or '.join(STACKED_FAMILIES)} tasks; "
                f"got algo {m.algo} on {fam} with meta.task_batching = {m.task_batching}")
    if m.outer == "trpo" and not (stacked and TRAITS[fam].policy):
        return (f"meta.outer = trpo needs a stacked policy family ({', '.join(POLICY_STACKED)}); "
                f"{fam} with meta.task_batching = {m.task_batching} uses meta.outer = adam")
    if cfg.tasks.resample and not stacked:
        return (f"tasks.resample draws new {', '.join(STACKED_FAMILIES)} tasks each iteration in stacked mode; "
                f"it does not apply to {fam} with meta.task_batching = {m.task_batching}")
    return None


def _outer_rounds(cfg: Config) -> str | None:
    m, fam = cfg.meta, cfg.tasks.family
    if not m.reused_outer:
        return None
    if m.algo != "fomaml" or m.outer != "adam" or not TRAITS[fam].games or cfg.stacked:
        return (f"meta.outer_epochs x outer_minibatches > 1 or meta.outer_clip > 0 (PPO's outer loop) runs fomaml "
                f"with meta.outer = adam on per-task game families ({', '.join(GAME_FAMILIES)}); got algo {m.algo}, "
                f"outer {m.outer} on {fam}: set meta.outer_epochs=1 meta.outer_minibatches=1 meta.outer_clip=0")
    return None


def _inner_ppo(cfg: Config) -> str | None:
    m, fam = cfg.meta, cfg.tasks.family
    if m.inner_updates == 1:
        return None
    if m.algo == "maml" or not TRAITS[fam].games or cfg.stacked or (m.reused_outer and m.follow == "exact"):
        return (f"meta.inner_epochs x inner_minibatches > 1 (PPO's update as the inner loop) is first-order: fomaml with "
                f"meta.follow = shift, or reptile, on per-task game families ({', '.join(GAME_FAMILIES)}); got algo "
                f"{m.algo}, follow {m.follow} on {fam}: set meta.inner_epochs=1 meta.inner_minibatches=1")
    return None


CROSS_RULES = (_skip_fits, _grad_on_learner, _stacking, _outer_rounds, _inner_ppo)


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot: the enumerations, each section, then the cross-field
    rules; raises ConfigError with one actionable line."""
    check_enums(cfg)
    for check in SECTION_CHECKS:
        check(cfg)
    for rule in CROSS_RULES:
        problem = rule(cfg)
        if problem:
            raise ConfigError(problem)
    return cfg


def describe() -> str:
    """Every key with its default and one-line doc (for `metarl run --help-config`)."""
    lines = []
    for f in fields(Config):
        sub = f.default_factory()  # type: ignore[misc]
        docs = _field_docs(type(sub))
        lines.append(f"{f.name}:")
        for sf in fields(sub):
            doc = " ".join(docs.get(sf.name, "").split())  # a doc written over several lines prints as one
            lines.append(f"  {sf.name}: {getattr(sub, sf.name)!r}  # {doc}")
    return "\n".join(lines)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
