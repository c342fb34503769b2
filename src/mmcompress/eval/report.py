"""``mmcompress report RUN_DIR``: render the JSON of runs into Markdown and PNG plots.

A run directory holds JSON files written by mmcompress: the ``--json`` output of ``quantize``,
``sparsify``, ``eval`` and ``bench`` (one object per file), ``diagnostics-*.json`` from
``quantize --report``, and ``demo.json``.  Each kind is recognised by its keys:

* diagnostics: per-layer SQNR by modality → ``sqnr_by_modality.png`` and a table of mean SQNR;
* results with ``sparsity`` and ``ppl`` → ``sparsity_vs_ppl.png``;
* results with ``sparsity`` and a speed-up (``speedup`` / ``ratio``) → ``speed_vs_sparsity.png``;
* anything else → a table of its top-level numbers.

The report goes to ``report.md`` and the plots beside it, in ``output_dir`` (default: the run
directory).  A ``report.md`` or plot that exists there and was not written by ``mmcompress report``
(its first line / PNG metadata say so) is never overwritten: the command refuses and names
``--output``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fileio import atomic_write, atomic_write_text

MARK = "<!-- written by mmcompress report; the next `mmcompress report` replaces this file -->"
PLOTS = ("sqnr_by_modality.png", "sparsity_vs_ppl.png", "speed_vs_sparsity.png")


def _load_runs(run_dir: Path) -> list[tuple[str, dict]]:
    runs = []
    for p in sorted(run_dir.glob("*.json")):
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # captured stdout: the JSON object is the last line
            try:
                data = json.loads(text.splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                continue
        if isinstance(data, dict):
            runs.append((p.stem, data))
    return runs


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def _scalars(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 60:
            out[prefix + k] = v
        elif isinstance(v, dict) and len(v) <= 8 and not prefix:
            out.update(_scalars(v, prefix=f"{k}."))
    return out


def _points(runs, ykeys) -> list[tuple[str, float, float]]:
    pts = []
    for name, d in runs:
        rows = d.get("rows") if isinstance(d.get("rows"), list) else [d]
        for r in rows:
            s = r.get("sparsity", r.get("model_sparsity"))
            y = next((r[k] for k in ykeys if isinstance(r.get(k), (int, float))), None)
            if isinstance(s, (int, float)) and y is not None:
                pts.append((str(r.get("method", name)), float(s), float(y)))
    return pts


def _plot_xy(points, ylabel, path: Path, title: str) -> Path | None:
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in sorted({p[0] for p in points}):
        xs = sorted((p[1], p[2]) for p in points if p[0] == method)
        ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=method)
    ax.set_xlabel("model-level sparsity")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..quant.diagnostics import PNG_METADATA

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=PNG_METADATA))
    plt.close(fig)
    return path


def _written_by_us(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".md":
        return head.startswith(MARK.encode())
    return head.startswith(b"\x89PNG") and b"mmcompress" in head


def _check_targets(out_dir: Path) -> None:
    """Refuse before writing anything if a file we would replace is not ours."""
    for name in ("report.md", *PLOTS):
        p = out_dir / name
        if (p.exists() or p.is_symlink()) and (not p.is_file() or not _written_by_us(p)):
            raise FileExistsError(f"{p} exists and was not written by mmcompress report; move it away or "
                                  "pass --output DIR to write the report elsewhere")


def render_report(run_dir, output_dir=None) -> Path:
    """Write ``report.md`` (and plots) into ``output_dir`` (default ``run_dir``); returns the Markdown path."""
    from ..quant.diagnostics import plot_sqnr

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    runs = _load_runs(run_dir)
    if not runs:
        raise ValueError(f"no mmcompress JSON results in {run_dir}")
    out_dir = Path(output_dir) if output_dir is not None else run_dir
    _check_targets(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [MARK, f"# mmcompress report: {run_dir.name}", ""]
    diag = [(n, d) for n, d in runs if n.startswith("diagnostics-")]
    others = [(n, d) for n, d in runs if not n.startswith("diagnostics-")]
    for name, d in others:
        if isinstance(d.get("rows"), list) and d["rows"]:
            cols = list(dict.fromkeys(k for r in d["rows"] for k in r if not isinstance(r[k], (dict, list))))
            lines += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in d["rows"]]
            lines.append("")
    if diag:
        png = plot_sqnr(run_dir, out_dir)
        lines += ["## Per-modality SQNR of decoder-layer outputs", ""]
        if png:
            lines += [f"![SQNR by modality]({png.name})", ""]
        mods = sorted({m for _, d in diag for m in d.get("summary", {}).get("mean_sqnr_accumulated", {})})
        lines += ["Pooled over tokens (energy ratio) and, after the slash, the median of the per-token SQNR "
                  "(an attention-sink token cannot dominate it).", "",
                  "| run | measured on | " + " | ".join(f"{m} (dB)" for m in mods) + " |",
                  "|---|---|" + "---|" * len(mods)]
        for name, d in diag:
            summ = d.get("summary", {})
            means = summ.get("mean_sqnr_accumulated") or summ.get("mean_sqnr_local", {})
            tok = summ.get("mean_sqnr_accumulated_token_median", {})
            cells = [_fmt(means.get(m)) + (f" / {_fmt(tok[m])}" if m in tok else "") for m in mods]
            data = d.get("sqnr_data") or {"set": "calibration (in-sample)"}
            where = data["set"] + (f", {data['nsamples']} samples" if data.get("nsamples") else "")
            lines.append(f"| {name.removeprefix('diagnostics-')} | {where} | " + " | ".join(cells) + " |")
        lines.append("")
    ppl = _plot_xy(_points(others, ("ppl", "wiki_ppl")), "perplexity", out_dir / "sparsity_vs_ppl.png",
                   "perplexity vs sparsity")
    if ppl:
        lines += ["## Perplexity vs sparsity", "", f"![perplexity vs sparsity]({ppl.name})", ""]
    speed = _plot_xy(_points(others, ("speedup", "decode_speedup", "ratio")), "speed-up (dense time / sparse time)",
                     out_dir / "speed_vs_sparsity.png", "speed vs sparsity")
    if speed:
        lines += ["## Speed vs sparsity", "", f"![speed vs sparsity]({speed.name})", ""]
    plain = [(n, d) for n, d in others if not isinstance(d.get("rows"), list)]
    if plain:
        lines += ["## Results", ""]
        for name, d in plain:
            sc = _scalars(d)
            if sc:
                lines += [f"**{name}**", "", "| key | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in sc.items()]
                lines.append("")
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))
