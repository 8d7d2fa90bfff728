"""One self-contained HTML file per report (`parity compare --html FILE`): readable offline, years later.

Top to bottom: the verdict and the first divergence; the findings; the error growth per layer (max |d| of the
isolated and the chained replay on a log scale, over the tolerance band); the loss stages by case, coloured;
every compared tensor, whose metrics, worst element and histogram of differences open on a click; what was not
covered; the environment. Charts are plotly figures built in Python, with plotly.js inlined (no network).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from parity.findings import Report, Row

# max |d| of a bitwise-equal tensor, drawn on the log axis at this floor
BITWISE_FLOOR = 1e-12
_LAYER = re.compile(r"^layer (\d+)$")
_STAGE_CLASS = {"pass": "ok", "fail": "bad", "drift": "drift"}


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write the report as one HTML file; returns its path. Written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(render_html(report), encoding="utf-8")
    partial.replace(path)
    return path


def render_html(report: Report) -> str:
    from plotly.offline import get_plotlyjs

    from parity.report.summary import headline

    rows = report.rows
    verdict = report.verdict
    growth = growth_figure(report)
    drill = [_drill_entry(i, row) for i, row in enumerate(rows)]
    body = [
        f'<header class="verdict {"pass" if verdict == "parity" else "fail"}" id="verdict">'
        f'<h1>{_e(verdict.upper())}</h1><p id="headline">{_e(headline(report))}</p>'
        f'<p class="meta">{_e(report.command)} &middot; reference <code>{_e(report.reference)}</code> &middot; '
        f'candidate <code>{_e(report.candidate)}</code> &middot; profile <code>{_e(report.profile)}</code></p>'
        f'{_first_divergence(report)}</header>',
        _findings(report),
        '<section><h2>Error growth per layer</h2>' + (
            '<div id="growth" class="chart"></div><p class="hint">max |candidate &minus; reference| per layer '
            '(worst output tensor), log scale; bitwise-equal layers sit on the floor. The band is the chained '
            'tolerance (atol + rtol &middot; max|ref|), the dotted line the isolated one. Click a point for the tensor.</p>' if growth else
            '<p>No layer replay in this report.</p>') + '</section>',
        _loss_table(report),
        _tensor_table(rows),
        _coverage(report),
        _environment(report),
    ]
    data = {"growth": growth, "drill": drill}
    return _PAGE.format(title=_e(f"yolo-parity: {verdict} — {report.candidate}"), style=_STYLE,
                        plotly=get_plotlyjs(), body="\n".join(body),
                        data=json.dumps(data, allow_nan=False, default=str).replace("</", "<\\/"), script=_SCRIPT)


# ---------------------------------------------------------------------------------------------- charts
def growth_figure(report: Report) -> dict | None:
    """max |d| per layer for the isolated and the chained replay, over the tolerance band (a plotly figure)."""
    import plotly.graph_objects as go

    per_mode = {mode: _worst_per_layer(report.rows, mode) for mode in ("isolated", "chained")}
    if not any(per_mode.values()):
        return None
    types = {e.get("index"): e.get("type") for e in (report.context.get("layers") or [])}
    bands = {mode: {index: _allowed(row) for index, (_, row) in worst.items()} for mode, worst in per_mode.items()}
    band = {i: max(b.get(i, 0.0) for b in bands.values()) for i in set().union(*bands.values())}
    layers = sorted(band)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=[BITWISE_FLOOR] * len(layers), mode="lines", line={"width": 0},
                             hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(x=layers, y=[max(band[i], BITWISE_FLOOR) for i in layers], mode="lines",
                             fill="tonexty", name="tolerance", line={"color": "rgba(46,139,87,0.6)", "width": 1},
                             fillcolor="rgba(46,139,87,0.15)", hovertemplate="layer %{x}: tolerance %{y:.3g}<extra></extra>"))
    if bands["isolated"] and bands["chained"]:  # the isolated replay's tolerance is the tighter one
        xs = sorted(bands["isolated"])
        fig.add_trace(go.Scatter(x=xs, y=[max(bands["isolated"][i], BITWISE_FLOOR) for i in xs], mode="lines",
                                 name="isolated tolerance", line={"color": "rgba(46,139,87,0.9)", "dash": "dot"},
                                 hovertemplate="layer %{x}: isolated tolerance %{y:.3g}<extra></extra>"))
    styles = {"isolated": ("#1f77b4", "circle"), "chained": ("#ff7f0e", "diamond")}
    for mode, worst in per_mode.items():
        if not worst:
            continue
        xs = sorted(worst)
        color, symbol = styles[mode]
        values = [_plotted(worst[i][1]) for i in xs]
        fig.add_trace(go.Scatter(
            x=xs, y=values, mode="lines+markers", name=mode, line={"color": color},
            marker={"symbol": symbol, "size": 9, "color": ["#d62728" if not worst[i][1].passed else color for i in xs],
                    "line": {"width": 1, "color": "#333"}},
            customdata=[worst[i][0] for i in xs],
            text=[f"{types.get(i) or ''} {worst[i][1].name}: {_result(worst[i][1])}" for i in xs],
            hovertemplate="layer %{x} " + mode + "<br>%{text}<extra></extra>"))
    fig.update_layout(yaxis={"type": "log", "title": "max |d|", "exponentformat": "e"},
                      xaxis={"title": "layer", "dtick": 1}, height=420, margin={"l": 70, "r": 20, "t": 30, "b": 50},
                      legend={"orientation": "h", "y": 1.08}, template="plotly_white")
    return json.loads(fig.to_json())


def histogram_figure(row: Row) -> dict | None:
    """Counts of |candidate - reference| per quarter decade (parity.compare.histogram), with the tolerance."""
    import plotly.graph_objects as go

    histogram = (row.metrics or {}).get("histogram") or {}
    edges, counts = histogram.get("log10_edges") or [], histogram.get("counts") or []
    if not counts:
        return None
    centers = [10 ** ((a + b) / 2) for a, b in zip(edges, edges[1:])]
    widths = [10 ** b - 10 ** a for a, b in zip(edges, edges[1:])]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker={"color": "#1f77b4"},
                           hovertemplate="|d| ≈ %{x:.2g}: %{y} elements<extra></extra>"))
    allowed = _allowed(row)
    if allowed > 0:
        fig.add_vline(x=allowed, line={"color": "#2e8b57", "dash": "dash"}, annotation_text="tolerance")
    fig.update_layout(xaxis={"type": "log", "title": "|candidate − reference|", "exponentformat": "e"},
                      yaxis={"title": "elements"}, height=280, margin={"l": 60, "r": 20, "t": 20, "b": 50},
                      template="plotly_white", bargap=0)
    return json.loads(fig.to_json())


def _worst_per_layer(rows: list[Row], mode: str) -> dict[int, tuple[int, Row]]:
    worst: dict[int, tuple[int, Row]] = {}
    for i, row in enumerate(rows):
        match = _LAYER.match(row.where)
        if row.section != mode or not match or row.metrics is None:
            continue
        index = int(match.group(1))
        if index not in worst or _severity(row) > _severity(worst[index][1]):
            worst[index] = (i, row)
    return worst


def _severity(row: Row) -> tuple[bool, float]:
    return (not row.passed, _float((row.metrics or {}).get("max_abs")))


def _allowed(row: Row) -> float:
    """The most any element may be off: the absolute part actually applied plus rtol at the largest |ref|."""
    m, tol = row.metrics or {}, row.tolerance or {}
    return _float(m.get("effective_atol")) + _float(tol.get("rtol")) * _float(m.get("ref_absmax"))


def _plotted(row: Row) -> float:
    value = _float((row.metrics or {}).get("max_abs"), default=math.inf)
    if not math.isfinite(value):
        return 1e6  # NaN/Inf or a shape mismatch: far above any tolerance
    return max(value, BITWISE_FLOOR)


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in ("inf", "nan"):
        return math.inf
    return default


# ---------------------------------------------------------------------------------------------- panels
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _result(row: Row) -> str:
    m = row.metrics or {}
    if row.passed:
        if m.get("exact"):
            return "bitwise equal"
        return f"ok, max|d| {_num(m.get('max_abs'))}" if m.get("max_abs") is not None else "ok"
    from parity.report.summary import row_detail

    return f"FAIL: {row_detail(row)}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.3g}"
    return str(value)


def _first_divergence(report: Report) -> str:
    row = report.first_divergence()
    if row is None:
        return ""
    index = report.rows.index(row)
    return (f'<p class="first">First divergence: <a href="#tensors" data-row="{index}" class="open-row">'
            f'[{_e(row.section)}] {_e(row.where)} <code>{_e(row.name)}</code></a> &mdash; {_e(row.note)}</p>')


def _findings(report: Report) -> str:
    if not report.findings:
        return '<section><h2>Findings</h2><p>None.</p></section>'
    order = {"error": 0, "warning": 1, "info": 2}
    lines = ['<section><h2>Findings</h2><table class="findings"><tr><th>severity</th><th>signature</th>'
             '<th>where</th><th>message</th></tr>']
    for f in sorted(report.findings, key=lambda f: order.get(f.severity, 3)):
        lines.append(f'<tr class="{_e(f.severity)}"><td>{_e(f.severity)}</td><td><code>{_e(f.signature)}</code></td>'
                     f'<td>{_e(f.where)}</td><td>{_e(f.message)}</td></tr>')
    return "".join(lines) + "</table></section>"


def _loss_table(report: Report) -> str:
    loss = (report.context or {}).get("loss") or {}
    stages_by_case = loss.get("stages") or {}
    if not stages_by_case:
        return ""
    cases = list(stages_by_case)
    stages = list(dict.fromkeys(s for c in cases for s in stages_by_case[c]))
    categories = loss.get("categories") or {}
    first = loss.get("first_wrong_stage") or {}
    title = "Loss stages by case"
    if first:
        title += f": first wrong stage <b>{_e(first.get('stage'))}</b> ({_e(first.get('category'))})"
    lines = [f'<section><h2>{title}</h2><table class="stages"><tr><th>stage</th><th>part</th>',
             *(f"<th>{_e(c)}</th>" for c in cases), "</tr>"]
    for stage in stages:
        lines.append(f"<tr><td>{_e(stage)}</td><td>{_e(categories.get(stage, ''))}</td>")
        for case in cases:
            state = stages_by_case[case].get(stage, "-")
            lines.append(f'<td class="{_STAGE_CLASS.get(state, "none")}">{_e(state)}</td>')
        lines.append("</tr>")
    return "".join(lines) + "</table></section>"


def _tensor_table(rows: list[Row]) -> str:
    lines = ['<section id="tensors"><h2>Every check</h2><p class="hint">Click a row for its metrics, the worst '
             'element and the histogram of the differences. <label><input type="checkbox" id="only-failed"> '
             'failed only</label></p><div class="split"><div class="list"><table class="rows"><tr><th>section</th>'
             '<th>where</th><th>tensor / check</th><th>result</th></tr>']
    for i, row in enumerate(rows):
        status = "ok" if row.passed else "bad"
        kind = " has-histogram" if ((row.metrics or {}).get("histogram") or {}).get("counts") else ""
        lines.append(f'<tr class="row {status}{kind}" data-row="{i}"><td>{_e(row.section)}</td><td>{_e(row.where)}</td>'
                     f'<td><code>{_e(row.name)}</code></td><td class="{status}">{_e(_short(_result(row), 60))}</td></tr>')
    lines.append('</table></div><div class="detail" id="drill"><p>Select a row.</p></div></div></section>')
    return "".join(lines)


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


_DRILL_KEYS = ("ref_shape", "cand_shape", "ref_dtype", "cand_dtype", "numel", "exact", "max_abs", "max_rel",
               "mean_abs", "rmse", "cosine", "max_ulp", "mismatched", "mismatched_fraction", "nan_ref", "nan_cand",
               "inf_ref", "inf_cand", "ref_absmax", "effective_atol", "min_atol", "shape_note")


def _drill_entry(index: int, row: Row) -> dict:
    m = row.metrics or {}
    cells = [f"<h3>[{_e(row.section)}] {_e(row.where)}</h3><p><code>{_e(row.name)}</code>: "
             f'<b class="{"ok" if row.passed else "bad"}">{"passed" if row.passed else "FAILED"}</b></p>']
    if row.note:
        cells.append(f"<p>{_e(row.note)}</p>")
    if m.get("worst_index") is not None:
        cells.append(f'<p class="worst">worst element {_e(m.get("worst_index"))}: reference '
                     f'<code>{_e(m.get("ref_at_worst"))}</code>, candidate <code>{_e(m.get("cand_at_worst"))}</code></p>')
    shown = [(k, m[k]) for k in _DRILL_KEYS if k in m and m[k] not in (None, "")]
    if shown:
        cells.append('<table class="metrics">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(_num(v))}</td></tr>"
                                                           for k, v in shown) + "</table>")
    tol = row.tolerance or {}
    if tol:
        cells.append(f'<p class="hint">tolerance: atol {_e(tol.get("atol"))}, rtol {_e(tol.get("rtol"))}, '
                     f'atol·max|ref| {_e(tol.get("atol_absmax"))}, max ulp {_e(tol.get("max_ulp"))} &mdash; '
                     f'{_e(tol.get("source", ""))}</p>')
    histogram = m.get("histogram") or {}
    if histogram:
        cells.append(f'<p class="hint">differences: {_e(histogram.get("zero"))} of {_e(histogram.get("numel"))} '
                     f'elements identical, {_e(histogram.get("nonfinite"))} non-finite</p>')
    return {"html": "".join(cells), "histogram": histogram_figure(row)}


def _coverage(report: Report) -> str:
    lines = list((report.coverage or {}).get("not_checked") or [])
    for mode in ("isolated", "chained"):
        cov = (report.coverage or {}).get(mode) or {}
        if cov.get("left_out"):
            lines.append(f"{mode}: {len(cov['left_out'])} of {cov.get('reference_tensors')} reference tensors not "
                         f"compared (first: {', '.join(cov['left_out'][:4])})")
    if not lines:
        return ""
    return "<section><h2>Not covered</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul></section>"


def _environment(report: Report) -> str:
    env = (report.context or {}).get("environment") or {}
    reference = env.get("reference") or {}
    comparison = env.get("comparison") or {}
    profile = (report.context or {}).get("profile") or {}
    config = reference.get("config") or {}
    device = reference.get("environment") or {}
    facts = {
        "profile": f"{report.profile}: {profile.get('description', '')}",
        "reference device": f"{device.get('device')} ({device.get('device_name')})",
        "reference precision": config.get("precision"),
        "reference model": f"{config.get('model')} nc {config.get('nc')} imgsz {config.get('imgsz')} "
                           f"batch {config.get('batch')} seed {config.get('seed')}",
        "reference TF32 / deterministic": f"{device.get('tf32_matmul')}/{device.get('tf32_cudnn')} / "
                                          f"{device.get('deterministic_algorithms')}",
        "reference versions": _versions(reference.get("versions") or {}),
        "comparison device": comparison.get("device"),
        "comparison versions": _versions(comparison.get("versions") or {}),
        "comparison threads": comparison.get("threads"),
    }
    if device.get("cuda"):
        facts["reference CUDA / cuDNN / driver"] = f"{device.get('cuda')} / {device.get('cudnn')} / {device.get('driver')}"
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items() if v not in (None, ""))
    return f'<section id="environment"><h2>Environment</h2><table class="env">{rows}</table></section>'


def _versions(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header.verdict{padding:18px 28px;color:#fff}header.pass{background:#2e7d32}header.fail{background:#c62828}
header h1{margin:0 0 6px;font-size:32px;letter-spacing:1px}header p{margin:4px 0}header code{color:#fff}
header .first a{color:#fff;font-weight:600}
section{background:#fff;margin:14px 20px;padding:8px 18px 14px;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #e2e2e2;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f3f3f3}table.findings td:last-child{max-width:800px}
tr.error td:first-child{color:#c62828;font-weight:700}tr.warning td:first-child{color:#b26a00;font-weight:700}
tr.info td:first-child{color:#1565c0}
.ok{color:#2e7d32}.bad{color:#c62828;font-weight:600}
table.stages td.ok{background:#c8e6c9;color:#1b5e20}table.stages td.bad{background:#ffcdd2;color:#b71c1c}
table.stages td.drift{background:#fff3c4;color:#8a6d00}table.stages td.none{color:#999}
.split{display:flex;gap:14px;align-items:flex-start}.list{max-height:560px;overflow:auto;flex:1 1 55%}
.detail{flex:1 1 45%;position:sticky;top:0;min-height:200px}table.rows tr.row{cursor:pointer}
table.rows tr.row:hover{background:#eef4ff}table.rows tr.selected{background:#dbe8ff}
.hint{color:#666;font-size:12px}.chart{width:100%}code{font-size:12px}
body.only-failed table.rows tr.row.ok{display:none}
"""

_SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('parity-data').textContent);
  if (data.growth) {
    Plotly.newPlot('growth', data.growth.data, data.growth.layout, {displaylogo:false, responsive:true});
    document.getElementById('growth').on('plotly_click', function(ev){
      var p = ev.points[0]; if (p && p.customdata !== undefined) { openRow(p.customdata); }
    });
  }
  function openRow(i){
    var entry = data.drill[i], panel = document.getElementById('drill');
    panel.innerHTML = entry.html + (entry.histogram ? '<div id="drill-hist" class="chart"></div>' : '');
    if (entry.histogram) { Plotly.newPlot('drill-hist', entry.histogram.data, entry.histogram.layout, {displaylogo:false}); }
    document.querySelectorAll('tr.selected').forEach(function(r){ r.classList.remove('selected'); });
    var tr = document.querySelector('tr.row[data-row="' + i + '"]');
    if (tr) { tr.classList.add('selected'); tr.scrollIntoView({block:'nearest'}); }
  }
  document.querySelectorAll('[data-row]').forEach(function(el){
    el.addEventListener('click', function(){ openRow(parseInt(el.getAttribute('data-row'), 10)); });
  });
  document.getElementById('only-failed').addEventListener('change', function(ev){
    document.body.classList.toggle('only-failed', ev.target.checked);
  });
  var first = document.querySelector('tr.row.bad.has-histogram') || document.querySelector('tr.row.bad') ||
              document.querySelector('tr.row');
  if (first) { openRow(parseInt(first.getAttribute('data-row'), 10)); }
  document.body.setAttribute('data-rendered', 'yes');
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="generator" content="yolo-parity">
<style>{style}</style>
<script type="text/javascript">{plotly}</script>
</head><body>
{body}
<script type="application/json" id="parity-data">{data}</script>
<script type="text/javascript">{script}</script>
</body></html>
"""
