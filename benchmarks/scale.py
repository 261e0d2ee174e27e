"""Benchmark 8, scale: does a search's cost grow linearly with its trials?

    python benchmarks/scale.py                                  # 100, 300, 1000 trials; s3:// and a folder
    python benchmarks/scale.py --trials 100 300 --seconds 0.5 --save after.json --compare before.json

The real `tuning.search` (Ray Tune, our searcher, ASHA scheduler, callbacks, study sync, report)
runs replayed trials (`tuning.replay`: the formula's curves, no TensorFlow) on a
`ray.cluster_utils.Cluster` on 127.0.0.1: a head with no CPUs and two nodes of 8 CPUs and 8
logical GPUs, one trial per GPU, `--concurrent` at once; storage in s3:// on a local S3 server
(moto, in its own process, counting every write) or in a folder. Each search runs in a process
of its own (the driver), whose time and memory are its own. Per block of `--block` trials that
end, it records: wall time against the ideal (the epochs the block ran x seconds per epoch /
concurrency), driver CPU (`process_time`) per result, what the storage received per trial (S3:
objects and bytes written; a folder: bytes the driver wrote, from /proc/self/io), Ray's
experiment snapshots (forced ones apart; the seconds they took: Ray's own share), the seconds of
our own per-result callbacks, and TPE's suggestion latency (`StudySearch.suggest`, the study
copy into s3:// included). At the end: the report's time, report.html's size and the driver's
peak memory. Then the parts that grow, driven directly up to `--direct` trials (no Ray,
benchmarks/scale_parts.py): one search-state write, one study copy, one TPE suggestion, the
report. Target (issue 17): last block within 1.25x of the first; wall within 1.3x of the ideal.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale_parts import DIRECT_HEADER, SPACE, direct, direct_rows

REPO = Path(__file__).resolve().parent.parent

COUNTING_S3 = r"""
import json, logging, sys, threading
logging.getLogger("werkzeug").setLevel(logging.WARNING)
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
counts, lock = {"objects": 0, "bytes": 0, "requests": 0}, threading.Lock()
app = DomainDispatcherApplication(create_backend_app)
OURS = ("search_state.json", "optuna.db", "summary.json", "trials.csv", "report", "final", "mlflow", "prepared-images")
def kind(path):
    # who wrote it: a trial (its checkpoints), our own files, or Ray's experiment snapshot (its
    # state files and every trial's result.json, progress.csv, params, events)
    parts = path.strip("/").split("/")
    if any(p.startswith("checkpoint_") for p in parts):
        return "checkpoint"
    return "ours" if any(p.startswith(OURS) for p in parts) else "ray"
