"""`sweep import-ludwig`: Ludwig LLM configs become specs the planner accepts, through the real CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import SpecError
from sweep.results.export import ludwig_config
from sweep.spec import load_spec, make_plan
from sweep.spec.ludwig import ludwig_to_spec
from trials.config import DataConfig, ModelConfig, TrainerConfig, TrialConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(small_model) -> Path:
    return small_model


ROWS = [{"instruction": f"copy {w} =", "output": f" {w}"} for w in ("ab", "cd", "ef", "gh") * 10]


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    import json

    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    eval_.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    return train, eval_


def pissa(model_dir: Path, **hyperopt) -> dict:
    """The seed page's PiSSA config (ludwig examples/peft_advanced/pissa_lora.yaml) on the small model,
    with a hyperopt block."""
    config = {
        "model_type": "llm",
        "base_model": str(model_dir),
        "input_features": [{"name": "instruction", "type": "text"}],
        "output_features": [{"name": "output", "type": "text"}],
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "init_lora_weights": "pissa",
                    "use_rslora": True},
        "trainer": {"type": "finetune", "learning_rate": 1.0e-4, "epochs": 3, "batch_size": 4},
        "preprocessing": {"global_max_sequence_length": 64},
    }
    if hyperopt:
        config["hyperopt"] = hyperopt
    return config


HYPEROPT = {
    "goal": "minimize",
    "metric": "loss",
    "parameters": {"adapter.r": {"space": "choice", "categories": [4, 8]},
                   "trainer.learning_rate": {"space": "loguniform", "lower": 1.0e-5, "upper": 1.0e-3}},
    "search_alg": {"type": "hyperopt"},
    "executor": {"num_samples": 4},
}


def import_cli(tmp_path: Path, config: dict, data: tuple[Path, Path] | None, *args: str):
    path = tmp_path / "ludwig.yaml"
    path.write_text(yaml.safe_dump(config))
    flags = ["--data-train", str(data[0]), "--data-eval", str(data[1])] if data else []
    return runner.invoke(app, ["import-ludwig", str(path), *flags, *args]), tmp_path / "ludwig.sweep.yaml"


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize(("search_alg", "strategy", "planned"), [("hyperopt", "optuna", 0), ("random", "random", 4)])
def test_pissa_with_hyperopt_imports_and_plans(tmp_path, model_dir, data, search_alg, strategy, planned):
    hyperopt = {**HYPEROPT, "search_alg": {"type": search_alg}}
    result, written = import_cli(tmp_path, pissa(model_dir, **hyperopt), data)
    assert result.exit_code == 0, result.output
    assert f"wrote {written}" in result.output and "data.train: 40 examples" in result.output
    spec, spec_dir = load_spec(written)
    assert spec.search.strategy == strategy and spec.search.num_samples == 4
    assert spec.metric.name == "eval_loss" and spec.metric.goal == "minimize"
    assert [(a.type, a.r, a.alpha, a.init_lora_weights, a.use_rslora) for a in spec.search.adapters] == [
        ("lora", [4], [32.0], ["pissa"], [True]), ("lora", [8], [32.0], ["pissa"], [True])]
    trainer = spec.search.trainer
    assert trainer.learning_rate.distribution == "loguniform" and trainer.learning_rate.low == 1e-5
    assert trainer.max_steps == [30] and trainer.batch_size == [4]  # ceil(40 examples x 3 epochs / 4)
    assert trainer.max_grad_norm == [0.5] and trainer.warmup_ratio == [0.0]  # Ludwig's defaults
    plan = make_plan(spec, spec_dir)
    assert plan.ok and len(plan.trials) == planned and len(plan.candidates) == 2
    assert "max_steps 30 = ceil(40 train examples x 3" in result.output and "workers_per_trial" in result.output
    assert "# warning: trainer.epochs: 3 -> max_steps 30" in written.read_text()


def test_choices_without_num_samples_are_a_grid_with_tied_alpha_and_asha(tmp_path, model_dir, data):
    config = pissa(model_dir, metric="validation.combined.loss", parameters={
        "adapter.type": {"space": "choice", "categories": ["lora", "hra"]},
        "adapter.r": {"space": "grid_search", "values": [2, 4]},
        "trainer.learning_rate": {"space": "choice", "categories": [1e-4, 1e-3]},
    }, executor={"scheduler": {"type": "async_hyperband", "grace_period": 2}})
    config["adapter"] = {"type": "lora"}
    config["trainer"] = {"type": "finetune", "train_steps": 8, "batch_size": 2, "steps_per_checkpoint": 4,
                         "learning_rate_scheduler": {"warmup_fraction": 0.1, "decay": "cosine"}}
    result, written = import_cli(tmp_path, config, (data[0], data[1]))
    assert result.exit_code == 0, result.output
    spec, spec_dir = load_spec(written)
    assert spec.search.strategy == "grid" and spec.search.num_samples is None
    items = sorted((a.type, a.r, getattr(a, "alpha", None)) for a in spec.search.adapters)
    assert items == [("hra", [2], None), ("hra", [4], None), ("lora", [2], [4.0]), ("lora", [4], [8.0])]  # alpha = 2 r
    assert spec.scheduler.type == "asha" and spec.scheduler.grace_period == 2 and spec.scheduler.reduction_factor == 4
    plan = make_plan(spec, spec_dir)
    assert plan.ok and len(plan.trials) == 8  # 4 adapters x 2 learning rates
    assert {t.trial.trainer.eval_every for t in plan.trials} == {4}
    assert {t.trial.trainer.max_steps for t in plan.trials} == {8}


def test_epochs_count_the_examples_left_after_the_held_out_eval(tmp_path, model_dir, data):
    written = tmp_path / "specs" / "pissa.yaml"
    written.parent.mkdir()
    result, default = import_cli(tmp_path, pissa(model_dir), None, "--data-train", str(data[0]), "--out", str(written))
    assert result.exit_code == 0, result.output
    assert not default.exists() and spec_file_header(written) == "# Imported from the Ludwig config"
    spec, _ = load_spec(written)
    assert spec.data.eval is None and spec.search.trainer.max_steps == [27]  # ceil(36 x 3 / 4)
    assert spec.search.strategy == "grid" and spec.search.adapters[0].r == [16]


def spec_file_header(path: Path) -> str:
    return path.read_text()[:len("# Imported from the Ludwig config")]


def test_waveft_rank_and_alpha_name_its_own_fields(tmp_path, model_dir, data):
    config = pissa(model_dir)
    config["adapter"] = {"type": "waveft", "r": 8, "alpha": 16}
    result, written = import_cli(tmp_path, config, data)
    assert_user_error(result, "adapter.r: waveft has no rank; its size is n_frequency",
                      "adapter.alpha: waveft has no alpha; its update scale is `scaling`")
    assert not written.exists()


def test_not_an_llm_config(tmp_path, model_dir, data):
    config = pissa(model_dir)
    config["model_type"] = "ecd"
    result, _ = import_cli(tmp_path, config, data)
    assert_user_error(result, "not a Ludwig LLM config (model_type: ecd)")
    del config["model_type"]
    assert_user_error(import_cli(tmp_path, config, data)[0], "not a Ludwig LLM config")


@pytest.mark.parametrize(("adapter", "hyperopt", "needle"), [
    ({"type": "vera", "r": 8}, None, "adapter.type: 'vera' is not an adapter family of peft-sweep"),
    ({"type": "lora"}, {"parameters": {"adapter.type": {"space": "choice", "categories": ["lora", "loha"]}}},
     "adapter.type: 'loha' is not an adapter family of peft-sweep (adapter.type from hyperopt)"),
])
def test_unknown_adapter_type(tmp_path, model_dir, data, adapter, hyperopt, needle):
    config = pissa(model_dir, **(hyperopt or {}))
    config["adapter"] = adapter
    result, _ = import_cli(tmp_path, config, data)
    assert_user_error(result, needle)
    assert result.output.count("error") == 1, result.output


@pytest.mark.parametrize("key", ["preprocessing.global_max_sequence_length", "instruction.encoder.type", "adapter"])
def test_hyperopt_parameter_outside_adapter_and_trainer(tmp_path, model_dir, data, key):
    config = pissa(model_dir, parameters={key: {"space": "choice", "categories": [32, 64]}})
    result, _ = import_cli(tmp_path, config, data)
    assert_user_error(result, f"hyperopt.parameters.{key}: peft-sweep searches adapter.* and trainer.* keys only")


def test_range_over_an_adapter_field_and_quantization_are_errors(model_dir):
    config = pissa(model_dir, parameters={"adapter.dropout": {"space": "uniform", "lower": 0.0, "upper": 0.1}})
    config["quantization"] = {"bits": 4}
    with pytest.raises(SpecError) as err:
        ludwig_to_spec(config, train="t.jsonl", count_train=lambda *_: 40)
    assert err.value.lines == [
        ("quantization: peft-sweep trains on an unquantized base (no QLoRA); remove it (LoftQ is "
         "adapter.init_lora_weights: loftq with loftq_config)"),
        ("hyperopt.parameters.adapter.dropout: uniform draws from a range; this key needs a finite set "
         "(choice, grid_search or randint)")]


def test_every_unmapped_key_is_one_warning(tmp_path, model_dir, data):
    config = pissa(model_dir, metric="token_accuracy", executor={"num_samples": 2, "time_budget_s": 60},
                   parameters={"trainer.batch_size": {"space": "randint", "lower": 2, "upper": 5}})
    config["trainer"].update(early_stop=3, optimizer={"type": "adamw", "weight_decay": 0.01, "betas": [0.9, 0.95]})
    config["adapter"]["postprocessor"] = {"merge_adapter_into_base_model": True}
    config["adapter"]["bias_type"] = "none"
    config["input_features"].append({"name": "context", "type": "text"})
    config["output_features"][0]["decoder"] = {"type": "text_extractor"}
    config["prompt"] = {"template": "Q: {instruction} {context}\nA:"}
    config["backend"] = {"type": "local"}
    spec, warnings = ludwig_to_spec(config, train="t.jsonl", count_train=lambda *_: 40)
    expected = [
        "backend: no peft-sweep equivalent; ignored",
        "input_features[1] (context): peft-sweep reads one prompt and one response field; ignored",
        "output_features[0].decoder: no peft-sweep equivalent; ignored",
        ("prompt.template: peft-sweep formats one prompt field ({column} once); this template uses "
         "['context', 'instruction'], so the 'instruction' field is used as the prompt as written"),
        "adapter.postprocessor: no peft-sweep equivalent; ignored",
        "adapter.bias_type: no peft-sweep equivalent; ignored",
        "trainer.optimizer.betas: no peft-sweep equivalent; ignored",
        "trainer.early_stop: no peft-sweep equivalent; ignored",
        "hyperopt.executor.time_budget_s: no peft-sweep equivalent; ignored",
        "hyperopt.goal: not set (Ludwig minimizes); eval_token_accuracy is maximized",
    ]
    for line in expected:
        assert line in warnings, warnings
    assert sum(w.startswith("trainer.epochs: 3 -> max_steps") for w in warnings) == 3  # one per batch size
    assert spec["search"]["strategy"] == "random" and spec["search"]["num_samples"] == 2
    assert [a["trainer"] for a in spec["search"]["adapters"]] == [
        {"batch_size": b, "max_steps": -(-120 // b)} for b in (2, 3, 4)]
    assert spec["metric"] == {"name": "eval_token_accuracy"} and spec["search"]["trainer"]["weight_decay"] == 0.01
    result, _ = import_cli(tmp_path, config, data)
    assert result.exit_code == 0, result.output
    assert "warning backend: no peft-sweep equivalent; ignored" in result.output


def test_a_one_column_prompt_template_becomes_a_format_string(model_dir):
    config = pissa(model_dir)
    config["prompt"] = {"template": "### Instruction: {instruction}\n### Response:"}
    spec, warnings = ludwig_to_spec(config, train="t.jsonl", count_train=lambda *_: 40)
    assert spec["data"]["template"] == "### Instruction: {prompt}\n### Response:"
    assert spec["data"]["prompt_field"] == "instruction"
    assert not any(w.startswith("prompt.") for w in warnings), warnings


def trial(model_dir: Path, data: tuple[Path, Path], adapter: dict, max_grad_norm: float = 0.7) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(base_model=str(model_dir)),
        data=DataConfig(train=str(data[0]), eval=str(data[1]), prompt_field="instruction", response_field="output",
                        max_length=48),
        adapter=adapter,
        trainer=TrainerConfig(learning_rate=3e-4, max_steps=7, batch_size=2, gradient_accumulation_steps=2,
                              warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=max_grad_norm, eval_every=3,
                              eval_batches=2),
    )


@pytest.mark.parametrize("adapter", [
    {"type": "lora", "r": 4, "alpha": 8, "init_lora_weights": "pissa", "use_rslora": True,
     "target_modules": ["q_proj", "v_proj"]},
    {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "init_lora_weights": "corda", "corda_method": "kpm",
     "corda_samples": 8, "corda_half_covariance": True, "target_modules": ["q_proj"]},
    {"type": "oft", "r": 2},
    {"type": "hra", "r": 4, "apply_GS": True},
    {"type": "waveft", "n_frequency": 16, "scaling": 10.0},
    {"type": "vblora", "r": 2, "num_vectors": 8, "vector_length": 16},
    {"type": "c3a", "block_size": 16},
    {"type": "tinylora", "r": 2, "u": 8},
    {"type": "ln_tuning"},
], ids=lambda a: a["type"] + ("-" + a["init_lora_weights"] if "init_lora_weights" in a else ""))
def test_exported_best_yaml_imports_back_to_the_same_trial(tmp_path, model_dir, data, adapter):
    original = trial(model_dir, data, adapter)
    best = yaml.safe_load(yaml.safe_dump(ludwig_config(original)))  # as `sweep export` writes best.yaml
    spec, warnings = ludwig_to_spec(copy.deepcopy(best), train=str(data[0]), eval=str(data[1]), name="best")
    assert warnings == []
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    plan = make_plan(*load_spec(tmp_path / "spec.yaml"))
    assert plan.ok and len(plan.trials) == 1
    assert plan.trials[0].trial.model_dump(exclude={"trial_id"}) == original.model_dump(exclude={"trial_id"})


def test_round_trip_keeps_clipping_off_the_eval_settings_and_the_prompt_format(tmp_path, model_dir, data):
    """No clipping is written as `clipglobalnorm: null` (Ludwig clips at 0.5 when the key is
    absent); eval_every and eval_batches travel as steps_per_checkpoint and eval_steps; a
    format string as prompt.template over the prompt column."""
    original = trial(model_dir, data, {"type": "lora", "r": 4}, max_grad_norm=0.0)
    original = original.model_copy(update={"data": original.data.model_copy(update={"template": "Q: {prompt}\nA:"})})
    best = yaml.safe_load(yaml.safe_dump(ludwig_config(original)))
    assert best["trainer"]["gradient_clipping"] == {"clipglobalnorm": None}
    assert best["prompt"] == {"template": "Q: {instruction}\nA:"}
    spec, _ = ludwig_to_spec(copy.deepcopy(best), train=str(data[0]), eval=str(data[1]), name="best")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (planned,) = make_plan(*load_spec(tmp_path / "spec.yaml")).trials
    assert planned.trial.model_dump(exclude={"trial_id"}) == original.model_dump(exclude={"trial_id"})


def test_a_snippet_without_features_reads_prompt_and_response(tmp_path, model_dir):
    """The seed page's snippets leave input/output features out: the conventional fields are
    read, with a warning for each."""
    import json

    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps({"prompt": r["instruction"], "response": r["output"]}) + "\n" for r in ROWS))
    config = {"model_type": "llm", "base_model": str(model_dir),
              "adapter": {"type": "lora", "r": 16, "alpha": 16, "init_lora_weights": "pissa"},
              "trainer": {"type": "finetune", "epochs": 3, "learning_rate": 1e-4}}
    result, written = import_cli(tmp_path, config, (train, train))
    assert result.exit_code == 0, result.output
    assert "input_features: not set; reading the data field 'prompt'" in result.output
    assert "output_features: not set; reading the data field 'response'" in result.output
    spec, _ = load_spec(written)
    assert (spec.data.prompt_field, spec.data.response_field) == ("prompt", "response")
    assert spec.search.trainer.max_steps == [120]  # ceil(40 examples x 3 epochs / batch 1)
