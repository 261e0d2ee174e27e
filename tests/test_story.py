"""The summary's account of a search (tuning.story): who suggested each trial, what ASHA did.
A study made here with Optuna's own TPE (milliseconds, no Ray)."""
import pandas as pd
import pytest

optuna = pytest.importorskip("optuna")


def test_who_suggested_each_trial_is_read_from_the_study():
    from tuning.story import MODEL, POINT, STARTUP, search_story, story_lines, suggested_by

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(n_startup_trials=3, seed=0, multivariate=True,
                                                                   constant_liar=True))
    study.enqueue_trial({"x": 0.5})
    for number in range(6):  # one at a time: each ends before the next is asked
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("ray_trial_id", f"t{number}")
        study.tell(trial, (trial.params["x"] - 0.3) ** 2)
    origins = suggested_by(study, n_startup=3)
    assert origins == {"t0": POINT, "t1": STARTUP, "t2": STARTUP, "t3": MODEL, "t4": MODEL, "t5": MODEL}
    # Optuna marks what its multivariate model sampled: the rule agrees with it
    assert {f"t{t.number}" for t in study.trials if any(k.startswith("tpe:relative_params") for k in t.system_attrs)} \
        == {t for t, by in origins.items() if by == MODEL}

    trials = pd.DataFrame({"trial_id": [f"t{n}" for n in range(6)], "epochs": [4, 2, 2, 4, 1, 4],
                           "ended": ["ran all 4 epochs", "stopped by ASHA at the epoch-2 rung",
                                     "stopped by ASHA at the epoch-2 rung", "ran all 4 epochs",
                                     "stopped by ASHA at the epoch-1 rung", "ran all 4 epochs"]})
    story = search_story(study, trials, 3)
    assert story == {"suggested_by": {POINT: 1, STARTUP: 2, MODEL: 3}, "asha_stopped": 3, "asha_rung_epochs": [1, 2]}
    assert story_lines(story)[1] == "ASHA stopped 3 trial(s) at its rung(s) (epoch 1, 2)."
    # a search that never left its start-up says so
    early = search_story(study, trials.head(3), 5)
    assert early["suggested_by"][MODEL] == 0 and "TPE never suggested" in story_lines(early)[1]