def counting(environ, start):
    if environ["PATH_INFO"] == "/__counts__":
        start("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(counts).encode()]
    with lock:
        counts["requests"] += 1
        method, query = environ["REQUEST_METHOD"], environ["QUERY_STRING"]
        # pyarrow writes every object as a multipart upload: POST ?uploads starts one
        new = (method == "POST" and query == "uploads") or (method == "PUT" and "partNumber" not in query)
        size = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH") or 0) \
            if method == "PUT" else 0
        who = kind(environ["PATH_INFO"]) if method in ("PUT", "POST") else None
        counts["objects"] += new
        counts["bytes"] += size
        if who:
            counts[f"objects_{who}"] = counts.get(f"objects_{who}", 0) + new
            counts[f"bytes_{who}"] = counts.get(f"bytes_{who}", 0) + size
    return app(environ, start)
server = make_server("127.0.0.1", 0, counting, threaded=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


# --- one search, in its own process ------------------------------------------------------------

def s3_server():
    """A moto S3 server in a child process that counts writes; (process, endpoint)."""
    proc = subprocess.Popen([sys.executable, "-c", COUNTING_S3], stdout=subprocess.PIPE, text=True)
    endpoint = f"http://127.0.0.1:{proc.stdout.readline().strip()}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="scale")
    return proc, endpoint


def storage_counts(endpoint: str | None) -> dict:
    if endpoint:
        import urllib.request

        return json.loads(urllib.request.urlopen(f"{endpoint}/__counts__").read())
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"objects": 0, "bytes": int(io["wchar"]), "requests": 0}


class Meter:
    """Wraps a function to add up its calls and seconds (instrumentation, the function unchanged)."""

    def __init__(self, owner, name: str, record=None):
        self.calls, self.seconds, self.cpu, self.samples = 0, 0.0, 0.0, []
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if record:
                record(*args, **kwargs)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.calls, self.seconds = self.calls + 1, self.seconds + took
                self.cpu += time.thread_time() - cpu  # this thread's CPU: not the wait for a busy core
                self.samples.append(took)
        setattr(owner, name, timed)


def one_search(args) -> dict:
    import ray.tune.execution.experiment_state as experiment_state
    from ray import tune
    from ray.cluster_utils import Cluster

    import tuning.progress
    import tuning.retrain
    import tuning.study
    import tuning.tracking
    from tuning.config import load_search_config
    from tuning.search import search

    work = Path(tempfile.mkdtemp(prefix="scale-"))
    moto, endpoint = s3_server() if args.storage == "s3" else (None, None)
    storage = f"s3://scale/{args.trials}" if endpoint else str(work / "experiments")
    overrides = [f"data.root={work / 'phantom'}", "data.source=phantom", "data.phantom_n=40", "model.image_size=71",
                 f"train.epochs={args.epochs}", "train.early_stopping_patience=0", f"tune.storage_path={storage}",
                 f"tune.num_samples={args.trials}", f"tune.max_concurrent_trials={args.concurrent}",
                 "tune.n_startup_trials=10", f"tune.grace_period={args.grace}", "tune.reduction_factor=3", "tune.retrain=false",
                 "tune.resources={cpu: 0.5, gpu: 1}", f"tune.space={json.dumps(SPACE)}", "tune.replay.curves=formula",
                 f"tune.replay.seconds_per_epoch={args.seconds}", f"tune.replay.checkpoint_mib={args.checkpoint_mib}"]
    cfg = load_search_config(None, overrides)

    # instrumentation: counters around the real functions
    forced = {"n": 0, "taken": 0}

    def snapshot_call(manager, save_fn, force=False, wait=False):  # Ray calls it every step; most return
        force = force or manager._should_force_sync_up
        forced["n"] += force
        forced["taken"] += force or time.monotonic() - manager._last_save_time >= manager._checkpoint_period
    snapshot = Meter(experiment_state._ExperimentCheckpointManager, "sync_up_experiment_state", snapshot_call)
    suggest = Meter(tuning.study.StudySearch, "suggest")
    ours = [Meter(tuning.progress.SearchProgress, "on_trial_result"),
            Meter(tuning.progress.StudySync, "on_trial_result"),
            Meter(tuning.progress.SearchProgress, "on_trial_complete"),
            Meter(tuning.progress.StudySync, "on_trial_complete")]
    report = Meter(tuning.retrain, "finish")
    blocks, seen = [], {"results": 0, "ended": 0}

    def mark():
        counts = storage_counts(endpoint)
        # "loop_cpu": the CPU of the thread that runs Ray's loop, our callbacks, the scheduler and
        # the searcher (mark runs in it); "cpu": the whole driver's, with Ray's core-worker threads
        # and the background uploads of its snapshots
        blocks.append({"t": time.time(), "cpu": time.process_time(), "loop_cpu": time.thread_time(),
                       "suggest_cpu": suggest.cpu, "snapshot_cpu": snapshot.cpu,
                       **seen, **counts, "forced": forced["n"], "taken": forced["taken"],
                       "snapshots": snapshot.calls, "snapshot_s": snapshot.seconds,
                       "ours_s": sum(m.seconds for m in ours), "suggests": list(suggest.samples)})

    class Probe(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen["results"] += 1
            if not blocks:
                mark()  # the first result: the search's fixed start-up is over

        def on_trial_complete(self, iteration, trials, trial, **info):
            seen["ended"] += 1
            if seen["ended"] % args.block == 0:
                mark()

    plain = tuning.tracking.tracking_callbacks
    tuning.tracking.tracking_callbacks = lambda cfg, exp: plain(cfg, exp) + [Probe()]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=8, num_gpus=args.concurrent // 2)
    cluster.wait_for_nodes()
    started = time.time()
    try:
        search(cfg, f"scale-{args.trials}", address=cluster.address)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        if moto:
            moto.terminate()
    out = Path(cfg.tune.storage_path if not endpoint else Path.home() / "boneage-experiments") / f"scale-{args.trials}"
    html = out / "report.html"
    return {"trials": args.trials, "storage": args.storage, "wall_s": time.time() - started, "blocks": blocks,
            "report_s": report.seconds, "report_html_bytes": html.stat().st_size if html.exists() else 0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": args.seconds, "concurrent": args.concurrent}


def block_rows(run: dict) -> list[list]:
    """One row per block: trials, wall/ideal, CPU ms per result, storage per trial, snapshots."""
    rows, b = [], run["blocks"]
    for before, after in zip(b, b[1:]):
        trials, results = after["ended"] - before["ended"], after["results"] - before["results"]
        ideal = results * run["seconds"] / run["concurrent"]
        wall = after["t"] - before["t"]
        lat = after["suggests"][len(before["suggests"]):] or [0.0]
        rows.append([f"{before['ended']}-{after['ended']}", f"{wall:.0f}", f"{wall / ideal:.2f}",
                     f"{(after['cpu'] - before['cpu']) / results * 1e3:.1f}",
                     f"{(after['bytes'] - before['bytes']) / trials / 2**20:.2f}",
                     f"{(after['objects'] - before['objects']) / trials:.0f}",
                     f"{after.get('taken', after['snapshots']) - before.get('taken', before['snapshots'])} "
                     f"({after['forced'] - before['forced']})",
                     f"{(after['snapshot_s'] - before['snapshot_s']) / wall * 100:.0f}%",
                     f"{(after['ours_s'] - before['ours_s']) / results * 1e3:.1f}",
                     f"{sum(lat) / len(lat) * 1e3:.0f} / {max(lat) * 1e3:.0f}"])
    return rows


BLOCK_HEADER = ["trials", "wall s", "wall/ideal", "driver CPU ms/result", "MiB written/trial", "objects/trial",
                "snapshots (forced)", "snapshot share of wall", "our callbacks ms/result", "TPE suggest ms mean/max"]


# --- the whole benchmark -------------------------------------------------------------------------

def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        b = run["blocks"]
        ends = [a["ended"] for a in b[1:]]
        label = f"{run.get('label', '')} {run['storage']} {run['trials']}".strip()
        axes[0].plot(ends, [(a["cpu"] - p["cpu"]) / (a["results"] - p["results"]) * 1e3 for p, a in zip(b, b[1:])],
                     marker="o", label=label)
        axes[1].plot(ends, [(a["bytes"] - p["bytes"]) / (a["ended"] - p["ended"]) / 2**20 for p, a in zip(b, b[1:])],
                     marker="o", label=label)
    axes[0].set(xlabel="trials ended", ylabel="driver CPU ms per result", title="driver CPU per result, per block")
    axes[1].set(xlabel="trials ended", ylabel="MiB written per trial", title="storage writes per trial, per block")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="*", default=[100, 300, 1000], help="none: the direct part only")
    parser.add_argument("--storage", nargs="+", default=["s3", "folder"], choices=["s3", "folder"])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grace", type=int, default=1, help="ASHA's grace period (--epochs: no early stops)")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--checkpoint-mib", type=float, default=1.0)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--direct", type=int, nargs="*", default=[1000, 2500, 5000, 10000])
    parser.add_argument("--label", default="", help="e.g. before / after, kept in --save")
    parser.add_argument("--save", help="write the runs as JSON here")
    parser.add_argument("--compare", nargs="*", default=[], help="earlier --save files shown beside these")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single search, JSON out
    args = parser.parse_args()
    if args.one:
        os.environ["HOME"] = tempfile.mkdtemp(prefix="scale-home-")
        args.trials, args.storage = args.trials[0], args.storage[0]
        print("SCALE-RESULT " + json.dumps(one_search(args)), flush=True)
        return
    runs = []
    for trials in args.trials:
        for storage in args.storage:
            cmd = [sys.executable, __file__, "--one", "--trials", str(trials), "--storage", storage,
                   "--seconds", str(args.seconds), "--epochs", str(args.epochs), "--grace", str(args.grace),
                   "--concurrent", str(args.concurrent),
                   "--checkpoint-mib", str(args.checkpoint_mib), "--block", str(args.block)]
            print("running", " ".join(cmd[2:]), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, start_new_session=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("SCALE-RESULT ")]
            if not line:
                print(done.stdout[-3000:], done.stderr[-6000:])
                raise SystemExit(f"the {trials}-trial search on {storage} failed")
            runs.append({**json.loads(line[-1][13:]), "label": args.label})
            print_run(runs[-1])
    found = direct(args.direct) if args.direct else []
    if found:
        print(table(DIRECT_HEADER, direct_rows(found)))
    if args.save:
        Path(args.save).write_text(json.dumps({"runs": runs, "direct": found, "args": vars(args)}))
    earlier = [json.loads(Path(p).read_text()) for p in args.compare]
    if not args.no_record:
        write_results(args, [r for e in earlier for r in e["runs"]] + runs,
                      [(e["args"]["label"], e["direct"]) for e in earlier] + [(args.label, found)])


def print_run(run: dict) -> None:
    print(f"{run.get('label', '')} {run['trials']} trials, {run['storage']}: {run['wall_s']:.0f} s, report "
          f"{run['report_s']:.1f} s, report.html {run['report_html_bytes'] / 2**20:.2f} MiB, driver peak "
          f"{run['peak_rss_mib']:.0f} MiB")
    print(table(BLOCK_HEADER, block_rows(run)), flush=True)


def table(header, rows) -> str:
    from record import table as markdown

    return markdown(header, rows)


NOTES = """What grew with the trials, and what was changed (issue 17):

- `CheckpointConfig(num_to_keep=1)` made Ray force an experiment snapshot whenever a trial had
  checkpointed once since the last one: a snapshot per checkpoint, each writing every trial's
  state and uploading the driver's whole experiment folder again (Ray does not diff: every
  trial's result.json, progress.csv, params and events). Now there is no `num_to_keep`: Ray
  snapshots on its own period (`TUNE_GLOBAL_CHECKPOINT_S`, "auto": every 10 s or more, at most 5%
  of the time); every checkpoint is kept while the search runs and once it has ended each trial
  keeps its last (`tuning.search.trim_checkpoints`). The storage holds up to `train.epochs`
  checkpoints per running or ended trial until then (about 1.7 per trial at ASHA's grace period
  1, factor 3, 5 epochs) instead of 1.
- search_state.json was rewritten (indented) on every result and uploaded at every trial's start
  and end; the SQLite study was copied into s3:// on every result, at every trial's start and end
  and at every suggestion. Both are now written at Ray's snapshots (`Callback.get_state`, which
  Ray calls after it wrote the searcher's state and before it uploads it: the study copy always
  knows every entry the saved searcher names) and when the search stops.
- What a crash can lose: what happened since the last snapshot, Ray's state and ours alike (they
  come back from the same moment). Trials go on from the checkpoint that snapshot names (kept,
  as nothing is deleted before the end), so at most one snapshot period of epochs is redone;
  before, Ray's forced snapshots lost at most the epoch in flight. tests/test_head_loss.py
  (Ctrl-C and a killed head, s3://) passes unchanged, and checks each trial keeps one checkpoint.
- Ray's own snapshot stays O(trials) each time, but its period adapts to 19x its duration, so its
  share of the wall time stays near 5% (column "snapshot share of wall").
- Plots draw the best 50 trials in colour and the rest as one grey artist, and say so.
"""


def growth(run: dict) -> str:
    """Last block against the first: the ratios the issue's targets are about."""
    b = run["blocks"]
    if len(b) < 3:
        return ""
    (p0, a0), (p1, a1) = (b[0], b[1]), (b[-2], b[-1])
    cpu = [(a["cpu"] - p["cpu"]) / (a["results"] - p["results"]) for p, a in ((p0, a0), (p1, a1))]
    mib = [(a["bytes"] - p["bytes"]) / (a["ended"] - p["ended"]) for p, a in ((p0, a0), (p1, a1))]
    ideal = (b[-1]["results"] - b[0]["results"]) * run["seconds"] / run["concurrent"]
    return (f"Last block / first: driver CPU per result **{cpu[1] / cpu[0]:.2f}x**, bytes written per trial "
            f"**{mib[1] / mib[0]:.2f}x** (target 1.25x); wall from the first result to the last trial's end "
            f"**{(b[-1]['t'] - b[0]['t']) / ideal:.1f}x** the ideal (target 1.3x).")


def write_results(args, runs: list[dict], directs: list[tuple[str, list]]) -> None:
    from record import record

    parts = []
    for run in runs:
        parts.append(f"**{run.get('label') or 'run'}: {run['trials']} trials, {run['storage']}** ({run['seconds']:g} s "
                     f"epochs, {run['concurrent']} at once): {run['wall_s']:.0f} s in all; report {run['report_s']:.1f} s, "
                     f"report.html {run['report_html_bytes'] / 2**20:.2f} MiB; driver peak memory "
                     f"{run['peak_rss_mib']:.0f} MiB\n\n" + table(BLOCK_HEADER, block_rows(run)) + "\n\n" + growth(run))
    for label, found in directs:
        if found:
            parts.append(f"**{label or 'run'}: the growing parts driven directly**\n\n" + table(DIRECT_HEADER, direct_rows(found)))
    parts.append(NOTES)
    if runs:
        plot(runs, Path(__file__).parent / "scale.png")
        parts.append("![driver CPU and storage writes per block](scale.png)")
    record(8, "Scale: 100 to 1,000 trials through the real stack", command="python benchmarks/scale.py "
           + " ".join(sys.argv[1:]), body="\n\n".join(parts))


if __name__ == "__main__":
    main()
