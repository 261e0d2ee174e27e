"""Search-space parsing: distributions, parameter names, and every bad case named."""
import pytest

optuna = pytest.importorskip("optuna")

from boneage.errors import InputError  # noqa: E402
from tuning.config import load_search_config  # noqa: E402
from tuning.space import apply_params, parse_space  # noqa: E402


def cfg_with(space, points=None):
    overrides = [f"tune.space={space}"]
    if points is not None:
        overrides.append(f"tune.points_to_evaluate={points}")
    return load_search_config(None, overrides)


def test_space_becomes_optuna_distributions():
    cfg = cfg_with("{learning_rate: {loguniform: [1e-5, 1e-2]}, frozen_layers: {int: [0, 14]},"
                   " train.augment_strength: {uniform: [0, 1]}, loss: {choice: [mae, huber]},"
                   " batch_size: {logint: [8, 64]}}")
    space = parse_space(cfg)
    assert space["learning_rate"] == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    assert space["frozen_layers"] == optuna.distributions.IntDistribution(0, 14)
    assert space["train.augment_strength"] == optuna.distributions.FloatDistribution(0.0, 1.0)
    assert space["loss"] == optuna.distributions.CategoricalDistribution(["mae", "huber"])
    assert space["batch_size"] == optuna.distributions.IntDistribution(8, 64, log=True)


def test_params_land_in_their_sections():
    cfg = cfg_with("{learning_rate: {loguniform: [1e-5, 1e-2]}, frozen_layers: {int: [0, 14]}}")
    tuned = apply_params(cfg, {"learning_rate": 3e-4, "frozen_layers": 6, "model.dropout": 0.5})
    assert (tuned.train.learning_rate, tuned.model.frozen_layers, tuned.model.dropout) == (3e-4, 6, 0.5)
    assert cfg.train.learning_rate != 3e-4  # the base config is untouched


@pytest.mark.parametrize("space, message", [
    ("{lerning_rate: {uniform: [0, 1]}}", "tune.space.lerning_rate: not a searchable parameter"),
    ("{data.root: {choice: [a, b]}}", "tune.space.data.root: not a searchable"),
    ("{dropout: {uniform: [0.5, 0.1]}}", "tune.space.dropout: low 0.5 is greater than high 0.1"),
    ("{learning_rate: {loguniform: [0, 0.1]}}", "tune.space.learning_rate: a log range must be above 0"),
    ("{frozen_layers: {int: [0, 20]}}", "tune.space.frozen_layers: 20 is not a valid value"),
    ("{frozen_layers: {int: [0.5, 3]}}", "tune.space.frozen_layers: int bounds must be whole"),
    ("{dropout: {normal: [0, 1]}}", "tune.space.dropout: expected one of"),
    ("{dropout: {uniform: [0]}}", "tune.space.dropout: uniform needs \\[low, high\\]"),
    ("{loss: {choice: []}}", "tune.space.loss: choice needs a non-empty list"),
    ("{loss: {choice: [mae, l1]}}", "tune.space.loss: 'l1' is not a valid value"),
])
def test_bad_spaces_are_named(space, message):
    with pytest.raises(InputError, match=message):
        cfg_with(space)


def test_points_to_evaluate_must_fit_the_space():
    space = "{learning_rate: {loguniform: [1e-5, 1e-2]}}"
    assert cfg_with(space, "[{learning_rate: 1.0e-3}]").tune.points_to_evaluate == [{"learning_rate": 1e-3}]
    with pytest.raises(InputError, match=r"points_to_evaluate\[0\].learning_rate"):
        cfg_with(space, "[{learning_rate: 0.5}]")
    with pytest.raises(InputError, match=r"points_to_evaluate\[0\]"):
        cfg_with(space, "[{dropout: 0.5}]")


def test_shipped_configs_are_valid():
    for name in ["demo", "local", "default"]:
        cfg = load_search_config(f"configs/{name}.yaml")
        assert parse_space(cfg)
        assert cfg.tune.points_to_evaluate, name  # each ships a first point to try


def test_gpu_hour_budget_needs_gpu_trials():
    with pytest.raises(InputError, match="gpu_hours_budget"):
        load_search_config(None, ["tune.gpu_hours_budget=2"])
