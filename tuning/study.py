"""The Optuna study behind a search: what it is told about each trial, and the searcher that
tells it (where the study lives and how it is opened: tuning.study_storage).

    searcher = make_searcher(cfg, space, url, name, "val_mae", "min")
    state, value = verdict(last_result, {epoch: val_mae}, max_epochs)   # what a trial's end is told

What TPE is told decides what it learns, so every trial's end goes through `verdict`: a trial that
ran its course (or stopped itself early) is COMPLETE with its best epoch's validation MAE, the one
the retrain reproduces; a trial ASHA or a budget stopped is PRUNED with its per-epoch values kept
(Optuna then holds its last one as its value, and TPE ranks it by the epoch it reached, then by
that value); a diverged trial is PRUNED at the epoch it diverged (its value there: inf); an
errored one FAIL. A tell that fails raises. Each study entry carries the Ray trial id
(`ray_trial_id`), and `settle` closes what Ray ended without telling the searcher (a budget stop),
so the study agrees with trials.csv trial by trial, also after `--resume`.

Ray pickles the searcher into the experiment (`tuner.pkl`, `searcher-state-*.pkl`), so `StudySearch` pickles without its storage (a database engine holding
the password) and reopens it on unpickling; no file the project writes holds the password. The
default SQLite study's path is computed on the head that unpickles it (a resume on a new head).
"""
from __future__ import annotations

import math
import pickle
from typing import NamedTuple

from ray.tune.search.optuna import OptunaSearch

from tuning.study_storage import DEFAULT_KEY, default_study_url, open_storage

RAY_TRIAL = "ray_trial_id"  # the user attribute naming a study entry's Ray trial
OWN_ENDS = ("completed", "early_stopping")  # a trial's own `ended` when it ran its course


class Verdict(NamedTuple):
    state: "optuna.trial.TrialState"  # noqa: F821
    value: float | None  # what the study holds after the tell (None for FAIL or no epoch)


def curve_of(last_result: dict | None, intermediate: dict) -> dict[int, float]:
    """{epoch: val_mae} of a trial: its reported values plus its last result's epoch (Ray never
    passes the result that stops a trial to the searcher's on_trial_result)."""
    steps = {int(k): float(v) for k, v in (intermediate or {}).items()}
    last = last_result or {}
    if last.get("val_mae") is not None and last.get("epoch"):
        steps.setdefault(int(last["epoch"]), float(last["val_mae"]))
    return steps


