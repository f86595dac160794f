"""W&B, checked in what it received: a real offline MinAtar sweep and run, read back from the files
wandb wrote; `--resume` continuing the same W&B run; and the dashboard view built from the sweep's
runs, every panel naming a metric those runs logged.

How the files are read: wandb 0.31 writes an offline run as `run-<id>.wandb`, a LevelDB-format log
of wandb's own protobuf `Record`s (`wandb.proto.wandb_internal_pb2`), and no longer ships a Python
reader for it (`wandb.sdk.internal.datastore` is gone; `files/` holds no config or summary). The
reader below reads the log format (7-byte header `:W&B` 0xBEE1 0, 32 KiB blocks, records of
crc32 / length / type chunks, each checksum verified) and decodes the records with that protobuf.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from metarl.experiments import dashboard
from metarl.cli import main
from metarl.distributed.tracking import read_metrics

from conftest import CONFIGS

pytest.importorskip("minatar")

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """The protobuf records of one `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:HEADER]) == (0xBEE1, 0), data[:HEADER]
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, (path, pos)
        pos += HEADER + n
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(parts))
    return out


def closed_records(path: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's `exit` record is written: wandb 0.31 can return from finish()
    before its service has written a resumed run's file (seen: 7 bytes, complete 1 s later)."""
    deadline = time.monotonic() + timeout_s
    while not (out := records(path)) or out[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s:g} s"
        time.sleep(0.1)
    return out


def received(run_dir: Path) -> list[SimpleNamespace]:
    """Per W&B run wandb wrote under run_dir/wandb (one per start: a resume adds one): its id,
    group, job type, config, history rows, merged summary and media files on disk."""
    out = []
    for log in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run, history, summary = None, [], {}
        for r in closed_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        out.append(SimpleNamespace(id=run.run_id, group=run.run_group, job_type=run.job_type, config=config,
                                   history=history, summary=summary,
                                   media=sorted(p.relative_to(log.parent / "files").as_posix()
                                                for p in (log.parent / "files" / "media").rglob("*.png"))))
    return out


TINY = ["--config", str(CONFIGS / "minatar.yaml"), "--set", "env.num_envs=4", "--set", "env.rollout_len=8",
        "--set", "meta.outer_epochs=2", "--set", "meta.outer_minibatches=1", "--set", "finetune.epochs=1",
        "--set", "finetune.minibatches=1", "--wandb", "offline", "--local", "--no-progress"]


@pytest.fixture(scope="module")
def offline_sweep(tmp_path_factory):
    """Skip counts 1 and 2 and the baseline, 2 meta-iterations each, W&B offline (~5 s)."""
    out = tmp_path_factory.mktemp("wandb") / "sweep"
    code = main(["sweep", *TINY, "--set", "tasks.train=[asterix,seaquest]", "--set", "tasks.heldout=[breakout]",
                 "--skips", "1,2", "--train-budget", "2", "--steps", "128", "--seeds", "1", "--out", str(out)])
    assert code == 0
    runs = {d: received(out / d) for d in ("skip1", "skip2", "skip1/eval", "skip2/eval", "baseline/eval", ".")}
    assert all(len(r) == 1 for r in runs.values()), {d: len(r) for d, r in runs.items()}
    return out, {d: r[0] for d, r in runs.items()}


def assert_mirrors(history: list[dict], rows: list[dict]) -> None:
    """W&B got one history row per metrics file row, holding its every number."""
    assert len(history) == len(rows)
    for got, row in zip(history, rows):
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numeric and all(got[k] == pytest.approx(v) for k, v in numeric.items()), (got, row)


def test_runs_log_metrics_images_and_summary_to_wandb(offline_sweep):
    out, runs = offline_sweep
    train, ev, sw = runs["skip2"], runs["skip2/eval"], runs["."]
    assert train.id == (out / "skip2" / "wandb_id_train.txt").read_text()
    assert (train.group, train.job_type) == ("minatar", "train") and (ev.group, ev.job_type) == ("minatar", "eval")
    assert train.config["skip"] == 2 and train.config["fold"] == "breakout" and train.config["meta"]["skip"] == 2
    rows = read_metrics(out / "skip2" / "metrics.jsonl")
    assert len(rows) == 2
    assert_mirrors(train.history, rows)
    assert train.summary["frames/total"] == rows[-1]["frames/total"]
    # eval: one row per curve point, the images (also on disk), the scores, the theta's compute
    points = read_metrics(out / "skip2" / "eval" / "eval_metrics.jsonl")
    assert_mirrors([h for h in ev.history if "point" in h], points)
    assert "eval/breakout/meta/reward_rate" in points[0]
    images = {k.split("/_type")[0] for k, v in ev.summary.items() if v == "image-file"}
    assert images == {"curves/breakout", "summary"} and len(ev.media) == 2
    assert "breakout/meta/auc_return_mean" in ev.summary and ev.summary["breakout/meta/seeds"] == 1
    assert ev.config["meta_frames"] == rows[-1]["frames/total"] > 0 and ev.config["skip"] == 2
    assert runs["baseline/eval"].config["meta_frames"] == 0
    # the sweep's run: its comparison image and every configuration's scores
    assert sw.job_type == "sweep" and sw.summary["comparison/_type"] == "image-file" and len(sw.media) == 1
    assert {"skip1/breakout/auc_return_mean", "skip2/breakout/frames",
            "baseline/breakout/auc_return_mean"} <= set(sw.summary)


def test_resume_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "run"
    args = ["run", *TINY, "--set", "tasks.train=[asterix,seaquest]", "--set", "meta.checkpoint_every=1",
            "--out", str(out)]
    assert main([*args, "--iterations", "1"]) == 0
    assert main([*args, "--iterations", "2", "--resume"]) == 0
    first, second = received(out)
    assert first.id == second.id == (out / "wandb_id_train.txt").read_text()
    assert [h["iteration"] for h in first.history + second.history] == [1, 2]
    assert second.history[0]["frames/total"] == 2 * first.history[0]["frames/total"]


def panel_names(view) -> list[tuple[str, str]]:
    """(where, name) of every metric a panel of the view reads: history, summary or config."""
    import wandb_workspaces.reports.v2 as wr

    out = []
    for section in view.sections:
        for p in section.panels:
            if isinstance(p, wr.LinePlot):
                out += [("history", p.x)] + [("history", y) for y in p.y]
            elif isinstance(p, wr.ScatterPlot):
                out += [("config", p.x.name), ("summary", p.y.name)]
            else:
                raise AssertionError(f"a panel the test does not read: {p}")
    return out


def missing(view, runs) -> list[tuple[str, str]]:
    logged = {"history": {k for r in runs for h in r.history for k in h},
              "summary": {k for r in runs for k in r.summary}, "config": {k for r in runs for k in r.config}}
    return [(where, name) for where, name in panel_names(view) if name not in logged[where]]


def test_dashboard_panels_read_what_the_runs_logged(offline_sweep, capsys, monkeypatch):
    out, runs = offline_sweep
    spec = out / "dashboard.json"
    assert dashboard.read_spec(spec).heldout_games == ("breakout",)  # the sweep wrote it: W&B was offline
    assert main(["dashboard", "--sweep", str(out), "--wandb", "offline", "--entity", "me"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"metarl dashboard --spec {spec} --entity me" in line and len(line.splitlines()) == 1
    inputs = dashboard.read_spec(spec)
    assert (inputs.entity, inputs.project, inputs.group) == ("me", "metarl", "minatar")
    assert (inputs.train_games, inputs.heldout_games) == (("asterix", "seaquest"), ("breakout",))
    view = dashboard.build(inputs)
    names = {n for _, n in panel_names(view)}
    assert {"return/pre", "return/post", "rate_post/seaquest", "frames/total", "outer/approx_kl",
            "eval/breakout/fresh/return", "breakout/meta/auc_return_mean", "meta_frames"} <= names
    trained = [r for r in runs.values() if r.job_type in ("train", "eval")]
    assert missing(view, trained) == []
    groups = [g.name for g in view.runset_settings.groupby]
    assert groups == ["config", "fold"] and all(set(groups) <= set(r.config) for r in trained)
    assert {r.config["config"] for r in trained} == {"skip1", "skip2", "baseline"}  # joint and -updates apart from skip<k>
    assert json.loads(spec.read_text())["view"]["spec"]["section"]["runSets"][0]["grouping"][0]["name"] == "config.value"
    # a metric renamed in the code the runs ran, not in the view: the check names it
    monkeypatch.setattr(dashboard, "ADAPTATION", (("return/pre", "return/adapted"),) + dashboard.ADAPTATION[1:])
    assert missing(dashboard.build(inputs), trained) == [("history", "return/adapted")]


def test_dashboard_online_saves_the_view_it_would_write(offline_sweep, monkeypatch, capsys):
    """The online step alone is replaced (no network here): the view `--spec` creates is the one
    built from the sweep's runs."""
    import wandb_workspaces.workspaces as ws

    out, _ = offline_sweep
    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or SimpleNamespace(url="https://w/v"))
    assert main(["dashboard", "--spec", str(out / "dashboard.json"), "--entity", "team", "--wandb", "online"]) == 0
    assert capsys.readouterr().out.strip() == "dashboard: https://w/v"
    [view] = saved
    assert (view.entity, view.project) == ("team", "metarl")
    assert panel_names(view) == panel_names(dashboard.build(dashboard.sweep_inputs(out)))


def test_dashboard_from_the_runs_wandb_holds(offline_sweep):
    """`metarl dashboard --project P --group G` reads the runs through wandb.Api; here an Api that
    answers with what the offline sweep's runs sent (job type, config, summary)."""
    out, runs = offline_sweep

    class Api:
        def runs(self, path, filters):
            assert (path, filters) == ("me/metarl", {"group": "minatar"})
            return [SimpleNamespace(job_type=r.job_type, config=r.config, summary=r.summary) for r in runs.values()]

    v = dashboard.api_inputs(Api(), "me", "metarl", "minatar")
    assert (v.train_games, v.heldout_games) == (("asterix", "seaquest"), ("breakout",))
    assert panel_names(dashboard.build(v)) == panel_names(dashboard.build(dashboard.sweep_inputs(out)))


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "/nonexistent/sweep"], "is not a directory"),
    (["--sweep", "{empty}"], "no sweep.json"),
    (["--spec", "{empty}/none.json", "--wandb", "online"], "is not a dashboard.json"),
    (["--spec", "{spec}", "--wandb", "offline"], "needs W&B online"),
    (["--project", "p", "--wandb", "offline"], "needs W&B online"),
    ([], "pass --project"),
])
def test_dashboard_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    spec = tmp_path / "dashboard.json"
    spec.write_text(json.dumps({"inputs": {"project": "p", "group": "g", "train_games": [], "heldout_games": [],
                                           "logged": []}}))
    args = [a.format(empty=tmp_path, spec=spec) for a in args]
    assert main(["dashboard", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metarl: error: ") and needle in err[0], err
