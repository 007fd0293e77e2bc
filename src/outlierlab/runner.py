"""config -> checks -> load -> recipe (edit, observe, evaluate) -> record.

Everything that can be wrong with the input is checked before any weights load; a problem ends the run with one
line on stderr and exit code 2, and nothing is written to results/.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from outlierlab import sweep, tracking
from outlierlab.environment import lock_status
from outlierlab.errors import USER_ERRORS, ConfigError  # noqa: F401 (re-exported for older imports)
from outlierlab.evals.data import Corpus, data_directory, load_corpus
from outlierlab.evals.ppl import Windows, build_windows, check_protocol, perplexity
from outlierlab.evals.zeroshot import build_tasks, check_tasks, evaluate_zeroshot
from outlierlab.interventions.base import EditSession, Intervention, StudyContext
from outlierlab.models.coords import SuperWeight, check_in_shape
from outlierlab.models.hashing import weights_sha256
from outlierlab.models.load import (
    BOS_POLICIES,
    DTYPES,
    LoadedModel,
    check_dispatch,
    check_layout,
    expert_layout,
    load_model,
    model_shape,
)
from outlierlab.models.sites import family_for
from outlierlab.models.source import ModelSource, resolve_source
from outlierlab.override_types import check_override_types
from outlierlab.probes.layer_major import PASS_ORDERS
from outlierlab.results import (
    REPO,
    git_state,
    host_roots,
    inside,
    library_versions,
    portable_paths,
    result_path,
    write_result,
)
from outlierlab.tables import Table, markdown
from outlierlab.tables.schema import check_key

EXP_DIR = REPO / "conf" / "exp"
# 2: no host paths, the diff of a dirty tree, PPL intervals (records without the field predate all three)
RECORD_FORMAT = 2


@dataclass
class Plan:
    """What preflight established, so nothing is checked twice."""
    source: ModelSource
    interventions: dict[str, Intervention]
    super_weights: list[SuperWeight]
    data_dir: str | None
    output: Path
    recipe: object
    git: dict = field(default_factory=dict)  # the checkout when the run started (results.git_state)


def _available(directory: Path) -> str:
    return ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is not one of: {', '.join(map(str, allowed))}")


def _instantiate_interventions(cfg) -> dict[str, Intervention]:
    interventions = {}
    for name, spec in (cfg.exp.get("interventions") or {}).items():
        try:
            interventions[name] = hydra.utils.instantiate(spec)
        except Exception as error:
            cause = error.__cause__ or error
            raise ConfigError(f"exp.interventions.{name}: {str(cause).splitlines()[0]}") from None
    for variant, names in (cfg.exp.get("variants") or {}).items():
        for name in names:
            if name not in interventions:
                raise ConfigError(f"exp.variants.{variant}: unknown intervention '{name}' "
                                  f"(this exp defines: {', '.join(interventions) or 'none'})")
    return interventions


def _import(key: str, path: str):
    try:
        return hydra.utils.get_method(path)
    except Exception as error:
        raise ConfigError(f"{key}={path} cannot be imported ({str(error).splitlines()[0]})") from None


def window_protocols(cfg) -> dict[str, DictConfig]:
    """Every window protocol of the run by its config key: eval.ppl.* (scored for PPL), exp.data.* (windows a
    recipe feeds to probes) and any other exp.<name> that is one (a mapping with dataset and seqlen: calibration
    sets). Each is checked at preflight, built through RunContext.protocol_windows and recorded in the result."""
    protocols = {f"eval.ppl.{key}": p for key, p in (cfg.eval.get("ppl") or {}).items()}
    protocols.update({f"exp.data.{key}": p for key, p in (cfg.exp.get("data") or {}).items()})
    protocols.update({f"exp.{key}": p for key, p in cfg.exp.items()
                      if key != "data" and OmegaConf.is_dict(p) and "dataset" in p and "seqlen" in p})
    return protocols


def _check_registry_source(model) -> None:
    """A registry belongs to one set of weights. `model.source=X` alone (without `model=path`) keeps the YAML's name,
    registry and BOS: we stop rather than drop the registry and detect, because the run would still be filed under
    the YAML's name (results/<exp>/<name>/, overwriting that model's results) with the YAML's other conventions."""
    sources = model.get("registry_sources")
    if sources is None or not (model.get("super_weights") or model.get("massive_activations")):
        return
    if str(model.source) not in [str(s) for s in sources]:
        raise ConfigError(f"model.source={model.source}: the registry of model '{model.name}' (super_weights, "
                          f"massive_activations) belongs to {', '.join(map(str, sources))}; for other weights use "
                          f"model=path model.source={model.source} (or add it to model.registry_sources if they "
                          f"are the same weights)")


