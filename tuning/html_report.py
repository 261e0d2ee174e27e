"""report.html: one self-contained page per experiment, to open offline or send to a colleague.

    path = write_html_report(exp_dir, trials, study, summary, plots)   # plots: tuning.plots.draw_plots

Every plot is embedded as a base64 PNG, the only script sorts the trials table, so the file
needs nothing beside it. Sections (each an element id): summary (with the command that
reproduces the search and how to open TensorBoard, optuna-dashboard and MLflow), final-model
(MAE overall, by sex and by age band with bootstrap 95% intervals, and the prediction
intervals' coverage), predictions (predicted vs true, residuals, intervals), variants (single vs
ensemble vs TTA), gallery (the worst test predictions with Grad-CAM), search (history,
importance, parallel coordinates, learning curves), trials (sortable; `#sort=-best_val_mae`
in the address sorts on load) and config. Reads the final/ files of `tuning.assess`.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import write_atomic
from boneage.evaluate import AGE_BANDS_YEARS
from tuning.plots import Unavailable, _draw, _pyplot
from tuning.report import FAILED_NOTE, _duration, failed_entries
from tuning.trials_csv import PARAM
from tuning.story import story_lines

REPORT = "report.html"
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;margin:0;background:#f4f6f8}
main{max-width:1180px;margin:auto;padding:12px 22px 40px;background:#fff}
h1{font-size:25px;margin:10px 0 4px}h2{font-size:20px;border-bottom:2px solid #dfe5eb;padding-bottom:3px;margin-top:30px}
h3{font-size:16px;margin:18px 0 6px}nav a{margin-right:12px}code{background:#eef1f4;padding:1px 4px;border-radius:3px}
pre{background:#eef1f4;padding:8px;overflow-x:auto}table{border-collapse:collapse;margin:6px 0 12px;font-size:13.5px}
th,td{border:1px solid #d6dde4;padding:3px 8px;text-align:left}th{background:#e9eef3}
tr:nth-child(even) td{background:#f8fafb}td.num{text-align:right;font-variant-numeric:tabular-nums}
#trials-table th{cursor:pointer;user-select:none}#trials-table th[aria-sort=ascending]::after{content:" \\25B2"}
#trials-table th[aria-sort=descending]::after{content:" \\25BC"}
.plot{max-width:100%;height:auto;border:1px solid #e3e8ed}.two{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px}
figure{margin:0}figure img{width:100%;border:1px solid #e3e8ed}figcaption{font-size:12.5px;color:#445}
.na{color:#8a5a00;font-style:italic}.big{font-size:18px;font-weight:600}
@media (max-width:900px){.two{grid-template-columns:1fr}}
"""
SCRIPT = """
function sortTable(th, descending){
  const table=th.closest('table'), body=table.tBodies[0], col=[...th.parentNode.children].indexOf(th);
  const key=r=>{const c=r.children[col]; const v=c.dataset.value; return v===undefined?c.textContent:parseFloat(v)};
  // each cell read once, not per comparison; the rows moved in one fragment: one layout, not one per row
  const keyed=[...body.rows].map(r=>[key(r),r]).sort(([x],[y])=>{
    if(typeof x==='number'&&typeof y==='number'){if(isNaN(x))return 1;if(isNaN(y))return -1;return descending?y-x:x-y}
    return descending?String(y).localeCompare(String(x)):String(x).localeCompare(String(y))});
  const moved=document.createDocumentFragment();
  keyed.forEach(([,r])=>moved.appendChild(r));
  body.appendChild(moved);
  table.querySelectorAll('th').forEach(h=>h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort',descending?'descending':'ascending');
}
document.querySelectorAll('#trials-table th').forEach(th=>th.addEventListener('click',()=>
  sortTable(th, th.getAttribute('aria-sort')==='ascending')));
window.addEventListener('load',()=>{
  const m=/sort=(-?)([\\w.]+)/.exec(location.hash);
  const th=m&&document.querySelector('#trials-table th[data-key="'+m[2]+'"]');
  if(th) sortTable(th, m[1]==='-');
  const imgs=[...document.images];
  document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+imgs.length;
});
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, spec=".2f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, (float, np.floating)) and abs(value) >= 1e6:
        spec = ".3g"  # a diverged trial's MAE should not widen its column
    return format(value, spec) if isinstance(value, (float, int, np.number)) else _e(value)


def _img(path: Path, alt: str, cls="plot") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _plot(out: Path, name: str, title: str, reason) -> str:
    if reason is None and (out / name).is_file():
        return f"<div><h3>{_e(title)}</h3>{_img(out / name, title)}</div>"
    return f'<div><h3>{_e(title)}</h3><p class="na">not available: {_e(reason or "not drawn")}</p></div>'


def _table(header, rows, numeric=(), attrs="") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                   for i, c in enumerate(row)) + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table {attrs}>{head}<tbody>{body}</tbody></table>"


def _ci(errors: np.ndarray, seed=0, n_boot=1000) -> tuple:
    if not len(errors):
        return None, None, None
    boot = errors[np.random.default_rng(seed).integers(0, len(errors), (n_boot, len(errors)))].mean(axis=1)
    return float(errors.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def _group_rows(frame: pd.DataFrame) -> list:
    """Per group (all, by sex, by true age band): n, MAE, its bootstrap 95% CI, interval coverage, width."""
    errors = (frame["predicted"] - frame["boneage"]).abs().to_numpy(float)
    male = frame["male"].astype(str).str.lower().isin(["1", "1.0", "true"]).to_numpy()
    age = frame["boneage"].to_numpy(float)
    has = "lower" in frame and "upper" in frame
    inside = ((age >= frame["lower"]) & (age <= frame["upper"])).to_numpy() if has else None
    width = (frame["upper"] - frame["lower"]).to_numpy(float) if has else None
    groups = [("all", np.ones(len(frame), bool)), ("male", male), ("female", ~male)]
    groups += [(f"{lo}-{hi} y", (age >= 12 * lo) & ((age < 12 * hi) | (hi == AGE_BANDS_YEARS[-1][1])))
               for lo, hi in AGE_BANDS_YEARS]
    rows = []
    for name, mask in groups:
        mae, lo, hi = _ci(errors[mask])
        row = [_e(name), str(int(mask.sum())), _num(mae), "-" if lo is None else f"{lo:.2f}-{hi:.2f}"]
        if has:
            row += [_num(float(inside[mask].mean()) * 100, ".0f") + "%" if mask.any() else "-",
                    _num(float(width[mask].mean()) if mask.any() else None)]
        rows.append(row)
    return rows


def _plot_intervals(frame: pd.DataFrame, coverage):
    if "lower" not in frame:
        raise Unavailable("no prediction intervals (tune.calibration_fraction or intervals.coverage is 0)")
    plt = _pyplot()
    frame = frame.sort_values("boneage")
    age, pred = frame["boneage"].to_numpy(float), frame["predicted"].to_numpy(float)
    inside = (age >= frame["lower"].to_numpy()) & (age <= frame["upper"].to_numpy())
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for mask, colour, label in ((inside, "tab:blue", "true age inside"), (~inside, "tab:red", "true age outside")):
        below = np.clip(pred - frame["lower"].to_numpy(), 0, None)  # clipped at age 0, rounded in the CSV
        above = np.clip(frame["upper"].to_numpy() - pred, 0, None)
        ax.errorbar(age[mask], pred[mask], yerr=[below[mask], above[mask]],
                    fmt="o", ms=3, lw=0.8, alpha=0.7, c=colour, label=f"{label} ({mask.sum()})")
    top = max(240.0, float(np.nanmax(np.r_[age, frame["upper"]])))
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(xlabel="true bone age (months)", ylabel="predicted, with interval (months)", xlim=(0, top), ylim=(0, top),
           title=f"Test predictions with their {coverage:.0%} prediction intervals" if coverage else "")
    ax.legend(loc="upper left")
    return fig


def _plot_variants(variants: list):
    if not variants:
        raise Unavailable("no variants assessed")
    plt = _pyplot()
    names = [v["name"] for v in variants]
    mae = np.array([v["mae"] for v in variants])
    lo, hi = np.array([v["mae_ci95"][0] for v in variants]), np.array([v["mae_ci95"][1] for v in variants])
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1.4))
    ax.barh(names[::-1], mae[::-1], xerr=[(mae - lo)[::-1], (hi - mae)[::-1]], color="tab:blue", capsize=4)
    ax.set(xlabel="test MAE (months), bootstrap 95% CI", title="Single model vs ensemble vs TTA (same test split)")
    return fig


def dashboard_command(study_url: str) -> str:
    """optuna-dashboard on the study's URL, which never holds a password: for PostgreSQL, libpq
    takes it from PGPASSWORD (or ~/.pgpass), here filled from the search's own variable."""
    if study_url.startswith("postgresql"):
        return f'PGPASSWORD="$BONEAGE_OPTUNA_PASSWORD" optuna-dashboard {study_url}'
    return f"optuna-dashboard {study_url}"


