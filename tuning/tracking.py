"""Optional experiment tracking beside Ray's own TensorBoard files: MLflow.

Ray Tune already writes TensorBoard event files into every trial folder, so
`tensorboard --logdir experiments/NAME` shows all trials' curves. With `tune.mlflow: true`,
Ray's MLflowLoggerCallback also logs each trial (its parameters and every reported metric) as a
run of an MLflow experiment named after the search. The tracking URI defaults to a SQLite file
in the experiment folder, which works offline (MLflow 3 keeps plain `./mlruns` folders only
behind an opt-in); any MLflow tracking server URI works too:

    python -m tuning.search --config configs/demo.yaml --set tune.mlflow=true
    mlflow ui --backend-store-uri sqlite:///experiments/NAME/mlflow.db   # needs the full `mlflow`
"""
from __future__ import annotations

from pathlib import Path

from boneage.errors import InputError

MLFLOW_DB = "mlflow.db"


def mlflow_uri(cfg, local_dir: Path) -> str:
    return cfg.tune.mlflow_tracking_uri or f"sqlite:///{Path(local_dir).resolve() / MLFLOW_DB}"


def tracking_callbacks(cfg, name: str, local_dir: Path) -> list:
    """Ray Tune callbacks for the config's tracking options (none by default)."""
    if not cfg.tune.mlflow:
        return []
    try:
        import mlflow  # noqa: F401  (Ray's callback imports it only when the run starts)
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise InputError("tune.mlflow is true but MLflow is not installed: "
                         "pip install -c constraints.txt -e '.[mlflow]'") from None
    return [MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg, local_dir), experiment_name=name,
                                 save_artifact=False, tags={"project": "boneage-tune"})]