def _registry_super_weights(model, source: ModelSource | None) -> list[SuperWeight]:
    """model.super_weights parsed, and (when the model is known) inside its shape."""
    try:
        super_weights = [SuperWeight.parse(entry.coord) for entry in model.get("super_weights") or []]
    except (ValueError, AttributeError) as error:
        raise ConfigError(f"model.super_weights: {error}") from None
    if super_weights and source is not None:
        layers, hidden, intermediate = model_shape(model, source)
        experts = expert_layout(model, source)
        for weight in super_weights:
            try:
                check_in_shape(weight, layers, hidden, intermediate, experts)
            except ValueError as error:
                raise ConfigError(f"model.super_weights: {error}") from None
    return super_weights


def _check_experts(interventions: dict[str, Intervention], experts: dict | None) -> None:
    """Interventions that name experts (interventions/experts.py) against the model's MoE layers, from its config
    (None: not known before loading; they are checked when they apply)."""
    if experts is None:
        return
    for name, intervention in interventions.items():
        check = getattr(intervention, "check_experts", None)
        if check is not None:
            try:
                check(experts)
            except ValueError as error:
                raise ConfigError(f"exp.interventions.{name}: {error}") from None


def _check_table_keys(cfg: DictConfig) -> None:
    """PPL protocol keys and zero-shot task names become column keys of the result's table (tables/schema.py)."""
    names = [(f"eval.ppl.{key}", key) for key in cfg.eval.get("ppl") or {}]
    names += [("eval.zeroshot.tasks", task) for task in (cfg.eval.get("zeroshot") or {}).get("tasks") or []]
    for where, name in names:
        try:
            check_key(str(name))
        except ValueError as error:
            raise ConfigError(f"{where}: {name!r}: {error}") from None


