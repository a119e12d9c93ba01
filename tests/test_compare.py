"""experiments/compare.py: probe.py --json files, run folders and metrics.jsonl side by side; bad input."""
import json

import pytest

from experiments import compare


def test_json_run_folder_and_metrics_side_by_side(tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text(json.dumps({"summary": {"new": {"ppl": 3.25, "em": 0.5, "n": 2}}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "probes": {"updated": {"ppl": 9.5, "em": 0.25, "n": 1}}})
                                       + "\n" + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    compare.main([str(out), str(run)])
    table = capsys.readouterr().out
    assert "9.50 / 25.0" in table and "3.25 / 50.0" in table and "out.json" in table and "run" in table
    assert "EM %" in table.splitlines()[0]  # EM printed in %, kept a fraction in the files
    assert table.splitlines()[1].startswith("updated")  # the paper's splits first
    assert compare.load_summaries(run / "metrics.jsonl") == [("run", {"updated": {"ppl": 9.5, "em": 0.25, "n": 1}})]


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "p.tsv").write_text("Ann plays for\tKugo Rovers\tupdated\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    for path in ("p.tsv", "binary.jsonl", "empty", "none.json"):
        with pytest.raises(SystemExit) as e:
            compare.main([str(tmp_path / path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and path in err[0], err
