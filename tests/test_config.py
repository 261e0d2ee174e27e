"""Config: typed sections, named errors, dotted overrides, resolved copy written beside a run."""
import subprocess
import sys

import pytest
import yaml

from boneage.config import Config, load_config, parse_override, save_config
from boneage.errors import InputError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 3e-4\n  epochs: 2\nmodel:\n  frozen_layers: 4\n"))
    assert cfg.train.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as text
    assert cfg.train.epochs == 2 and cfg.model.frozen_layers == 4
    assert cfg.train.batch_size == Config().train.batch_size


@pytest.mark.parametrize("text, key", [
    ("train:\n  learnig_rate: 0.1\n", "train.learnig_rate"),
    ("trian:\n  epochs: 1\n", "trian"),
    ("train:\n  epochs: two\n", "train.epochs"),
    ("train:\n  epochs: 1.5\n", "train.epochs"),
    ("model:\n  use_sex: maybe\n", "model.use_sex"),
    ("model:\n  frozen_layers: 15\n", "model.frozen_layers"),
    ("model:\n  image_size: 64\n", "model.image_size"),
    ("train:\n  loss: l1\n", "train.loss"),
    ("train:\n  augment_strength: 1.5\n", "train.augment_strength"),
    ("data: 3\n", "data"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["train.learning_rate=3e-4", "model.use_sex=false", "data.root=/x/y"])
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.model.use_sex is False and cfg.data.root == "/x/y"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    for bad in ["train.epochs", "=3"]:
        with pytest.raises(InputError):
            parse_override(bad)
    with pytest.raises(InputError, match="train.nope"):
        load_config(None, ["train.nope=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "model.weights=none"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 7
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_reports_bad_config_with_status_2(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 0\n")
    proc = subprocess.run([sys.executable, "-m", "boneage", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "boneage", "train", "--bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_resume_picks_only_experiments_of_exactly_this_config(tmp_path):
    """`--resume` on demo.yaml looks for demo-YYYYmmdd-HHMMSS, never demo-small-... (a prefix)."""
    from tuning.config import load_search_config
    from tuning.experiment import SEARCH_CONFIG, experiment_names

    for name in ["demo-20261201-101500", "demo-small-20261202-090000", "demo-20261203-080000",
                 "demo-again", "demo-20261204-0800"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / SEARCH_CONFIG).write_text("{}\n")
    (tmp_path / "demo-20261205-070000").mkdir()  # never started: no search config
    cfg = load_search_config(None, [f"tune.storage_path={tmp_path}"])
    assert experiment_names(cfg, "demo") == ["demo-20261201-101500", "demo-20261203-080000"]
    assert experiment_names(cfg, "demo-small") == ["demo-small-20261202-090000"]


def test_a_grace_period_longer_than_the_epochs_is_one_message_and_status_2(tmp_path, capsys):
    """Ray's ASHA would assert (traceback, status 1) after the experiment was created."""
    from tuning.search import main

    storage = tmp_path / "experiments"
    status = main(["--config", "configs/demo.yaml", "--set", "train.epochs=1", "--set", "tune.grace_period=3",
                   "--set", f"tune.storage_path={storage}"])
    err = capsys.readouterr().err
    assert status == 2 and "tune.grace_period (3)" in err and "train.epochs (1)" in err
    assert "Traceback" not in err and not storage.exists()


@pytest.mark.parametrize("setting, message", [
    ("tune.brackets=0", "tune.brackets"),
    ("tune.brackets=two", "tune.brackets"),
    ("tune.multivariate=maybe", "tune.multivariate"),
    # demo: grace 2, rf 2, 6 epochs -> rungs at 2 and 4 before epoch 6 -> at most 3 brackets
    ("tune.brackets=4", r"tune.brackets \(4\) is more than ASHA can use: .* 2 rung\(s\) before train.epochs "
                        r"\(6\), so at most 3 bracket"),
])
def test_bad_scheduler_and_sampler_keys_are_one_message_and_status_2(tmp_path, capsys, setting, message):
    import re

    from tuning.search import main

    storage = tmp_path / "experiments"
    status = main(["--config", "configs/demo.yaml", "--set", "train.epochs=6", "--set", "tune.grace_period=2",
                   "--set", "tune.reduction_factor=2", "--set", setting, "--set", f"tune.storage_path={storage}"])
    err = capsys.readouterr().err
    assert status == 2 and re.search(message, err), err
    assert "Traceback" not in err and not storage.exists()


def test_scheduler_and_sampler_keys_reach_asha_and_tpe():
    from tuning.config import load_search_config, max_brackets
    from tuning.study import make_sampler

    assert max_brackets(1, 9, 3) == 3 and max_brackets(1, 10, 3) == 4 and max_brackets(2, 2, 2) == 1
    cfg = load_search_config("configs/demo.yaml", ["train.epochs=6", "tune.grace_period=2",
                                                   "tune.reduction_factor=2", "tune.brackets=3",
                                                   "tune.multivariate=false"])
    assert cfg.tune.brackets == 3 and make_sampler(cfg)._multivariate is False
    default = load_search_config("configs/demo.yaml")
    assert default.tune.brackets == 1 and make_sampler(default)._multivariate is True  # Optuna 5's own default


def test_the_default_configs_example_study_url_is_one_the_search_takes(tmp_path):
    import re
    from pathlib import Path

    from tuning.config import load_search_config
    from tuning.study_storage import study_url

    text = (Path(__file__).parent.parent / "configs" / "default.yaml").read_text()
    (example,) = re.findall(r"optuna_storage: null +# e\.g\. (\S+)", text)
    cfg = load_search_config(None, [f"tune.optuna_storage={example}"])
    assert study_url(cfg, tmp_path) == example  # no password in it, so not refused