def _check_writable(results_dir, folder: Path) -> None:
    """The result's folder can be made and written, tried now, not found out after the run's work: permission bits
    alone do not say so (root, /proc, a read-only mount). The folder stays (the run writes there; removing it could
    pull it from under a parallel cell's check); the probe file goes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".outlierlab-write-check.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"paths.results_dir={results_dir}: results cannot be written there "
                          f"({error.strerror or error}: {error.filename or folder})") from None


def _check_clean_tree(cfg: DictConfig, output: Path, state: dict) -> None:
    """A record in the repository's tracked results/ must name the code that made it: from a tree with uncommitted
    changes to its code (results.CODE) it is refused unless allow_dirty=true (the record then stores the diff)."""
    if cfg.get("allow_dirty") or not inside(output, REPO / "results"):
        return
    if state.get("dirty"):
        raise ConfigError(f"paths.results_dir={cfg.paths.results_dir}: the repository's results/ takes records made "
                          f"from a clean tree, and the code has uncommitted changes ({', '.join(state['changed'][:3])}"
                          f"{', ...' if len(state['changed']) > 3 else ''}): commit first, write elsewhere "
                          f"(paths.results_dir=/your/results), or allow_dirty=true (the record then stores the diff)")


def preflight(cfg: DictConfig) -> Plan:
    if "exp" not in cfg or cfg.exp is None:
        raise ConfigError(f"no experiment selected: append +exp=NAME (available: {_available(EXP_DIR)})")
    mistyped = check_override_types(_hydra_overrides(), EXP_DIR.parent)
    if mistyped:
        raise ConfigError(mistyped)
    model = cfg.model
    _check_choice("model.bos", model.get("bos") or "auto", BOS_POLICIES)  # absent: auto
    _check_choice("model.dtype", model.dtype, tuple(DTYPES))
    _check_choice("model.pass_order", model.get("pass_order") or "auto", PASS_ORDERS)
    if model.source == "tiny":
        family_for(model.tiny.model_type)
    data_dir = data_directory(cfg.paths.data_dir)
    for key, protocol in window_protocols(cfg).items():
        check_protocol(key, protocol, data_dir)
    if cfg.eval.get("zeroshot"):
        check_tasks(cfg.eval.zeroshot.tasks, data_dir)
    _check_table_keys(cfg)
    recipe = _import("exp.recipe", cfg.exp.recipe)
    check = _import("exp.check", cfg.exp.check) if cfg.exp.get("check") else None
    interventions = _instantiate_interventions(cfg)
    if cfg.exp.get("super_weights") is not None:
        _check_choice("exp.super_weights", cfg.exp.super_weights, ("auto", "detect", "registry"))
    _check_registry_source(model)
    # Recipes that make or load their own models (pretraining, tables over several checkpoints) set
    # exp.load_model: false; the runner then loads nothing and ctx.loaded is None.
    source = resolve_source(model, cfg.paths.cache_dir) if cfg.exp.get("load_model", True) else None
    if source is not None:
        family = check_layout(model, source)
        check_dispatch(model, source, cfg.paths.cache_dir)
        if (cfg.eval.get("ppl") or cfg.eval.get("zeroshot")) and family is not None and family.encoder:
            raise ConfigError(f"model '{model.name}' is an encoder (no LM head): eval={cfg.eval.name} scores "
                              f"perplexity / zero-shot; use eval=embedding (e.g. +exp=ro_encoder)")
    super_weights = _registry_super_weights(model, source)
    if source is not None:
        _check_experts(interventions, expert_layout(model, source))
    output = result_path(cfg.paths.results_dir, cfg.exp.name, model.name, cfg.run_tag)
    plan = Plan(source, interventions, super_weights, data_dir, output, recipe)
    # exp.check names the study's own checks of its exp keys, `check(cfg, plan)`, still before any weights load.
    # A ValueError / KeyError / TypeError there is a config error like any other.
    if check is not None:
        try:
            check(cfg, plan)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(str(error).splitlines()[0].strip("'\"")) from None
    # The code as the run starts is the code that makes the record (a commit or an edit during a long run is not).
    plan.git = git_state(REPO)
    _check_clean_tree(cfg, output, plan.git)  # after every config check: a config error is named first
    _check_writable(cfg.paths.results_dir, output.parent)  # last: input found bad above leaves no folder
    return plan


@dataclass
class RunContext:
    """What a recipe gets: the loaded model, its interventions and evaluations. Recipes call these; they never
    reach into module internals."""
    cfg: DictConfig
    loaded: LoadedModel | None  # None when exp.load_model is false
    plan: Plan
    corpora: dict[str, Corpus]  # eval.ppl.<key> by key
    data_corpora: dict[str, Corpus] = field(default_factory=dict)  # the other window protocols by config key
    _windows: dict[str, Windows] = field(default_factory=dict)
    _protocol_windows: dict[str, Windows] = field(default_factory=dict)
    _zeroshot_tasks: tuple | None = None
    _sessions: list = field(default_factory=list)  # EditSessions made by `edit`; those with live hooks matter

    @property
    def registry_super_weights(self) -> list[SuperWeight]:
        return self.plan.super_weights

    def edit(self, names: list, context: StudyContext | None = None) -> EditSession:
        """Apply the interventions in order (names from exp.interventions, or Intervention objects a recipe built
        from its exp config); use as `with ctx.edit(...) as session:` to undo them."""
        session = EditSession(self.loaded, context)
        self._sessions = [live for live in self._sessions if live._handles] + [session]
        try:
            return session.apply(name if isinstance(name, Intervention) else self.plan.interventions[name]
                                 for name in names)
        except BaseException:
            session.undo()
            raise

    def evaluate(self, interventions: list, context: StudyContext | None, label: str, observe=None) -> dict:
        """Apply the interventions, score the eval suite (every PPL protocol and the zero-shot tasks) on the edited
        model, undo. `observe()` may measure more under the same edit; its dict is merged into the result:
        {"interventions", "edits", "ppl", "zeroshot", **observe()}."""
        with self.edit(interventions, context) as session:
            ppl = self.perplexities(label=label)
            zeroshot = self.zeroshot(label=label)
            observed = observe() if observe else {}
            edits = list(session.log)
        names = [i.describe() if isinstance(i, Intervention) else i for i in interventions]
        return {"interventions": names, "edits": edits, "ppl": ppl, "zeroshot": zeroshot, **observed}

    def windows(self, key: str) -> Windows:
        if key not in self._windows:
            self._windows[key] = build_windows(self.cfg.eval.ppl[key], self.corpora[key], self.loaded)
        return self._windows[key]

    def data_windows(self, key: str) -> Windows:
        """The windows of protocol `exp.data.<key>` (token ids for probes)."""
        return self.protocol_windows(f"exp.data.{key}")

    def protocol_windows(self, key: str) -> Windows:
        """The windows of the window protocol at config key `key` (exp.data.<name>, exp.calibration, ...; see
        runner.window_protocols), built once and recorded in the result's `evaluations` like PPL's."""
        if key not in self._protocol_windows:
            protocol = OmegaConf.select(self.cfg, key)
            corpus = self.data_corpora.get(key) or load_corpus(protocol.dataset, protocol.split, self.plan.data_dir)
            self._protocol_windows[key] = build_windows(protocol, corpus, self.loaded)
        return self._protocol_windows[key]

    def zeroshot(self, label: str) -> dict | None:
        """The eval suite's zero-shot tasks through lm-eval on the model as it is now (None if the suite has none)."""
        suite = self.cfg.eval.get("zeroshot")
        if not suite:
            return None
        if self._zeroshot_tasks is None:
            self._zeroshot_tasks = build_tasks(suite.tasks, self.plan.data_dir, self.cfg.paths.cache_dir)
        return evaluate_zeroshot(self.loaded, suite, self._zeroshot_tasks, label=label)

    def evaluated_protocols(self) -> dict[str, dict]:
        """Protocol, data provenance and sha256 of every window set this run scored."""
        return {**{key: windows.meta for key, windows in self._windows.items()},
                **{key: windows.meta for key, windows in self._protocol_windows.items()}}

    def ppl_batch_size(self, protocol) -> int:
        """The protocol's batch size, or 1 while an edit with a batch-dependent hook is on (EditSession)."""
        return protocol.batch_size if all(session.batch_invariant for session in self._sessions) else 1

    def perplexities(self, label: str, keys: list[str] | None = None) -> dict[str, dict]:
        """Every PPL protocol of the eval suite (or those named in `keys`) on the model as it is now."""
        results = {}
        for key, protocol in (self.cfg.eval.get("ppl") or {}).items():
            if keys is not None and key not in keys:
                continue
            results[key] = perplexity(self.loaded.model, self.windows(key), self.ppl_batch_size(protocol),
                                      desc=f"{label} {protocol.name}")
        return results


