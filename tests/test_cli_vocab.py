"""One vocabulary across the commands (README: "Commands and their common flags"): every README
command parses; an old spelling is one line naming the new one and exit 2; every command that writes
results refuses a directory that holds files; the cluster flags wherever Ray starts; --set wherever
a config is read; a flag sets only the config key its command declares."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
import torch

from metarl.core import checkpoint, config as config_mod
from metarl.cli import build_parser, main
from metarl.cliargs import resolve_config

from conftest import CONFIGS, REPO, smoke

SMOKE, MINATAR, SINE = str(CONFIGS / "smoke.yaml"), str(CONFIGS / "minatar.yaml"), str(CONFIGS / "sinusoid.yaml")


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in this process: its exit code (argparse's exits included) and its stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("metarl: error: ") and "Traceback" not in err, err
    return lines[0]


def readme_commands() -> list[str]:
    """Every `metarl ...` command in the README's code blocks (``` fences and 4-space indents),
    continuation lines joined; shell around it (loops, env vars, `ray job submit --`) dropped."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    blocks += re.findall(r"(?:^    \S.*\n)+", text, re.M)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line.strip())  # comments
            for m in re.finditer(r"(?:^|[\s;])metarl ((?:run|learn|eval|sweep|bench|curve|probe|export|ppo|training|"
                                 r"fewshot)\b[^;]*)", line):
                cmd = re.sub(r"\s*(done|&&.*)$", "", m.group(1)).strip()
                if "..." not in cmd and " --help" not in f"{cmd} ".replace("--help-", ""):  # elided, or help
                    commands.append(re.sub(r"\s\[[^\]]*\]", "", cmd))  # optional parts: [--later-lr 0.005]
    return commands


def test_every_readme_command_parses():
    commands = readme_commands()
    assert len(commands) > 40 and any(c.startswith("bench --suite learner") for c in commands)  # both kinds of block
    parser = build_parser()
    for cmd in commands:
        try:
            parser.parse_args(shlex.split(cmd.replace("$s", "0")))
        except SystemExit:
            pytest.fail(f"README command does not parse: metarl {cmd}")