def _how_to_look(summary: dict, out: Path) -> str:
    study = summary.get("study") or f"sqlite:///{out / 'optuna.db'}"  # a summary from before "study"
    lines = [f"tensorboard --logdir {out}          # every trial's curves",
             f"{dashboard_command(study)}   # the Optuna study"]
    if (out / "mlflow.db").exists():
        lines.append(f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")
    return "<pre>" + _e("\n".join(lines)) + "</pre>"


def _trials_table(trials: pd.DataFrame) -> str:
    params = [c for c in trials if c.startswith(PARAM)]
    columns = [("trial_id", "trial"), ("status", "status"), ("ended", "why it ended"), ("epochs", "epochs"),
               ("best_val_mae", "best val MAE"), ("last_val_mae", "last val MAE"), ("time_s", "time (s)")]
    columns = [(k, label) for k, label in columns if k in trials] + [(p, p[len(PARAM):]) for p in params]
    head = "".join(f'<th data-key="{_e(k)}" title="click to sort">{_e(label)}</th>' for k, label in columns)
    body = []
    for _, row in trials.sort_values("best_val_mae", na_position="last", kind="stable").iterrows():
        cells = []
        for key, _ in columns:
            value = row[key]
            if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
                shown = _num(float(value), ".0f" if key == "time_s" else ".2f" if "mae" in key else ".4g")
                number = float(value) if pd.notna(value) else "NaN"  # JavaScript reads Infinity, not inf
                number = {math.inf: "Infinity", -math.inf: "-Infinity"}.get(number, number)
                cells.append(f'<td class="num" data-value="{number}">{shown}</td>')
            else:
                cells.append(f"<td>{_e('' if pd.isna(value) else value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="trials-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _bands(intervals: dict) -> str:
    half = intervals["half_widths"]
    if len(half) == 1:
        return (f"one band (prediction +- {half[0]:.1f} months; {sum(intervals['counts'])} calibration images "
                "are too few to give each age band its own)")
    cuts = [0.0, *intervals["edges"], 240.0]
    bands = [f"{lo / 12:g}-{hi / 12:g} y: +-{h:.1f}" for lo, hi, h in zip(cuts[:-1], cuts[1:], half)]
    return "by band of predicted age (" + ", ".join(bands) + " months)"


def _final_sections(out: Path, summary: dict) -> str:
    final = Path(summary["final_dir"]) if summary.get("final_dir") else None
    test, intervals = summary.get("test_metrics"), summary.get("intervals")
    parts = ['<h2 id="final-model">Final model on the held-out test split</h2>']
    table_csv = final / "test_intervals.csv" if final else None
    if not test or table_csv is None or not table_csv.is_file():
        parts.append('<p class="na">not available: no retrain, or no test split</p>')
        return "".join(parts) + '<h2 id="predictions">Predictions</h2><h2 id="variants">Variants</h2>' \
            '<h2 id="gallery">Worst predictions</h2>'
    frame = pd.read_csv(table_csv)
    parts.append(f"<p>The exported model ({_e(summary.get('exported', 'single'))}), trained on "
                 f"{_e(summary.get('trained_on', 'train + val'))}. MAE in months with a bootstrap 95% interval"
                 + (f"; {intervals['coverage']:.0%} split-conformal prediction intervals calibrated on "
                    f"{_e(intervals.get('calibration', ''))}, " + _bands(intervals) if intervals else "") + ".</p>")
    header = ["group", "n", "MAE", "95% CI"] + (["interval coverage", "mean width"] if "lower" in frame else [])
    parts.append(_table(header, _group_rows(frame), numeric=(1, 2, 4, 5)))
    parts.append('<h2 id="predictions">Predictions</h2>')
    parts.append(_plot(out, "test_predictions.png", "Predicted vs true, and residuals", None
                       if (out / "test_predictions.png").is_file() else "not drawn"))
    parts.append(_plot(out, "test_intervals.png", "Prediction intervals", _draw(
        out, "test_intervals.png", lambda p: _plot_intervals(frame, intervals and intervals["coverage"]))))
    variants = summary.get("variants") or []
    parts.append('<h2 id="variants">Single model vs ensemble vs test-time augmentation</h2>')
    if variants:
        parts.append(f"<p>Same test split. Ensemble: the retrained best config plus the last checkpoints of the "
                     f"next-best trials ({_e(', '.join(summary.get('members') or []) or 'none')}), averaged. TTA: "
                     "the mean over the identity, mirror, +-5 degree rotations and +-4% shifts. Each variant's "
                     "intervals are calibrated on its own predictions.</p>")
        rows = [[_e(v["name"]), str(v["members"]), _num(v["mae"]), f"{v['mae_ci95'][0]:.2f}-{v['mae_ci95'][1]:.2f}",
                 _num(v["rmse"]), _num(v.get("coverage", None) and 100 * v["coverage"], ".0f") + "%"
                 if v.get("coverage") is not None else "-", _num(v.get("mean_width"))] for v in variants]
        parts.append(_table(["variant", "models", "MAE", "95% CI", "RMSE", "interval coverage", "mean width"],
                            rows, numeric=(1, 2, 4, 5, 6)))
    parts.append(_plot(out, "variants.png", "Test MAE by variant", _draw(
        out, "variants.png", lambda p: _plot_variants(variants))))
    gallery = summary.get("gallery") or []
    parts.append('<h2 id="gallery">Worst predictions, with Grad-CAM</h2>')
    if gallery:
        parts.append("<p>The test radiographs with the largest errors. Warm colours: the regions whose features "
                     "drive the estimate away from the mean age, older or younger (Grad-CAM on the backbone's "
                     "last convolution).</p><div class=gallery>")
        for g in gallery:
            interval = f" [{g['lower'] / 12:.1f}-{g['upper'] / 12:.1f}]" if "lower" in g else ""
            caption = (f"{g['id']} ({'M' if g['male'] else 'F'}): true {g['true'] / 12:.1f} y, predicted "
                       f"{g['predicted'] / 12:.1f} y{interval}, error {g['error']:.1f} months")
            parts.append(f"<figure>{_img(final / g['file'], caption, 'cam')}<figcaption>error {g['error']:.1f} "
                         "months</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append('<p class="na">not available: tune.gallery_size is 0</p>')
    return "".join(parts)


def _failed_section(study) -> str:
    failed = failed_entries(study)
    if not failed:
        return ""
    return (f"<h3>Failed study entries ({len(failed)})</h3><p>{_e(FAILED_NOTE)}</p>"
            + _table(["entry", "Ray trial", "parameters"], [tuple(_e(v) for v in row) for row in failed]))


def write_html_report(experiment_dir, trials: pd.DataFrame, study, summary: dict, plots) -> Path:
    out = Path(experiment_dir)
    best, test, cover = summary.get("best") or {}, summary.get("test_metrics"), summary.get("test_intervals")
    statuses = ", ".join(f"{v} {k}" for k, v in trials["status"].value_counts().items())
    facts = [
        ("best trial", f"<code>{_e(best.get('trial_id', '-'))}</code>, validation MAE {_num(best.get('val_mae'))} "
                       f"months after {_num(best.get('epochs'), 'd')} epochs"),
        ("test MAE", "-" if not test else f'<span class="big">{test["mae"]:.2f} months</span> (95% CI '
                     f'{test["mae_ci95"][0]:.2f}-{test["mae_ci95"][1]:.2f}, n={test["n"]}); mean predictor '
                     f'{test["mean_predictor_mae"]:.2f}'),
        ("prediction intervals", "-" if not cover else f"{cover['nominal']:.0%} nominal, {cover['coverage']:.1%} of "
                                 f"test ages inside, mean width {cover['mean_width']:.1f} months"),
        ("trials", f"{len(trials)} ({_e(statuses)})"),
        ("retrain epochs", _e(summary.get("retrain_epochs_rule") or "-")),
        ("budget", _e(summary.get("budget_stop") or "not reached")),
        ("the search", _e(" ".join(story_lines(summary["search_story"]))) if summary.get("search_story") else "-"),
        ("data", _e(", ".join(f"{k} {v}" for k, v in (summary.get("split_sizes") or {}).items()) or "-")),
        ("wall time, GPU-hours", f"{_duration(summary.get('wall_time_s'))}, {summary.get('gpu_hours') or 0:.2f}"),
        ("results", f"<code>{_e(summary.get('storage', out))}</code>"),
    ]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'>"
             f"<title>Bone-age search {_e(summary.get('name', out.name))}</title><style>{STYLE}</style></head><body><main>",
             f"<h1>Bone-age hyperparameter search: {_e(summary.get('name', out.name))}</h1>",
             "<nav>" + "".join(f'<a href="#{i}">{t}</a>' for i, t in (
                 ("summary", "Summary"), ("final-model", "Final model"), ("predictions", "Predictions"),
                 ("variants", "Ensemble & TTA"), ("gallery", "Worst cases"), ("search", "Search"),
                 ("trials", "Trials"), ("config", "Config"))) + "</nav>",
             '<h2 id="summary">Summary</h2>', _table(None, [(k, v) for k, v in facts]),
             "<h3>Reproduce</h3><pre>" + _e(summary.get("reproduce", "-")) + "</pre>",
             "<h3>Look further</h3>" + _how_to_look(summary, out),
             _final_sections(out, summary),
             '<h2 id="search">The search</h2><div class=two>']
    parts += [_plot(out, name, title, reason) for name, title, reason in plots if name != "test_predictions.png"]
    parts += ["</div>", f'<h2 id="trials">Trials ({len(trials)})</h2><p>Click a column to sort.</p>',
              _trials_table(trials), _failed_section(study), '<h2 id="config">Best configuration</h2>',
              _table(["parameter", "value"], [(_e(k), _e(v)) for k, v in (best.get("params") or {}).items()]),
              f"<script>{SCRIPT}</script></main></body></html>"]
    path = out / REPORT
    write_atomic(path, "\n".join(parts))
    return path