def _hydra_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under @hydra.main (e.g. tests calling execute directly)
        return []


def execute(cfg: DictConfig) -> dict:
    """Run one configured experiment end to end; returns the record written to results/."""
    started = time.time()
    plan = preflight(cfg)
    cell = sweep.cell_identity(cfg, plan.source)  # what determines this result; a finished cell is skipped
    if sweep.finished(cfg, plan.output, cell):
        return sweep.skip(cfg, plan.output, cell)
    loaded, corpora, data_corpora = None, {}, {}
    if plan.source is not None:  # exp.load_model: false -> the recipe makes or loads its own models
        corpora = {key: load_corpus(protocol.dataset, protocol.split, plan.data_dir)
                   for key, protocol in (cfg.eval.get("ppl") or {}).items()}
        data_corpora = {key: load_corpus(protocol.dataset, protocol.split, plan.data_dir)
                        for key, protocol in window_protocols(cfg).items() if key.startswith("exp.")}
        loaded = load_model(cfg.model, cfg.paths.cache_dir, plan.source)
    weights_before = weights_sha256(loaded.model) if loaded else None
    context = RunContext(cfg, loaded, plan, corpora, data_corpora)
    outcome = plan.recipe(context)
    weights_after = weights_sha256(loaded.model) if loaded else None
    record = {
        "record_format": RECORD_FORMAT, "exp": cfg.exp.name,
        "model": loaded.info if loaded else {"name": cfg.model.name}, "run_tag": cfg.run_tag, "eval": cfg.eval.name,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "wall_time_s": round(time.time() - started, 2),
        "weights_sha256": weights_before, "weights_restored": weights_before == weights_after,
        "evaluations": context.evaluated_protocols(),
        "environment": {**library_versions(), **lock_status()}, "git": plan.git,
        "overrides": _hydra_overrides(), "config": OmegaConf.to_container(cfg, resolve=True), "cell": cell,
        "quantization": {name: i.protocol for name, i in plan.interventions.items() if i.protocol},
        **outcome,
    }
    record = portable_paths(record, host_roots(cfg.paths.data_dir, cfg.paths.cache_dir))
    path = write_result(record, plan.output)
    sweep.note_cell("done", result=path, key=cell["key"])
    print(f"\n{cfg.exp.name} on {cfg.model.name} ({record['model'].get('dtype')}, eval={cfg.eval.name})")
    if outcome.get("table"):
        table = Table.from_dict(outcome["table"])
        print(markdown(table))
        if table.caption:
            print(table.caption)
    print(f"result: {path}")
    tracking.log_run(cfg, record)
    return record


def run(cfg: DictConfig) -> dict:
    """Entry point for run.py: user errors become one line on stderr and exit code 2."""
    try:
        return execute(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
