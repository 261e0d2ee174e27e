"""Benchmark 8's second half: the parts of a search that grow with its trials, driven directly
(no Ray) at sizes up to 10,000 trials. Run through benchmarks/scale.py (`--direct 1000 10000`):

    python benchmarks/scale.py --trials --direct 1000 2500 5000 10000

At each size: one write of search_state.json (`SearchProgress.save`), one copy of the SQLite
study into the storage (`StudySync.sync`), one TPE suggestion (the sampler of `tuning.study`,
configs/demo.yaml's space, 16 trials running: constant_liar counts them) and the report
(plots and report.html, and report.html's load and first sort in headless Chromium when one is
installed). The trials are synthetic: ASHA-like ends at epochs 1, 3 and 5.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

SPACE = {"learning_rate": {"loguniform": [1.0e-5, 3.0e-3]}, "augment_strength": {"uniform": [0.0, 0.3]},
         "dropout": {"uniform": [0.0, 0.3]}}  # configs/demo.yaml's


# --- the growing parts, driven directly --------------------------------------------------------

def synthetic(n: int, start: int, rng, epochs: int = 5):
    """Trials start..n-1: a study entry (5 epochs, ASHA-like ends) and a trials.csv row each."""
    import optuna
    from optuna.distributions import FloatDistribution

    dists = {"learning_rate": FloatDistribution(1e-5, 3e-3, log=True),
             "augment_strength": FloatDistribution(0.0, 0.3), "dropout": FloatDistribution(0.0, 0.3)}
    entries, rows = [], []
    for i in range(start, n):
        params = {"learning_rate": float(10 ** rng.uniform(-5, -2.53)), "augment_strength": rng.uniform(0, .3),
                  "dropout": rng.uniform(0, .3)}
        ran = [1, 3, 5][min(2, int(rng.exponential(0.5)))]
        curve = [float(12 + 20 * np.exp(-0.6 * e) + rng.normal(0, .5)) for e in range(1, ran + 1)]
        state = optuna.trial.TrialState.COMPLETE if ran == epochs else optuna.trial.TrialState.PRUNED
        entries.append(optuna.trial.create_trial(
            params=params, distributions=dists, state=state, value=min(curve) if ran == epochs else curve[-1],
            intermediate_values=dict(enumerate(curve, 1)), user_attrs={"ray_trial_id": f"t{i:05d}"}))
        rows.append({"trial_id": f"t{i:05d}", "status": "completed" if ran == epochs else "stopped_early",
                     "epochs": ran, "best_val_mae": min(curve), "last_val_mae": curve[-1], "val_mae_per_epoch": curve,
                     "time_s": 2.0 * ran, "node_id": "n", "host": "h", "best_epoch": int(np.argmin(curve)) + 1,
                     "ended": "" if ran == epochs else "asha", **{f"param.{k}": v for k, v in params.items()}})
    return entries, rows


def timed(fn, repeat: int = 3) -> float:
    took = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        took.append(time.perf_counter() - start)
    return min(took)


def direct(sizes: list[int]) -> list[dict]:
    """One state write, one study copy, one TPE suggestion and the report, at each size."""
    import optuna
    import pandas as pd

    from tuning.config import load_search_config
    from tuning.experiment import Experiment
    from tuning.html_report import write_html_report
    from tuning.progress import SearchProgress, StudySync
    from tuning.plots import draw_plots
    from tuning.study import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="scale-direct-"))
    exp = Experiment("direct", f"file://{work}/bucket", work / "local")
    exp.local_dir.mkdir(parents=True)
    cfg = load_search_config(None, [f"tune.space={json.dumps(SPACE)}", "tune.n_startup_trials=10"])
    study = optuna.create_study(storage=f"sqlite:///{exp.local_dir / 'optuna.db'}", study_name="direct",
                                sampler=make_sampler(cfg))
    progress, rng, rows, found = SearchProgress(exp, 0, 0, 1), np.random.default_rng(0), [], []
    for n in sizes:
        entries, new = synthetic(n, len(rows), rng)
        study.add_trials(entries)
        rows += new
        for row in new:
            progress.state["trial_seconds"][row["trial_id"]] = row["time_s"]
            progress.state["trial_brackets"][row["trial_id"]] = 0
        progress.state["asha_stopped"] = [r["trial_id"] for r in rows if r["epochs"] < 5]
        progress.state["rungs"] = [{str(m): {r["trial_id"]: r["val_mae_per_epoch"][m - 1] for r in rows
                                             if r["epochs"] >= m} for m in (1, 3)}]
        write = timed(progress.save)
        sync = timed(StudySync(exp).sync)
        space = entries[0].distributions if entries else {}
        running = [study.ask(space) for _ in range(16)]  # constant_liar: the running trials count
        suggest = timed(lambda: study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL), 3)
        for trial in running:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trials = pd.DataFrame(rows)
        summary = {"name": "direct", "num_trials": n, "storage": exp.uri, "study": "sqlite:///optuna.db",
                   "best": {"trial_id": rows[0]["trial_id"], "val_mae": rows[0]["best_val_mae"], "params": {},
                            "epochs": 5}, "test_metrics": None, "retrain_epochs": None, "retrain_epochs_rule": "",
                   "budget_stop": None, "retrain": None, "predictions_csv": None, "wall_time_s": 1.0,
                   "search_time_s": 1.0, "gpu_hours": 1.0, "reproduce": "", "split_sizes": {}, "final_dir": None}
        start = time.perf_counter()
        write_html_report(exp.local_dir, trials, study, summary, draw_plots(exp.local_dir, trials, study, summary))
        report = time.perf_counter() - start
        found.append({"trials": n, "state_write_ms": write * 1e3, "state_kib": (exp.local_dir /
                      "search_state.json").stat().st_size / 1024, "study_sync_ms": sync * 1e3,
                      "study_mib": (exp.local_dir / "optuna.db").stat().st_size / 2**20, "suggest_ms": suggest * 1e3,
                      "report_s": report, "report_html_mib": (exp.local_dir / "report.html").stat().st_size / 2**20,
                      **in_browser(exp.local_dir / "report.html")})
        print(found[-1], flush=True)
    return found


# Injected after the report's own script in a copy of report.html: the time from navigation to
# the load event (the page parsed, laid out, its images decoded), then one sort of the trials
# table on a column out of its order, as a click would run it, with the layout it forces.
TIMING = """<script>window.addEventListener('load',()=>{const loaded=performance.now();
const ths=[...document.querySelectorAll('#trials-table th')];
const th=ths.find(h=>h.dataset.key.startsWith('param.'))||ths[1];
const t0=performance.now();sortTable(th,false);document.body.offsetHeight;const sorted=performance.now()-t0;
document.body.dataset.bench=JSON.stringify({load_ms:loaded,sort_ms:sorted,rows:document.querySelectorAll('#trials-table tbody tr').length});});
</script>"""


def in_browser(report: Path) -> dict:
    """report.html in headless Chromium: load and first sort (ms, the page's own clock), and the
    browser's whole run (start, load, DOM dump, exit) as an upper bound. {} without Chromium."""
    import re
    import shutil
    import subprocess

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        return {}
    timed_copy = report.with_name("report-timed.html")
    timed_copy.write_text(report.read_text().replace("</main></body>", TIMING + "</main></body>"))
    profile = tempfile.mkdtemp(prefix="chromium-")
    start = time.perf_counter()
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--dump-dom", timed_copy.as_uri()],
                         capture_output=True, text=True, timeout=300)
    whole = time.perf_counter() - start
    found = re.search(r'data-bench="([^"]+)"', out.stdout)
    if not found:
        return {"browser_s": whole}
    timing = json.loads(found.group(1).replace("&quot;", '"'))
    return {"browser_s": whole, "load_ms": timing["load_ms"], "sort_ms": timing["sort_ms"], "rows": timing["rows"]}


DIRECT_HEADER = ["trials", "state write ms", "state KiB", "study copy ms", "study MiB", "TPE suggest ms",
                 "report s", "report.html MiB", "Chromium load ms", "first sort ms", "Chromium run s"]


def direct_rows(found: list[dict]) -> list[list]:
    return [[d["trials"], f"{d['state_write_ms']:.1f}", f"{d['state_kib']:.0f}", f"{d['study_sync_ms']:.0f}",
             f"{d['study_mib']:.1f}", f"{d['suggest_ms']:.0f}", f"{d['report_s']:.1f}", f"{d['report_html_mib']:.2f}",
             *(f"{d[k]:.0f}" if k in d else "-" for k in ("load_ms", "sort_ms")),
             f"{d['browser_s']:.1f}" if "browser_s" in d else "-"] for d in found]
