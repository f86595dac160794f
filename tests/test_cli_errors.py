"""Bad input: one line naming the problem, exit code 2, no traceback, nothing overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO


def metarl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "metarl", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)  # a hang guard, not a speed check


def assert_usage_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("metarl: error: ")
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.fixture
def smoke_variant(tmp_path):
    def write(text_replace: tuple[str, str]) -> Path:
        src = (CONFIGS / "smoke.yaml").read_text()
        assert text_replace[0] in src
        p = tmp_path / "cfg.yaml"
        p.write_text(src.replace(*text_replace))
        return p

    return write


def test_unknown_config_key(smoke_variant, tmp_path):
    cfg = smoke_variant(("inner_lr:", "inner_lrr:"))
    assert_usage_error(metarl("run", "--config", str(cfg), "--out", str(tmp_path / "r")), "meta.inner_lrr", "inner_lr")
    assert not (tmp_path / "r").exists()


def test_unknown_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metaa:\n  skip: 2\n")
    assert_usage_error(metarl("run", "--config", str(cfg)), "metaa", "allowed")


def test_unknown_game_lists_valid_ones(smoke_variant):
    cfg = smoke_variant(("[pong, breakout, freeway]", "[pong, breakot, freeway]"))
    p = metarl("run", "--config", str(cfg))
    assert_usage_error(p, "breakot", "valid games", "breakout", "space_invaders")


@pytest.mark.parametrize("skip", ["0", "4", "-1"])
def test_skip_that_does_not_fit(skip):
    assert_usage_error(metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--skip", skip), "meta.skip", "1..3")


@pytest.mark.parametrize("key", ["meta.inner_lr=0", "meta.outer_lr=-1e-3"])
def test_non_positive_step_size(key):
    assert_usage_error(metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--set", key), key.split("=")[0], "positive")


@pytest.mark.parametrize("key, words", [("meta.outer_lr_decay=step", ("outer_lr_decay", "cosine")),
                                        ("loss.grad_chunk=-1", ("loss.grad_chunk", ">= 0"))])
def test_unknown_schedule_or_negative_chunk(key, words):
    assert_usage_error(metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--set", key), *words)


@pytest.mark.parametrize("config, key, words", [
    ("smoke.yaml", "meta.task_batching=stack", ("task_batching", "per_task")),
    ("smoke.yaml", "meta.task_batching=on", ("task_batching", "quote")),
    ("smoke.yaml", "meta.task_batching=stacked", ("task_batching = stacked", "atari")),
    ("smoke.yaml", "tasks.resample=true", ("tasks.resample", "atari")),
    ("sinusoid.yaml", "log.every=0", ("log.every", ">= 1")),
    ("sinusoid.yaml", "meta.step_loss=mean --set meta.algo=reptile", ("step_loss = mean", "reptile")),
    ("sinusoid.yaml", "meta.step_loss=all", ("meta.step_loss", "last, mean")),
    ("sinusoid.yaml", "meta.outer=trpo", ("meta.outer = trpo", "nav2d", "adam")),
    ("nav2d.yaml", "meta.outer=sgd", ("meta.outer", "adam, trpo")),
    ("nav2d.yaml", "meta.algo=reptile", ("meta.outer = trpo", "reptile", "adam")),
    ("nav2d.yaml", "meta.step_loss=mean", ("meta.outer = trpo", "step_loss mean")),
    ("nav2d.yaml", "meta.task_batching=per_task", ("meta.outer = trpo", "per_task", "adam")),
    ("nav2d.yaml", "meta.max_kl=0", ("meta.max_kl", "positive")),
    ("nav2d.yaml", "meta.fisher_fraction=1.5", ("meta.fisher_fraction", "(0, 1]")),
])
def test_batching_resample_and_log_every_errors(config, key, words):
    sets = [x for k in key.split(" --set ") for x in ("--set", k)]
    assert_usage_error(metarl("run", "--config", str(CONFIGS / config), *sets), *words)


def test_wrong_type(smoke_variant):
    cfg = smoke_variant(("skip: 1 ", "skip: two "))
    assert_usage_error(metarl("run", "--config", str(cfg)), "meta.skip", "integer")


def test_missing_config_file(tmp_path):
    assert_usage_error(metarl("run", "--config", str(tmp_path / "nope.yaml")), "nope.yaml", "does not exist")


def test_invalid_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("meta: [skip: 1\n")
    assert_usage_error(metarl("run", "--config", str(cfg)), "not valid YAML")


def test_existing_run_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    before = snapshot(out)
    assert_usage_error(metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out)), "already exists", "--resume")
    assert snapshot(out) == before


def test_corrupt_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt_000003.pt").write_bytes(b"\x80\x02not a checkpoint at all")
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    before = snapshot(out)
    p = metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out), "--resume")
    assert_usage_error(p, "ckpt_000003.pt", "unreadable")
    assert snapshot(out) == before


def test_resume_without_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert_usage_error(metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--out", str(out), "--resume"), "no checkpoint")


def test_help_config_documents_every_key():
    p = metarl("run", "--help-config")
    assert p.returncode == 0
    for key in ("skip:", "inner_lr:", "num_envs:", "sticky_actions:", "learner_gpus:", "wandb_mode:"):
        assert key in p.stdout
    # every field of every section is listed once under its section, with a non-empty doc after "  # "
    # (docs are printed whitespace-collapsed, so the last "  # " of a line starts the doc)
    import dataclasses

    from metarl.core.config import Config

    listed: dict[str, dict[str, str]] = {}
    section = None
    for ln in p.stdout.splitlines():
        if ln and not ln.startswith(" "):
            section = ln.rstrip(":")
            listed[section] = {}
        elif ln.startswith("  "):
            key = ln.strip().split(":", 1)[0]
            head, sep, doc = ln.rpartition("  # ")
            assert sep and head.strip(), ln
            listed[section][key] = doc.strip()
    expected = {f.name: [sf.name for sf in dataclasses.fields(f.default_factory())] for f in dataclasses.fields(Config)}
    assert {s: list(keys) for s, keys in listed.items()} == expected
    undocumented = [f"{s}.{k}" for s, keys in listed.items() for k, doc in keys.items() if not doc]
    assert not undocumented, f"keys without a doc: {undocumented}"


@pytest.mark.parametrize("setting, needles", [
    ("env.num_envs=1e30", ("env.num_envs", "integer")),
    ("env.num_envs=1000000000", ("env.num_envs x env.rollout_len", "GB of rollout buffer per task", "largest Ray node")),
    ("env.env_threads=100000", ("env.env_threads = 100000", "CPUs")),
])
def test_a_config_beyond_the_machine_is_refused_before_anything_starts(tmp_path, setting, needles):
    out = tmp_path / "run"
    p = metarl("run", "--config", str(CONFIGS / "smoke.yaml"), "--local", "--set", setting, "--out", str(out))
    assert_usage_error(p, *needles)
    assert not out.exists()  # no run directory left behind


def test_every_enumerated_field_is_checked_whatever_builds_the_config():
    """Enumerations are typed (Literal) and checked in one place: also for a Config built in code."""
    import dataclasses
    import typing

    from metarl.core import config as config_mod

    cfg = config_mod.Config()
    checked = 0
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            if typing.get_origin(typing.get_type_hints(type(sub))[f.name]) is not typing.Literal:
                continue
            bad = dataclasses.replace(cfg, **{section.name: dataclasses.replace(sub, **{f.name: "bogus"})})
            with pytest.raises(config_mod.ConfigError, match=f"{section.name}.{f.name} 'bogus' is unknown; allowed: "):
                config_mod.validate(bad)
            checked += 1
    assert checked >= 11
    # YAML reads `learner_gpus: 0` as a number: coerced to the string the enumeration holds
    assert config_mod.from_dict({"ray": {"learner_gpus": 0}}).ray.learner_gpus == "0"
