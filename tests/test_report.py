"""Run reports, TensorBoard events, model cards and progress bars."""

import json

from hlip_fed.cli import main


def fake_run(run_dir, rounds=3):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(1, rounds + 1):
        lines.append(json.dumps({
            "round": r, "train": {"train-loss": 3.0 - 0.5 * r}, "heldout": {"auc-mean": 0.5 + 0.05 * r, "r1": 0.1 * r, "r5": 0.2 * r, "r10": 0.3 * r},
            "train_sites": {"11": {"num-examples": 16.0}, "22": {"num-examples": 8.0}}, "rejected": [],
            "timing": {"exchanges": [{"type": "train", "messages": 2, "pushed": 0.0, "replies_s": [1.5, 2.25 * r]},
                                     {"type": "evaluate", "messages": 2, "pushed": 9.0, "replies_s": [0.5, 0.7]}],
                       "heldout_started": 10.0, "heldout_s": 1.0}}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_report_prints_the_table_and_writes_self_contained_html_and_markdown(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["report", str(run), "--tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "held-out AUC" in out and "0.650" in out and out.count("\n") >= 4
    assert "sites s" in out and "6.8" in out  # round 3: the slowest site answered 6.75 s after the push
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and (run / "curves.png").is_file()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert main(["report", str(run), "--format", "md", "--out", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| round |" in md and "![curves](curves.png)" in md and (tmp_path / "curves.png").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2 and "not found" in capsys.readouterr().err


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hlip_fed.outputs.report import close_tensorboard, read_rounds, tensorboard_round

    run = fake_run(tmp_path / "run")
    for rec in read_rounds(run):
        assert tensorboard_round(run, rec.to_json())
    close_tensorboard(run)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("heldout/auc-mean")] == [1, 2, 3]
    assert acc.Scalars("train/train-loss")[-1].value == 1.5


def test_an_evaluation_carried_by_the_next_round_is_filed_under_the_round_it_evaluated(tmp_path):
    """With one exchange a round, round r's line carries the sites' evaluation of round r-1's model:
    the round table and TensorBoard show it at round r-1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hlip_fed.outputs.report import close_tensorboard, read_rounds, tensorboard_round

    run = fake_run(tmp_path / "run")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r, line in enumerate(lines[1:], start=1):
        line["previous_eval"] = {"round": r, "eval": {"auc-mean": 0.6 + 0.1 * r, "auc-mean-count": 2.0},
                                 "eval_sites": {"11": {"auc-mean": 0.6 + 0.1 * r}}}
    lines[2]["eval"] = {"auc-mean": 0.95}  # the last round's own evaluation exchange
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rounds = read_rounds(run)
    assert [r.eval["auc-mean"] for r in rounds] == [0.7, 0.8, 0.95]
    assert rounds[0].eval_sites == {"11": {"auc-mean": 0.7}} and all(r.previous_eval is None for r in rounds)
    for line in lines:  # as the server writes them, round by round
        assert tensorboard_round(run, line)
    close_tensorboard(run)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert sorted((e.step, round(e.value, 2)) for e in acc.Scalars("eval/auc-mean")) == [(1, 0.7), (2, 0.8), (3, 0.95)]
    assert "eval/auc-mean-count" not in acc.Tags()["scalars"]


def test_model_card_records_provenance_intended_use_and_licences(tmp_path):
    from hlip_fed.config import load_config
    from hlip_fed.outputs.model_card import provenance_from_run, write_model_card

    run = fake_run(tmp_path / "run")
    (tmp_path / "data" / "site").mkdir(parents=True)
    (tmp_path / "data" / "site" / "a.txt").write_text("x")
    prov = provenance_from_run(run, load_config("tiny"), tmp_path / "data", site_names=["north", "south"])
    assert prov["rounds"] == 3 and prov["sites"] == {"north": 48, "south": 24} and len(prov["data_hash"]) == 16
    path = write_model_card(run / "model", prov)
    card = path.read_text()
    for needle in ("| rounds | 3 |", "north", "Apache-2.0", "MNI152", "Louis Collins", "2505.21862", "synthetic", "fedavg"):
        assert needle in card, needle
    data = json.loads((run / "model" / "model_card.json").read_text())
    assert data["training"]["config_hash"] == prov["config_hash"] and data["code_version"]


def test_model_card_names_where_the_model_departs_from_hlip(tmp_path):
    from omegaconf import OmegaConf

    from hlip_fed.config import load_config
    from hlip_fed.outputs.model_card import write_model_card

    cases = (
        ([], []),
        (["model.vision.pool=max", "model.text.proj=identity", "model.embed_dim=384"], ["max pooling", "no projection"]),
        (["model.loss.name=masked"], ["masked image modelling"]),
        (["model.vision.stem=patch_quantiles"], ["intensity quantiles"]),
        (["model.vision.stem=patch_mirror"], ["left-right difference"]),
    )
    for case, (overrides, expected) in enumerate(cases):
        out = tmp_path / str(case)
        out.mkdir()
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(load_config("tiny", overrides=overrides).model)))
        card = write_model_card(out, {}).read_text()
        data = json.loads((out / "model_card.json").read_text())
        assert len(data["departures_from_hlip"]) == len(expected)
        assert all(e in card for e in expected) and (("departs from HLIP" in card) == bool(expected))


def test_the_demo_prints_each_round_once_as_it_is_recorded_and_keeps_flowers_log(tmp_path, capsys):
    import sys

    from hlip_fed.outputs.report import format_round_table, read_rounds
    from simulations.demo import RoundLines, federate

    run = fake_run(tmp_path / "run", rounds=2)
    follow = RoundLines(run)
    first = follow.new_lines()
    assert len(first) == 3 and first[0].split()[0] == "round"  # header and two rounds
    assert follow.new_lines() == []
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train": {"train-lo')  # a line being written is read later
    assert follow.new_lines() == []
    full = fake_run(tmp_path / "full", rounds=3)
    (run / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())
    assert [line.split()[0] for line in follow.new_lines()] == ["3"]
    # The same figures as the report's table.
    assert [r.split() for r in first[1:]] == [r.split() for r in format_round_table(read_rounds(run)[:2]).splitlines()[1:]]

    # A run's chatter goes to RUN/flower.log; the terminal gets the round lines.
    script = ("import json, sys, time\nprint('INFO : a Flower log line', flush=True)\n"
              "for r in (1, 2):\n    open(sys.argv[1], 'a').write(json.dumps({'round': r}) + '\\n'); time.sleep(0.3)\n")
    out = tmp_path / "live"
    out.mkdir()
    federate([sys.executable, "-c", script, str(out / "metrics.jsonl")], None, out, poll_s=0.05)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["round", "1", "2"]
    assert "a Flower log line" in (out / "flower.log").read_text()


def test_curves_are_drawn_in_the_background_and_close_waits_for_the_last(tmp_path, monkeypatch, caplog):
    import hlip_fed.outputs.report as report

    run = fake_run(tmp_path / "run", rounds=2)
    drawn = []
    real = report.plot_run
    monkeypatch.setattr(report, "plot_run", lambda run_dir: drawn.append(len(report.read_rounds(run_dir))) or real(run_dir))
    curves = report.CurvePlotter(run)
    curves.request()
    fake_run(run, rounds=3)  # the run goes on while the curves are drawn
    curves.request()
    curves.close()
    assert drawn and drawn[-1] == 3 and len(drawn) <= 2  # the last drawing saw the last round
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".curves.png.*"))  # written atomically, no temporary left

    monkeypatch.setattr(report, "plot_run", lambda run_dir: 1 / 0)
    broken = report.CurvePlotter(run)
    broken.request()
    broken.close()  # a failed drawing is logged, not raised
    assert "were not drawn" in caplog.text


def test_a_round_record_writes_what_is_set_and_reads_back_what_it_knows():
    from hlip_fed.federation.round_record import RoundRecord

    rec = RoundRecord(round=3, train={"train-loss": 1.5}, rejected=[], heldout={"auc-mean": 0.6})
    assert rec.to_json() == {"round": 3, "train": {"train-loss": 1.5}, "rejected": [], "heldout": {"auc-mean": 0.6}}
    state = {"config_hash": "abc", "time": 1.0, **rec.to_json()}  # a checkpoint's state holds more
    assert RoundRecord.from_json(state) == rec
    assert rec.section("eval") == {} and rec.section("heldout") == {"auc-mean": 0.6}