@pytest.mark.parametrize("argv, says", [
    (["eval", "--checkpoint", "r", "--budget", "100"], "now --steps"),
    (["learn", "--config", MINATAR, "--out", "o", "--at", "100"], "now --at-steps"),
    (["sweep", "--budget", "1e6"], "now --train-budget"),
    (["sweep", "--eval-budget", "300000"], "now --steps"),
    (["sweep", "--eval-seeds", "5"], "now --seeds"),
    (["curve", "d", "--out", "o", "--at", "1e7"], "--at-steps 2.5e6"),
    (["fewshot", "eval", "--steps", "0,1,5"], "now --sgd-steps"),
    (["bench", "--learner"], "now --suite learner"),
    (["bench", "--scale"], "now --suite scale"),
    (["bench", "--suite", "scale", "--out-dir", "d"], "now --out DIR"),
    (["bench", "--out", "bench.json"], "bench --out is a directory now"),
    (["export", "--checkpoint", "r", "--rllib", "d"], "now --out DIR"),
])
def test_an_old_spelling_names_the_new_one(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, wherever
    code, err = cli(argv, capsys)
    assert code == 2 and says in one_line(err)
    assert not any(tmp_path.iterdir())


def fake_checkpoint(run_dir, cfg, theta=None):
    return checkpoint.save(run_dir, {"theta": torch.zeros(3) if theta is None else torch.from_numpy(theta),
                                     "optimizer": {}, "iteration": 1, "config": config_mod.to_dict(cfg)})


WRITERS = {  # each command that writes results, as far as it gets before writing (OUT: the directory)
    "run": ["run", "--config", SMOKE],
    "learn": ["learn", "--config", MINATAR],
    "eval": ["eval", "--checkpoint", "RUN"],
    "sweep": ["sweep", "--config", SMOKE],
    "bench": ["bench", "--quick"],
    "curve": ["curve", "RUN"],
    "probe": ["probe", "--config", MINATAR],
    "training": ["training", "RUN"],
    "export": ["export", "--checkpoint", "RUN"],
    "ppo": ["ppo", "--checkpoint", "RUN", "--game", "breakout", "--steps", "64"],
    "fewshot eval": ["fewshot", "eval", "--checkpoint", "a=RUN"],
    "fewshot pretrain": ["fewshot", "pretrain", "--config", SINE],
    "fewshot cost": ["fewshot", "cost", "--config", SINE],
    "references": ["references", "--config", MINATAR, "--steps", "64"],
}


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_that_writes_results_refuses_a_directory_with_files(command, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("earlier")
    argv = [str(tmp_path / "run") if a == "RUN" else a.replace("RUN", str(tmp_path / "run")) for a in WRITERS[command]]
    code, err = cli([*argv, "--out", str(out)], capsys)
    line = one_line(err)
    assert code == 2 and "already exists and is not empty" in line and "new --out" in line
    assert ("--resume" in line) == (command in ("run", "sweep"))  # where the command can continue
    assert [p.name for p in out.iterdir()] == ["earlier.txt"] and (out / "earlier.txt").read_text() == "earlier"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints whose config is what matters here (theta: the right size where it is read)."""
    from metarl.distributed.learner import initial_theta
    from metarl.tasks import make_family

    d = tmp_path_factory.mktemp("ckpts")
    minatar = config_mod.validate(config_mod.load(CONFIGS / "minatar.yaml"))
    fake_checkpoint(d / "smoke", smoke())
    fake_checkpoint(d / "minatar", minatar, initial_theta(make_family(minatar), 0))
    sine = config_mod.validate(config_mod.load(CONFIGS / "sinusoid.yaml"))
    fake_checkpoint(d / "sine", sine, initial_theta(make_family(sine), 0))
    return d


RAY_COMMANDS = {
    "run": ["run", "--config", SMOKE],
    "learn": ["learn", "--config", MINATAR, "--out", "OUT"],
    "eval": ["eval", "--checkpoint", "CKPT/smoke"],
    "sweep": ["sweep", "--config", SMOKE],
    "bench": ["bench", "--quick"],
    "ppo": ["ppo", "--checkpoint", "CKPT/minatar", "--game", "breakout", "--steps", "64", "--out", "OUT"],
    "references": ["references", "--config", MINATAR, "--steps", "64", "--out", "OUT"],
}


def fill(argv: list[str], ckpts, tmp_path) -> list[str]:
    return [a.replace("CKPT", str(ckpts)).replace("OUT", str(tmp_path / "out")) for a in argv]


@pytest.mark.parametrize("command", RAY_COMMANDS)
def test_the_cluster_flags_wherever_a_command_starts_ray(command, checkpoints, tmp_path, capsys):
    argv = fill(RAY_COMMANDS[command], checkpoints, tmp_path)
    args = build_parser().parse_args([*argv, "--local", "--address", "10.0.0.1:6379", "--wandb", "disabled"])
    assert args.local and args.address == "10.0.0.1:6379" and args.wandb == "disabled"
    code, err = cli([*argv, "--local", "--address", "10.0.0.1:6379"], capsys)
    assert code == 2 and "drop --address" in one_line(err)
    assert not (tmp_path / "out").exists()


CONFIG_READERS = {
    **RAY_COMMANDS,
    "probe": ["probe", "--config", MINATAR, "--out", "OUT"],
    "probe --checkpoint": ["probe", "--checkpoint", "CKPT/minatar", "--out", "OUT"],
    "fewshot eval": ["fewshot", "eval", "--checkpoint", "a=CKPT/sine", "--out", "OUT"],
    "fewshot pretrain": ["fewshot", "pretrain", "--config", SINE, "--out", "OUT"],
    "fewshot cost": ["fewshot", "cost", "--config", SINE],
}


@pytest.mark.parametrize("command", CONFIG_READERS)
def test_set_wherever_a_config_is_read(command, checkpoints, tmp_path, capsys):
    argv = fill(CONFIG_READERS[command], checkpoints, tmp_path)
    code, err = cli([*argv, "--set", "meta.inner_lr=-1"], capsys)
    assert code == 2 and "meta.inner_lr" in one_line(err) and "positive" in err
    assert not (tmp_path / "out").exists()


def test_a_flag_sets_only_the_key_its_command_declares(checkpoints):
    parse = build_parser().parse_args
    run = resolve_config(parse(["run", "--config", MINATAR, "--workers", "3", "--iterations", "7", "--seed", "4"]))
    assert (run.ray.workers, run.meta.iterations, run.meta.seed) == (3, 7, 4)
    learn = resolve_config(parse(["learn", "--config", MINATAR, "--workers", "3", "--lr", "0.01", "--out", "o"]))
    assert learn.ray.workers == 2 and learn.finetune.lr == 0.01  # --workers: fine-tuning actors, not ray.workers
    pre = resolve_config(parse(["fewshot", "pretrain", "--config", SINE, "--iterations", "5", "--out", "o"]))
    assert pre.meta.iterations == 70000  # --iterations: pre-training steps, not meta.iterations


def test_probe_with_a_checkpoint_refuses_seed(checkpoints, tmp_path, capsys):
    code, err = cli(["probe", "--checkpoint", str(checkpoints / "minatar"), "--seed", "3", "--games", "breakout",
                     "--seeds", "1", "--alphas", "0.1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "drop --seed" in one_line(err) and not (tmp_path / "o").exists()


def test_fewshot_pretrain_and_cost_from_the_command_line(tmp_path, capsys):
    sets = ["--set", "tasks.train=[sine-0000,sine-0001]", "--set", "log.wandb_mode=disabled"]
    out = tmp_path / "pre"
    assert main(["fewshot", "pretrain", "--config", SINE, *sets, "--iterations", "3", "--lr", "0.01", "--seed", "2",
                 "--out", str(out)]) == 0
    state = checkpoint.load(checkpoint.latest(out))
    assert state["kind"] == "pretrained" and state["iteration"] == 3
    assert state["config"]["meta"]["iterations"] == 70000 and state["config"]["meta"]["seed"] == 2
    assert state["theta"].numel() == 1761 and torch.isfinite(state["theta"]).all()
    cost = tmp_path / "cost"
    assert main(["fewshot", "cost", "--config", SINE, *sets, "--iterations", "1", "--out", str(cost)]) == 0
    rows = __import__("json").loads((cost / "cost.json").read_text())
    assert [r["algo"] for r in rows] == ["maml", "fomaml", "reptile"]
    assert all(r["seconds"] > 0 and np.isfinite(r["peak_mb"]) for r in rows)
    assert "| maml |" in capsys.readouterr().out