def verdict(last_result: dict | None, intermediate: dict, max_epochs: int = 0, error: bool = False) -> Verdict:
    """What the study is told when a trial ends, from the trial's last result (`tuning.trainable`'s
    protocol: epoch, val_mae, best_val_mae, diverged, ended) and its {epoch: val_mae}.

    - error: FAIL.
    - diverged: PRUNED at the epoch it diverged, whose value (inf) Optuna keeps as the trial's.
      Not FAIL: TPE leaves FAIL trials out of its model, so it would go on proposing the rates
      that diverge; PRUNED keeps the trial among the bad ones (TPE ranks pruned trials by the
      epoch they reached, then by their value there, and inf ranks last at its epoch).
    - ran its course (ended completed or early_stopping, or reached max_epochs): COMPLETE with its
      best epoch's validation MAE, the epoch `tuning.outcome.best_config` retrains to.
    - anything else (ASHA, a budget or Ray stopped it; ended ""): PRUNED, the value its last epoch's.
    Mirrors `tuning.outcome.collect_trials`' status, so the study agrees with trials.csv.
    """
    from optuna.trial import TrialState

    if error:
        return Verdict(TrialState.FAIL, None)
    steps = curve_of(last_result, intermediate)
    last = last_result or {}
    epoch = int(last.get("epoch") or max(steps, default=0))
    pruned = Verdict(TrialState.PRUNED, steps[max(steps)] if steps else None)
    if last.get("diverged"):
        return pruned
    if last.get("ended") in OWN_ENDS or (max_epochs and epoch >= max_epochs):
        finite = [v for v in steps.values() if math.isfinite(v)]
        best = last.get("best_val_mae")
        best = float(best) if best is not None and math.isfinite(float(best)) else min(finite, default=None)
        if best is not None:
            return Verdict(TrialState.COMPLETE, best)
    return pruned


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on our study, telling it the truth (`verdict`) instead of COMPLETE with
    whatever the last result held; Ray's version also only logged a tell that failed.

    Intermediate values are reported per epoch. A trial whose study entry was closed meanwhile
    (marked failed after a crash, or failed by an error, then resumed by Ray from its checkpoint)
    reports nothing to the closed entry: its end is added as a new entry, with the closed entry's
    epochs and the resumed ones. And it pickles without its storage, which it reopens from the
    password-free URL when unpickled (a resumed search).

    With `exp`, the experiment whose local folder holds the study (the default SQLite one): the
    URL is computed anew on the head that unpickles the searcher (a resume on a new head, whose
    folder is its own). For a remote storage, `tuning.progress.StudySync` copies the study into it
    at each of Ray's experiment snapshots, after Ray saved this searcher's state and before it
    uploads it, so the copy always knows every entry Ray's saved searcher maps a trial to.
    """

    def __init__(self, *, study_url: str, max_epochs: int = 0, exp=None, **kwargs):
        self._study_url, self._max_epochs, self._exp = study_url, max_epochs, exp
        self._local_study = exp is not None and study_url == default_study_url(exp.local_dir)
        super().__init__(storage=open_storage(study_url, self._key()), **kwargs)

    def _key(self) -> str:
        return DEFAULT_KEY if self.__dict__.get("_local_study") else "tune.optuna_storage"

    def _entry(self, trial_id) -> str:
        """'open' (running), 'closed' (failed by a crash or an error while Ray runs the trial again
        after a resume: its end becomes a new entry), 'done' (told, or added anew already) or
        'unknown' (a trial the searcher did not suggest: see `_adopt`)."""
        import optuna

        if trial_id in self.__dict__.get("_readded", ()):
            return "done"
        if trial_id not in self._ot_trials:
            return "unknown"
        entry = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
        if entry.state == optuna.trial.TrialState.WAITING:  # it was asked for this trial: never so
            raise RuntimeError(f"study entry {entry.number} of Ray trial {trial_id} is WAITING: the study is "
                               f"older than the searcher's state (a copy from before the trial was suggested)")
        return "open" if entry.state == optuna.trial.TrialState.RUNNING else \
            "closed" if entry.state == optuna.trial.TrialState.FAIL else "done"

    def _adopt(self, trial_id, result) -> str:
        """A trial Ray restored that the restored searcher never suggested: a head killed while
        it uploaded a snapshot can leave the storage with a newer experiment state than searcher
        state (Ray uploads the files of a snapshot one by one). The study, copied into the storage
        at each snapshot before Ray uploads it, names its entry (`ray_trial_id`): mapped to it, the
        trial goes on as any other (a crash closed that entry: its end becomes a new one). An entry
        the study lacks too is made from the trial's configuration, so TPE learns from it all the
        same."""
        import optuna

        named = [e for e in self._ot_study.get_trials(deepcopy=False) if e.user_attrs.get(RAY_TRIAL) == trial_id]
        if named:
            entry_id = max(named, key=lambda e: e.number)._trial_id
        else:
            config = trial_config(result)
            params = {name: config[name] for name in self._space if name in config}
            if len(params) < len(self._space):  # an end without a result (an error): nothing to learn
                return "unknown"
            distributions = dict(self._space)
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING, params=params, distributions=distributions,
                user_attrs={RAY_TRIAL: trial_id}))
            entry_id = self._ot_study.get_trials(deepcopy=False)[-1]._trial_id
        self._ot_trials[trial_id] = optuna.Trial(self._ot_study, entry_id)
        return self._entry(trial_id)

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL, trial_id)
        return config

    def on_trial_result(self, trial_id, result):
        value, epoch = result.get(self.metric), result.get("epoch") or result.get("training_iteration")
        if value is None or not epoch:
            return
        entry = self._entry(trial_id)
        if entry == "unknown":
            entry = self._adopt(trial_id, result)
        if entry == "closed":  # kept for the entry that replaces the closed one
            self.__dict__.setdefault("_late", {}).setdefault(trial_id, {})[int(epoch)] = float(value)
        elif entry == "open" and int(epoch) not in self._ot_trials[trial_id]._cached_frozen_trial.intermediate_values:
            self._ot_trials[trial_id].report(float(value), int(epoch))  # (a retried trial repeats epochs)

    def on_trial_complete(self, trial_id, result=None, error=False):
        import optuna

        entry = self._entry(trial_id)
        if entry == "unknown":
            entry = self._adopt(trial_id, result or {})
        ot_trial = self._ot_trials.get(trial_id)
        max_epochs = self.__dict__.get("_max_epochs", 0)
        if entry == "closed":
            frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
            steps = {**frozen.intermediate_values, **self.__dict__.get("_late", {}).pop(trial_id, {})}
            state, value = verdict(result, steps, max_epochs, error)
            if state != optuna.trial.TrialState.FAIL:  # a failure is already what the closed entry says
                add_entry(self._ot_study, frozen, trial_id, curve_of(result, steps), state, value)
                self.__dict__.setdefault("_readded", set()).add(trial_id)
        elif entry == "open":
            steps = curve_of(result, ot_trial._cached_frozen_trial.intermediate_values)
            state, value = verdict(result, steps, max_epochs, error)
            tell(self._ot_study, ot_trial, steps, state, value)
        self._completed_trials.add(trial_id)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        if self.__dict__.get("_local_study"):
            state["_study_url"] = None  # this head's path: the unpickling head computes its own
        state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state):
        import optuna

        self.__dict__.update(state)
        if state.get("_local_study"):
            self._study_url = default_study_url(self._exp.local_dir)
        self._storage = open_storage(self._study_url, self._key())
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, number) for tid, number in state["_ot_trials"].items()}

    # Ray saves and restores searcher state through these, not through pickle's protocol
    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))


def trial_config(result: dict) -> dict:
    """A Ray result's trial configuration, flattened as OptunaSearch names its parameters
    ("a/b"): nested under "config" (a trial's last result) or already flat ("config/a/b", what
    the controller passes the searcher per result)."""
    from ray.tune.utils import flatten_dict

    if isinstance(result.get("config"), dict):
        return flatten_dict(result["config"], delimiter="/")
    return {key[len("config/"):]: value for key, value in result.items() if key.startswith("config/")}


def tell(study, ot_trial, steps: dict, state, value) -> None:
    """Report the epochs the entry lacks, then tell it `state` (the value only for COMPLETE: for
    PRUNED Optuna takes the last epoch's). Raises when the study refuses or records otherwise."""
    import optuna

    reported = study._storage.get_trial(ot_trial._trial_id).intermediate_values
    for epoch, mae in sorted(steps.items()):
        if epoch not in reported:
            study._storage.set_trial_intermediate_value(ot_trial._trial_id, epoch, mae)
    told = study.tell(ot_trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    if told.state != state:
        raise RuntimeError(f"the study recorded trial {told.number} as {told.state.name}, not {state.name}")


def add_entry(study, closed, trial_id: str, steps: dict, state, value) -> None:
    """A new finished entry for a trial whose entry was closed: its parameters, all its epochs."""
    import optuna

    study.add_trial(optuna.trial.create_trial(
        params=closed.params, distributions=closed.distributions, state=state, value=value,
        intermediate_values=steps, user_attrs={**closed.user_attrs, RAY_TRIAL: trial_id}))


def settle(storage, study_name: str, results, max_epochs: int) -> int:
    """After a search that ended (not interrupted): tell the study the end of every trial Ray
    ended without telling the searcher. A budget stops the experiment through Ray's stopper,
    which stops its trials without a word to the searcher (and a trial closed by a crash and then
    cut by the budget was never re-added). Each is judged by `verdict` on its Ray result, as
    trials.csv is. Returns how many entries it told or added."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    entries: dict[str, list] = {}
    for entry in study.get_trials(deepcopy=False):
        if RAY_TRIAL in entry.user_attrs:
            entries.setdefault(entry.user_attrs[RAY_TRIAL], []).append(entry)
    settled = 0
    for result in results:
        trial_id = str(result.metrics.get("trial_id", ""))
        if trial_id not in entries:
            continue
        latest = max(entries[trial_id], key=lambda e: e.number)
        history = result.metrics_dataframe
        steps = ({int(e): float(v) for e, v in zip(history["epoch"], history["val_mae"])}
                 if history is not None and {"epoch", "val_mae"} <= set(history) else {})
        state, value = verdict(result.metrics, steps, max_epochs, error=result.error is not None)
        if latest.state == optuna.trial.TrialState.RUNNING:
            tell(study, optuna.Trial(study, latest._trial_id), curve_of(result.metrics, steps), state, value)
            settled += 1
        elif latest.state == optuna.trial.TrialState.FAIL and state != optuna.trial.TrialState.FAIL:
            add_entry(study, latest, trial_id, curve_of(result.metrics, steps), state, value)
            settled += 1
    return settled


def make_sampler(cfg):
    """The search's TPE sampler; `tuning.lab` replays searches with this same function."""
    import optuna

    # constant_liar: trials still running count as bad results, so concurrent trials do not all
    # get the same suggestion (Optuna 5 defaults to it; set here so an older Optuna does too).
    # multivariate: set either way, as Optuna 5's default (None) is multivariate for one objective
    # and an older Optuna's independent, so the config says which TPE runs.
    return optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.n_startup_trials,
                                      multivariate=cfg.tune.multivariate, constant_liar=True)


def make_searcher(cfg, space: dict, url: str, study_name: str, metric: str, mode: str, exp=None) -> StudySearch:
    return StudySearch(study_url=url, max_epochs=cfg.train.epochs, exp=exp, space=space, metric=metric, mode=mode,
                       sampler=make_sampler(cfg), study_name=study_name,
                       points_to_evaluate=list(cfg.tune.points_to_evaluate) or None)
