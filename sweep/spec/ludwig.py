"""A Ludwig LLM config (`model_type: llm`) as a peft-sweep spec: a dict in, (spec dict, warnings) out.

Decisions (README "Importing a Ludwig config"):
- A Ludwig key with no peft-sweep equivalent is one warning line, never dropped silently. What
  cannot be kept without training something else is an error line (`SpecError`): quantization,
  an adapter type or field the PEFT catalogue lacks, a searched key outside adapter.*/trainer.*.
- Where a key is absent, Ludwig's default applies: lora alpha = 2 r and dropout 0.05, learning
  rate 1e-3, batch size 1, epochs 100, no warmup, clipglobalnorm 0.5, oft_block_size 32.
- `epochs` becomes max_steps = ceil(train examples x epochs / (batch_size x grad_accum)).
- hyperopt: every combination of the searched adapter.* values (and of the values max_steps is
  derived from) becomes its own adapter item, so tied values (alpha = 2 r) stay tied; searched
  trainer fields become grid lists or distributions on search.trainer. Strategy: search_alg
  hyperopt/optuna (or any model-based one, warned) -> optuna; random/variant_generator -> grid
  when every space is choice/grid_search and num_samples is unset (the values are enumerated),
  else random. num_samples unset for a sampled search is Ray Tune's 1.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from sweep.errors import SpecError
from sweep.spec.messages import validation_lines
from trials.adapters import FAMILIES
from trials.metrics import METRICS

TOP_KEYS = {"model_type", "base_model", "trust_remote_code", "input_features", "output_features", "adapter", "trainer",
            "preprocessing", "prompt", "quantization", "generation", "hyperopt"}
# Adapter keys Ludwig's schema has and the peft-sweep family does not (warned, ignored).
LUDWIG_ONLY = {"*": ("pretrained_adapter_weights", "postprocessor"),
               "lora": ("bias_type", "loraplus_lr_ratio", "eva_config", "layer_replication"), "c3a": ("bias_type",),
               "tinylora": ("projection_seed", "save_projection", "tinylora_dropout"),
               "vblora": ("vblora_dropout", "save_only_topk_weights")}
# PEFT's sub-config keys -> the LoRA fields they set.
LORA_SUBCONFIGS = {
    "loftq_config": {"loftq_bits": "loftq_bits", "loftq_iter": "loftq_iter"},
    "corda_config": {"corda_method": "corda_method", "corda_samples": "corda_samples",
                     "use_float16_for_covariance": "corda_half_covariance"},
}
# Ludwig trainer path -> TrainerConfig field (searchable as hyperopt trainer.<path>; also trainer.epochs).
TRAINER_FIELDS = {"learning_rate": "learning_rate", "batch_size": "batch_size",
                  "gradient_accumulation_steps": "gradient_accumulation_steps", "train_steps": "max_steps",
                  "learning_rate_scheduler.warmup_fraction": "warmup_ratio", "optimizer.weight_decay": "weight_decay",
                  "gradient_clipping.clipglobalnorm": "max_grad_norm", "steps_per_checkpoint": "eval_every",
                  "eval_steps": "eval_batches"}
TRAINER_KEYS = {"type", "learning_rate", "batch_size", "gradient_accumulation_steps", "train_steps", "epochs",
                "learning_rate_scheduler", "optimizer", "gradient_clipping", "steps_per_checkpoint", "eval_steps"}
LUDWIG_METRICS = {"loss": "eval_loss", "perplexity": "eval_perplexity", "next_token_perplexity": "eval_perplexity",
                  "token_accuracy": "eval_token_accuracy", "accuracy": "eval_token_accuracy",
                  "sequence_accuracy": "eval_exact_match"}
SPLITS = {"validation": "eval", "train": "train", "training": "train", "test": "test"}
OPTUNA_ALGS = {"hyperopt", "optuna", "tpe", "auto"}
RANDOM_ALGS = {"random", "variant_generator"}
FINITE = ("choice", "grid_search", "randint")
_MISSING = object()


def _set(d: dict, path: str, value: Any) -> None:
    *head, last = path.split(".")
    for part in head:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[last] = value


class _Import:
    def __init__(self, count_train: Callable[[str, str], int] | None):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.count_train = functools.cache(count_train) if count_train else None  # read the data once
        self.fields = ("prompt", "response")

    def error(self, line: str) -> None:
        self.errors += [line] if line not in self.errors else []

    def warn(self, line: str) -> None:
        self.warnings += [line] if line not in self.warnings else []

    def ignored(self, where: str, block: Any, known: Any) -> None:
        for key in block if isinstance(block, dict) else ():
            if key not in known:
                self.warn(f"{where + '.' if where else ''}{key}: no peft-sweep equivalent; ignored")

    def feature(self, config: dict, key: str) -> str:
        feats = config.get(key)
        if feats is None:
            # Snippets (the seed page's among them) often leave the features out; a text
            # prompt -> text response on the conventional field names is what they mean.
            default = "prompt" if key == "input_features" else "response"
            self.warn(f"{key}: not set; reading the data field {default!r} (set data.prompt_field/response_field "
                      "in the spec for others)")
            return default
        text = [i for i, f in enumerate(feats) if isinstance(f, dict) and f.get("type") == "text"] \
            if isinstance(feats, list) else []
        if not text:
            self.error(f"{key}: needs a text feature (peft-sweep trains a text prompt to a text response)")
            return ""
        for j, other in enumerate(feats):
            if j != text[0]:
                name = other.get("name") if isinstance(other, dict) else other
                self.warn(f"{key}[{j}] ({name}): peft-sweep reads one prompt and one response field; ignored")
        feat = feats[text[0]]
        self.ignored(f"{key}[{text[0]}]", feat, {"name", "type", "column"})
        if not isinstance(feat.get("column", feat.get("name")), str):
            self.error(f"{key}[{text[0]}].name: required (the data field)")
            return ""
        return feat.get("column", feat["name"])

    def adapter(self, block: Any, searched: bool) -> dict | None:
        src = " (adapter.type from hyperopt)" if searched else ""
        if not isinstance(block, dict) or "type" not in block:
            self.error(f"adapter.type: required; without an adapter Ludwig fine-tunes every weight (use one of "
                       f"{', '.join(FAMILIES)})")
            return None
        kind = block["type"]
        if kind not in FAMILIES:
            close = difflib.get_close_matches(str(kind), list(FAMILIES), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(FAMILIES)}"
            self.error(f"adapter.type: {kind!r} is not an adapter family of peft-sweep{src} ({hint})")
            return None
        fields = FAMILIES[kind].fields
        item: dict[str, Any] = {"type": kind}
        for key, value in block.items():
            if key == "type":
                continue
            if key in LUDWIG_ONLY["*"] + LUDWIG_ONLY.get(kind, ()):
                self.warn(f"adapter.{key}: no peft-sweep equivalent; ignored")
            elif kind == "lora" and key in LORA_SUBCONFIGS:
                sub = value if isinstance(value, dict) else {}
                item.update({LORA_SUBCONFIGS[key][k]: v for k, v in sub.items() if k in LORA_SUBCONFIGS[key]})
                self.ignored(f"adapter.{key}", sub, LORA_SUBCONFIGS[key])
            elif key not in fields.model_fields:
                hint = fields.unknown_key_hints.get(key)
                if hint is None:
                    known = sorted(set(fields.model_fields) - {"type"})
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"{kind} has no {key!r}; " + (f"did you mean {close[0]!r}?" if close else
                                                          f"its fields: {', '.join(known)}")
                self.error(f"adapter.{key}: {hint}{src}")
            else:
                item[key] = value
        if kind == "lora":  # Ludwig's defaults, not PEFT's
            r = item.get("r", 8)
            item.setdefault("alpha", 2 * r if isinstance(r, int) else 16)
            item.setdefault("dropout", 0.05)
        if kind == "oft" and not item.get("r"):
            item.pop("r", None)
            item.setdefault("oft_block_size", 32)
        try:
            fields.model_validate(item)
        except ValidationError as err:
            for line in validation_lines(err):
                self.error(("adapter: " + line[len("spec: "):] if line.startswith("spec: ") else f"adapter.{line}") + src)
        return item

    def trainer(self, t: dict) -> dict[str, Any]:
        kind = t.get("type")
        if kind is None:
            self.warn("trainer.type: not set (Ludwig's default `none` only predicts); imported as finetune")
        elif kind != "finetune":
            self.error(f"trainer.type: {kind!r} has no peft-sweep equivalent (it fine-tunes: type finetune)")
        out: dict[str, Any] = {}
        for key, default in (("learning_rate", 1e-3), ("batch_size", 1), ("gradient_accumulation_steps", 1)):
            value = t.get(key, default)
            if value == "auto" and key == "gradient_accumulation_steps":
                value = 1  # Ludwig's auto is 1 unless effective_batch_size is set
            elif value == "auto":
                self.error(f"trainer.{key}: auto (Ludwig tunes it at run time); give a number")
            out[key] = value
        if "train_steps" in t:
            out["max_steps"] = t["train_steps"]
        else:
            epochs, bs, ga = t.get("epochs", 100), out["batch_size"], out["gradient_accumulation_steps"]
            n = self.count_train(*self.fields) if self.count_train and all(self.fields) else None
            if not isinstance(epochs, int) or epochs < 1:
                self.error(f"trainer.epochs: must be a whole number >= 1 (got {epochs!r})")
            elif n is None:
                self.error("trainer.epochs: max_steps comes from the number of training examples; give "
                           "--data-train (or trainer.train_steps)")
            elif all(isinstance(v, int) and v > 0 for v in (bs, ga)):
                steps = math.ceil(n * epochs / (bs * ga))
                out["max_steps"] = steps
                self.warn(f"trainer.epochs: {epochs}{'' if 'epochs' in t else ' (Ludwig default)'} -> max_steps "
                          f"{steps} = ceil({n} train examples x {epochs} / (batch_size {bs} x gradient_accumulation_"
                          f"steps {ga})); each of the resources.workers_per_trial workers (2 by default) takes its own "
                          "batch, which multiplies the effective batch (and the epochs trained)")
        sched = t.get("learning_rate_scheduler") or {}
        out["warmup_ratio"] = sched.get("warmup_fraction", 0.0)
        if sched.get("decay") != "cosine":
            self.warn(f"trainer.learning_rate_scheduler.decay: {sched.get('decay') or 'none (constant)'}; "
                      "peft-sweep always decays with cosine to 0 after warmup")
        self.ignored("trainer.learning_rate_scheduler", sched, {"warmup_fraction", "decay"})
        opt = t.get("optimizer") or {}
        out["weight_decay"] = opt.get("weight_decay", 0.0)
        if opt.get("type", "adam") not in ("adam", "adamw"):
            self.warn(f"trainer.optimizer.type: {opt['type']}; peft-sweep trains with AdamW")
        elif opt.get("type", "adam") == "adam" and out["weight_decay"]:
            self.warn("trainer.optimizer.type: adam's weight_decay is an L2 penalty; peft-sweep's AdamW decouples it")
        self.ignored("trainer.optimizer", opt, {"type", "weight_decay"})
        clip = t.get("gradient_clipping", {})
        norm = clip.get("clipglobalnorm", 0.5) if isinstance(clip, dict) else None  # null: no clipping
        out["max_grad_norm"] = 0.0 if norm is None else norm
        self.ignored("trainer.gradient_clipping", {k: v for k, v in (clip or {}).items() if v is not None},
                     {"clipglobalnorm"})
        for key in ("steps_per_checkpoint", "eval_steps"):
            if t.get(key):
                out[TRAINER_FIELDS[key]] = t[key]
        self.ignored("trainer", t, TRAINER_KEYS)
        return out

    def space(self, key: str, value: Any) -> dict | None:
        where = f"hyperopt.parameters.{key}"
        prefix, _, rest = key.partition(".")
        if prefix not in ("adapter", "trainer") or not rest:
            self.error(f"{where}: peft-sweep searches adapter.* and trainer.* keys only")
            return None
        if prefix == "trainer" and rest not in TRAINER_FIELDS and rest != "epochs":
            self.error(f"{where}: not a searchable trainer field (use one of epochs, {', '.join(TRAINER_FIELDS)})")
            return None
        kind = value.get("space") if isinstance(value, dict) else None
        if kind in ("choice", "grid_search"):
            values = value.get("categories" if kind == "choice" else "values")
            if isinstance(values, list) and values:
                return {"kind": kind, "values": values}
        elif kind == "randint" and all(isinstance(value.get(b), int) for b in ("lower", "upper")):
            if value["lower"] < value["upper"]:
                return {"kind": kind, "values": list(range(value["lower"], value["upper"]))}  # Ray: upper excluded
        elif kind in ("uniform", "loguniform") and all(isinstance(value.get(b), (int, float)) for b in ("lower", "upper")):
            return {"kind": kind, "low": float(value["lower"]), "high": float(value["upper"])}
        else:
            self.error(f"{where}: space {kind!r} has no peft-sweep equivalent (use choice, grid_search, randint, "
                       "uniform or loguniform)")
            return None
        self.error(f"{where}: a {kind} space needs " + ("a non-empty list of values" if kind in ("choice", "grid_search")
                                                       else "integer lower < upper"))
        return None


def _template(im: _Import, template: Any, data: dict[str, Any]) -> None:
    """Ludwig's `prompt.template` names dataset columns in braces; one column becomes
    data.prompt_field and the template a data.template format string around {prompt}."""
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None} if isinstance(
            template, str) else None
    except ValueError:
        names = None
    if not names or len(names) != 1 or next(iter(names)).startswith("__"):
        im.warn(f"prompt.template: peft-sweep formats one prompt field ({{column}} once); this template uses "
                f"{sorted(names) if names else 'none'}, so the {im.fields[0]!r} field is used as the prompt as written")
        return
    column = next(iter(names))
    data["prompt_field"] = column
    data["template"] = template.replace("{" + column + "}", "{prompt}")


def ludwig_to_spec(config: Any, *, train: str, eval: str | None = None, name: str = "ludwig", seed: int = 0,
                   count_train: Callable[[str, str], int] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The spec and the warning lines; `count_train(prompt_field, response_field)` gives the number
    of training examples (needed only for `trainer.epochs`). Raises SpecError with every problem."""
    if not isinstance(config, dict) or config.get("model_type") != "llm":
        got = config.get("model_type", "ecd, Ludwig's default") if isinstance(config, dict) else type(config).__name__
        raise SpecError([f"not a Ludwig LLM config (model_type: {got}); peft-sweep imports `model_type: llm` configs"])
    im = _Import(count_train)
    im.ignored("", config, TOP_KEYS)
    if not isinstance(config.get("base_model"), str):
        im.error("base_model: required (a Hugging Face id or a local model folder)")
    im.fields = (im.feature(config, "input_features"), im.feature(config, "output_features"))
    data: dict[str, Any] = {"train": train, **({"eval": eval} if eval else {}),
                            "prompt_field": im.fields[0], "response_field": im.fields[1]}
    pre = config.get("preprocessing") or {}
    if "global_max_sequence_length" in pre:
        data["max_length"] = pre["global_max_sequence_length"]
    else:
        im.warn("preprocessing.global_max_sequence_length: not set; data.max_length is peft-sweep's 256")
    im.ignored("preprocessing", pre, {"global_max_sequence_length"})
    prompt = config.get("prompt") or {}
    if "template" in prompt:
        _template(im, prompt["template"], data)
    im.ignored("prompt", prompt, {"template"})
    if config.get("quantization"):
        im.error("quantization: peft-sweep trains on an unquantized base (no QLoRA); remove it (LoftQ is "
                 "adapter.init_lora_weights: loftq with loftq_config)")
    evaluation: dict[str, Any] = {}
    gen = config.get("generation") or {}
    if "max_new_tokens" in gen:
        evaluation["max_new_tokens"] = gen["max_new_tokens"]
    im.ignored("generation", gen, {"max_new_tokens"})

    hyper = config.get("hyperopt") or {}
    im.ignored("hyperopt", hyper, {"parameters", "goal", "metric", "split", "output_feature", "search_alg", "executor"})
    params = hyper.get("parameters") or {}
    spaces = {k: s for k, s in ((k, im.space(k, v)) for k, v in params.items()) if s is not None}
    trainer_block = config.get("trainer") or {}
    from_epochs = "train_steps" not in trainer_block and "trainer.train_steps" not in spaces
    tied = {"trainer.epochs", "trainer.batch_size", "trainer.gradient_accumulation_steps"} if from_epochs else set()
    if not from_epochs and spaces.pop("trainer.epochs", None):
        im.warn("hyperopt.parameters.trainer.epochs: trainer.train_steps overrides it (as in Ludwig); ignored")
    split = [k for k in spaces if k.startswith("adapter.") or k in tied]
    for k in split:
        if spaces[k]["kind"] not in FINITE:
            im.error(f"hyperopt.parameters.{k}: {spaces[k]['kind']} draws from a range; this key needs a finite set "
                     "(choice, grid_search or randint)")
    split = [k for k in split if "values" in spaces[k]]
    combos = [dict(zip(split, vs)) for vs in itertools.product(*(spaces[k]["values"] for k in split))]
    items, trainers = [], []
    for combo in combos:
        cfg = copy.deepcopy(config)
        for key, value in combo.items():
            _set(cfg, key, value)
        items.append(im.adapter(cfg.get("adapter"), "adapter.type" in combo))
        trainers.append(im.trainer(cfg.get("trainer") or {}))
    if im.errors:
        raise SpecError(im.errors)
    shared = {k: v for k, v in trainers[0].items() if all(t.get(k, _MISSING) == v for t in trainers)}
    adapters, seen = [], set()
    for item, trainer in zip(items, trainers):
        own = {k: v for k, v in trainer.items() if k not in shared}
        entry = {**item, **({"trainer": own} if own else {})}
        if (key := json.dumps(entry, sort_keys=True, default=str)) not in seen:
            seen.add(key)
            adapters.append(entry)
    for key, s in spaces.items():
        if key not in split:
            field = TRAINER_FIELDS[key.partition(".")[2]]
            shared[field] = s["values"] if "values" in s else {"distribution": s["kind"], "low": s["low"], "high": s["high"]}

    executor = hyper.get("executor") or {}
    alg = (hyper.get("search_alg") or {}).get("type", "variant_generator")
    if executor.get("type") == "optuna":
        alg = "random" if executor.get("sampler") == "random" else "optuna"
    im.ignored("hyperopt.search_alg", hyper.get("search_alg"), {"type"})
    im.ignored("hyperopt.executor", executor, {"type", "num_samples", "scheduler", "max_concurrent_trials", "sampler"})
    n = executor.get("num_samples")
    kinds = {s["kind"] for s in spaces.values()}
    search: dict[str, Any] = {"strategy": "grid"}
    if spaces and alg not in RANDOM_ALGS:
        if alg not in OPTUNA_ALGS:
            im.warn(f"hyperopt.search_alg.type: {alg}; imported as optuna (TPE), peft-sweep's model-based search")
        search = {"strategy": "optuna", "num_samples": n or 1}
    elif spaces and not (kinds <= {"choice", "grid_search"} and (n is None or kinds == {"grid_search"})):
        search = {"strategy": "random", "num_samples": n or 1}
        if "grid_search" in kinds:
            im.warn("hyperopt grid_search values are sampled like choice under num_samples (Ray would run each "
                    "value num_samples times)")
    if search["strategy"] == "grid" and n and n > 1:
        im.warn(f"hyperopt.executor.num_samples: {n} would repeat every configuration; peft-sweep runs each once")
    if search["strategy"] != "grid" and n is None:
        im.warn("hyperopt.executor.num_samples: not set; Ray Tune's default draws 1 trial")
    search.update(seeds=[seed], adapters=adapters, trainer=shared)

    raw_metric = str(hyper.get("metric", "loss")).replace(" ", ".").split(".")
    where = SPLITS.get(hyper.get("split", "validation"), "")
    if raw_metric[0] in SPLITS:
        where = SPLITS[raw_metric.pop(0)]
    feature = raw_metric[-2] if len(raw_metric) > 1 else hyper.get("output_feature", "combined")
    ours = LUDWIG_METRICS.get(raw_metric[-1])
    output_name = im.fields[1]
    if feature not in ("combined", output_name):
        im.error(f"hyperopt.output_feature: {feature!r}; peft-sweep scores the one response feature ({output_name})")
    if ours is None or where not in ("eval", "train") or (where == "train" and ours != "eval_loss"):
        im.error(f"hyperopt.metric: {hyper.get('metric')!r} on the {hyper.get('split', 'validation')} split has no "
                 f"peft-sweep equivalent (use loss, perplexity, token_accuracy or sequence_accuracy on validation)")
    if im.errors:
        raise SpecError(im.errors)
    metric = {"name": "train_loss" if where == "train" else ours}
    if "goal" in hyper:
        metric["goal"] = hyper["goal"]
    elif METRICS[metric["name"]].goal != "minimize":
        im.warn(f"hyperopt.goal: not set (Ludwig minimizes); {metric['name']} is maximized")
    spec: dict[str, Any] = {"name": name, "model": {"base_model": config["base_model"]}, "data": data,
                            "search": search, "metric": metric}
    if config.get("trust_remote_code"):
        spec["model"]["trust_remote_code"] = True
    sch = executor.get("scheduler") or {}
    if sch.get("type") in ("async_hyperband", "asynchyperband", "asha"):
        spec["scheduler"] = {"type": "asha", "grace_period": sch.get("grace_period", 1),
                             "reduction_factor": sch.get("reduction_factor", 4),
                             **({"max_t": sch["max_t"]} if "max_t" in sch else {})}
        if sch.get("time_attr", "training_iteration") != "training_iteration":
            im.warn(f"hyperopt.executor.scheduler.time_attr: {sch['time_attr']}; peft-sweep's ASHA counts evaluations")
        im.ignored("hyperopt.executor.scheduler", sch, {"type", "grace_period", "reduction_factor", "max_t", "time_attr"})
    elif sch and sch.get("type", "fifo") != "fifo":
        im.warn(f"hyperopt.executor.scheduler.type: {sch['type']} has no peft-sweep equivalent; trials run to the end")
    if isinstance(executor.get("max_concurrent_trials"), int):
        spec["resources"] = {"max_concurrent_trials": executor["max_concurrent_trials"]}
    elif "max_concurrent_trials" in executor:
        im.warn("hyperopt.executor.max_concurrent_trials: auto; peft-sweep runs resources.max_concurrent_trials (1)")
    if metric["name"] == "eval_exact_match":
        evaluation.update(generate=True, **({"generate_at": "every"} if "scheduler" in spec else {}))
    if evaluation:
        spec["evaluation"] = evaluation
    return spec, im.warnings
