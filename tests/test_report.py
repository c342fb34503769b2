import json

import pytest

from mmcompress.cli import main
from mmcompress.eval.report import render_report


def test_report_renders_tables_and_plots(tmp_path, capsys):
    rows = [{"method": m, "sparsity": s, "ppl": p, "speedup": 1 + s} for m, base in (("teal", 13), ("larosa", 12))
            for s, p in ((0.25, base), (0.4, base + 1))]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "eval.json").write_text("some log line\n" + json.dumps({"ppl": 11.9, "tokens": 4096}))
    out = render_report(tmp_path)
    md = out.read_text()
    assert "| larosa | 0.4 | 13 | 1.4 |" in md
    assert "| ppl | 11.9 |" in md
    for png in ("sparsity_vs_ppl.png", "speed_vs_sparsity.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in md
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"] == str(out)


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no mmcompress JSON"):
        render_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        render_report(tmp_path / "missing")
