"""Optional experiment tracking beside Ray's own TensorBoard files: MLflow.

Ray Tune already writes TensorBoard event files into every trial folder, so
`tensorboard --logdir experiments/NAME` shows all trials' curves. With `tune.mlflow: true`,
Ray's MLflowLoggerCallback also logs each trial (its parameters and every reported metric) as a
run of an MLflow experiment named after the search. The tracking URI defaults to a SQLite file
in the experiment folder, which works offline (MLflow 3 keeps plain `./mlruns` folders only
behind an opt-in); any MLflow tracking server URI works too:

    python -m tuning.search --config configs/demo.yaml --set tune.mlflow=true
    mlflow ui --backend-store-uri sqlite:///experiments/NAME/mlflow.db   # needs the full `mlflow`

With s3:// storage the default `mlflow.db` is copied into the storage as trials start and end
(`tuning.progress.StudySync`) and fetched back by `--resume`, also on a new head.
"""
from __future__ import annotations

from boneage.errors import InputError

MLFLOW_DB = "mlflow.db"


def tracking_callbacks(cfg, exp) -> list:
    """Ray Tune callbacks for the config's tracking options (none by default)."""
    if not cfg.tune.mlflow:
        return []
    try:
        import mlflow  # noqa: F401  (Ray's callback imports it only when the run starts)
    except ImportError:
        raise InputError("tune.mlflow is true but MLflow is not installed: "
                         "pip install -c constraints.txt -e '.[mlflow]'") from None
    return [trial_runs_class()(exp, cfg.tune.mlflow_tracking_uri, experiment_name=exp.name, save_artifact=False,
                               tags={"project": "boneage-tune"})]


def __getattr__(name):
    # pickle finds the class by name here when Ray unpickles the callback
    if name != "TrialRuns":
        raise AttributeError(name)
    return trial_runs_class()


def trial_runs_class():
    """TrialRuns subclasses Ray's MLflow callback, whose module imports MLflow (seconds): the
    class is made on first use."""
    if "TrialRuns" in globals():
        return globals()["TrialRuns"]
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRuns(MLflowLoggerCallback):
        """Ray's callback, resumable: the default URI is computed on the head that runs (Ray
        unpickles the callback from the first head's state), and a trial that has a run already
        (a resumed one) logs on into it instead of opening a second."""

        def __init__(self, exp, tracking_uri: str | None, **kwargs):
            super().__init__(**kwargs)
            self.exp, self.configured_uri = exp, tracking_uri

        def setup(self, *args, **kwargs):
            self.tracking_uri = self.configured_uri or f"sqlite:///{self.exp.local_dir.resolve() / MLFLOW_DB}"
            super().setup(*args, **kwargs)

        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                client = self.mlflow_util._mlflow.tracking.MlflowClient()
                found = client.search_runs([self.mlflow_util.experiment_id],
                                           filter_string=f"tags.trial_name = '{trial}'", max_results=1)
                if found:
                    self._trial_runs[trial] = found[0].info.run_id
            super().log_trial_start(trial)

    TrialRuns.__module__, TrialRuns.__qualname__ = __name__, "TrialRuns"
    globals()["TrialRuns"] = TrialRuns
    return TrialRuns
