"""The strict spec, expansion and shape preflight, through the real `sweep` CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from sweep.spec import expand, load_spec, make_plan
from trials.config import TrialConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(small_model) -> Path:
    return small_model


TRAIN_ROWS = "".join(f'{{"prompt": "copy {w} =", "response": " {w}"}}\n' for w in ("ab", "cd", "ef", "gh") * 10)


def write_spec(tmp_path: Path, model_dir: Path, adapters: list[dict], **extra) -> Path:
    (tmp_path / "train.jsonl").write_text(TRAIN_ROWS)
    spec = {
        "name": "t",
        "model": {"base_model": str(model_dir)},
        "data": {"train": "train.jsonl"},
        "search": {"seeds": [0], "adapters": adapters},
    }
    for key, value in extra.items():
        if key in spec and isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def plan_cli(path: Path, *args: str):
    return runner.invoke(app, ["plan", str(path), *args])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize(
    ("adapter", "field", "fix"),
    [
        ({"type": "vblora", "r": 4, "num_vectors": 8, "vector_length": 24}, "adapter.vector_length", "divisor"),
        ({"type": "c3a", "block_size": 24}, "adapter.block_size", "divisor of 32"),
        ({"type": "oft", "oft_block_size": 24}, "adapter.oft_block_size", "divisor of 64"),
        ({"type": "oft", "r": 3}, "adapter.r", "divisor of 64"),
        ({"type": "waveft", "n_frequency": 5000}, "adapter.n_frequency", "n_frequency <= 2048"),
        ({"type": "tinylora", "r": 40}, "adapter.r", "r <= 32"),
        ({"type": "hra", "r": 80}, "adapter.r", "r <= 64"),
        ({"type": "lora", "rank_pattern": {"layers\\.7\\.q_proj": 4}}, "adapter.rank_pattern", "matches none"),
        ({"type": "lora", "alpha_pattern": {"nope": 4}}, "adapter.alpha_pattern", "matches none"),
        ({"type": "lora", "target_modules": ["qkv_proj"]}, "adapter.target_modules", "exist in the base model"),
        ({"type": "lora", "init_lora_weights": "loftq"}, "adapter.init_lora_weights", "gpus_per_worker"),
        ({"type": "lora", "init_lora_weights": "corda"}, "adapter.target_modules", "target_modules: [q_proj, v_proj]"),
        ({"type": "lora", "r": 48, "init_lora_weights": "pissa"}, "adapter.r", "r <= 32"),
    ],
)
def test_shape_constraints_are_plan_errors(tmp_path, model_dir, adapter, field, fix):
    result = plan_cli(write_spec(tmp_path, model_dir, [adapter]))
    assert_user_error(result, field, fix)


@pytest.mark.parametrize(
    ("adapters", "needles"),
    [
        ([{"type": "oft", "r": 4, "oft_block_size": 16}], ["search.adapters[0]", "exactly one of r"]),
        ([{"type": "oft"}], ["exactly one of r"]),
        ([{"type": "waveft", "r": 8, "alpha": 16}], ["unknown key 'r'", "n_frequency", "scaling"]),
        ([{"type": "lora", "alpah": 8}], ["search.adapters[0]", "did you mean 'alpha'"]),
        ([{"type": "lorra"}], ["unknown type 'lorra'", "did you mean 'lora'"]),
        ([{"type": "lora", "r": "eight"}], ["search.adapters[0].r", "valid integer"]),
        ([{"type": "lora", "init_lora_weights": "pisa"}], ["init_lora_weights", "pissa_niter_N"]),
        ([{"type": "vblora", "num_vectors": 2, "topk": 4}], ["topk", "num_vectors"]),
        ([{"type": "waveft", "wavelet_family": "haar9"}], ["wavelet_family", "db1"]),
    ],
)
def test_spec_errors_name_the_field(tmp_path, model_dir, adapters, needles):
    assert_user_error(plan_cli(write_spec(tmp_path, model_dir, adapters)), *needles)


def test_top_level_mistakes(tmp_path, model_dir):
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], trainer={"lr": 1})
    assert_user_error(plan_cli(path), "unknown key 'trainer'", "did you mean")
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data={"max_lenght": 9})
    assert_user_error(plan_cli(path), "data: unknown key 'max_lenght'", "did you mean 'max_length'")
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data={"train": "missing.jsonl"})
    assert_user_error(plan_cli(path), "data.train: file not found")
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], model={"base_model": str(tmp_path / "nope")})
    assert_user_error(plan_cli(path), "model.base_model")
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], model={"base_model": "no-such-org/no-such-model"})
    assert_user_error(plan_cli(path), "model.base_model", "local")
    path = write_spec(
        tmp_path, model_dir, [{"type": "lora"}],
        search={"trainer": {"learning_rate": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3}}},
    )
    assert_user_error(plan_cli(path), "search.trainer.learning_rate is a distribution", "strategy: random/optuna")
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], resources={"gpus_per_worker": 0.5})
    assert_user_error(plan_cli(path), "resources.gpus_per_worker: use 0 (CPU workers) or 1", "(got 0.5)")
    (tmp_path / "bad.yaml").write_text("name: x\nsearch: [\n")
    assert_user_error(plan_cli(tmp_path / "bad.yaml"), "malformed YAML", "line")
    assert_user_error(plan_cli(tmp_path / "absent.yaml"), "file not found")


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({"evaluation": {"generate": True, "answer_pattern": "(unclosed"}}, ["evaluation.answer_pattern", "not a valid regular expression"]),
        ({"evaluation": {"generate": True, "answer_pattern": "####"}}, ["evaluation.answer_pattern", "needs a group"]),
        ({"evaluation": {"generate": True, "max_new_tokens": 0}}, ["evaluation.max_new_tokens: must be >= 1 (got 0)"]),
        ({"metric": {"name": "eval_exact_match"}}, ["metric.name", "set evaluation.generate: true"]),
        ({"metric": {"name": "eval_answer_accuracy"}, "evaluation": {"generate": True}}, ["evaluation.answer_pattern"]),
        ({"metric": {"name": "accuracy"}}, ["metric.name", "no trial reports 'accuracy'", "eval_exact_match"]),
        ({"metric": {"name": "eval_loss", "goal": "maximize"}}, ["metric.goal", "better when lower", "goal: minimize"]),
        ({"metric": {"name": "test_loss"}}, ["metric.name", "never to rank", "use eval_loss"]),
        ({"metric": {"name": "eval_exact_match"}, "evaluation": {"generate": True}, "scheduler": {"type": "asha"}},
         ["generate_at: every"]),
        ({"data": {"test": "absent-test.jsonl"}}, ["data.test: file not found"]),
        ({"data": {"forgetting": "absent.txt"}}, ["data.forgetting: file not found"]),
    ],
)
def test_evaluation_mistakes_are_plan_errors(tmp_path, model_dir, extra, needles):
    """Generation, test split and metric choices are checked before anything starts."""
    assert_user_error(plan_cli(write_spec(tmp_path, model_dir, [{"type": "lora"}], **extra)), *needles)


def test_metric_goal_defaults_to_its_direction(tmp_path, model_dir):
    spec, _ = load_spec(write_spec(tmp_path, model_dir, [{"type": "lora"}], metric={"name": "eval_exact_match"},
                                   evaluation={"generate": True}))
    assert spec.metric.goal == "maximize"


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("train.jsonl", "", ["train.jsonl", "no examples"]),
        ("train.jsonl", TRAIN_ROWS + "{oops\n", ["train.jsonl line 41", "not valid JSON"]),
        ("train.jsonl", '{"question": "a", "response": " b"}\n', ["line 1", "field 'prompt' is missing", "data.prompt_field"]),
        ("train.jsonl", TRAIN_ROWS + '{"prompt": "a", "response": null}\n', ["line 41", "'response' must be a string, got null"]),
        ("train.jsonl", '{"prompt": "a", "response": "  "}\n' + TRAIN_ROWS, ["line 1", "'response' is empty"]),
        ("train.txt", "a b\n", ["unsupported format", ".jsonl, .csv"]),
        ("train.jsonl", "".join(TRAIN_ROWS.splitlines(True)[:5]), ["training examples, fewer than one optimizer step", "batch_size 8 x 2 workers"]),
    ],
)
def test_data_problems_are_plan_errors(tmp_path, model_dir, name, content, needles):
    """Each data file is read at plan time with the trial's own readers: one line naming the
    file, the line and the field, exit 2, before anything starts."""
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data={"train": name})
    (tmp_path / name).write_text(content)
    assert_user_error(plan_cli(path), *needles)


@pytest.mark.parametrize(
    ("data", "content", "needles"),
    [
        ({"template": "chat"}, TRAIN_ROWS, ["data.template: chat", "has none", "a format string"]),
        ({"template": "### Q: {question}"}, TRAIN_ROWS, ["data.template", "format string with {prompt}"]),
        ({"messages_field": "chat"}, '{"chat": [{"role": "robot", "content": "x"}]}\n',
         ["train.jsonl line 1", "chat[0] has role 'robot'", "system, user, assistant", "data.messages_field: chat rows"]),
    ],
)
def test_prompt_format_problems_are_plan_errors(tmp_path, model_dir, data, content, needles):
    """`chat` on a tokenizer without a chat template, a format string without {prompt}, a
    chat row with a role no template knows: one line, exit 2, at plan time."""
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data=data)
    (tmp_path / "train.jsonl").write_text(content)
    assert_user_error(plan_cli(path), *needles)


def test_plan_counts_the_tokens_of_the_chosen_format(tmp_path, model_dir):
    """The plan tokenizes the way the trial does: a format string adds its own characters."""
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data={"template": "Q: {prompt} A:"})
    reports = {r["role"]: r for r in json.loads(plan_cli(path, "--json").output)["data"]}
    assert reports["train"]["tokens"] == 40 * (14 + len("Q:  A:"))


def test_a_model_folder_without_weights_is_refused_unless_config_only(tmp_path, model_dir):
    import shutil

    bare = tmp_path / "bare-model"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare / f.name)
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], model={"base_model": str(bare)})
    assert_user_error(plan_cli(path), "model.base_model", "has no weight files", "--config-only")
    assert plan_cli(path, "--config-only").exit_code == 0
    (bare / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    assert_user_error(plan_cli(path), "1 of the 1 shards", "model-00001-of-00002.safetensors")


def test_plan_reports_each_data_file_with_tokens_and_truncation(tmp_path, model_dir):
    (tmp_path / "eval.jsonl").write_text('{"prompt": "copy abcdef =", "response": " abcdef"}\n')
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}], data={"eval": "eval.jsonl", "max_length": 16})
    result = plan_cli(path, "--json")
    assert result.exit_code == 0, result.output
    reports = {r["role"]: r for r in json.loads(result.output)["data"]}
    # "copy ab =" is BOS + 9 characters, " ab" 3 more, then EOS: 14 tokens, under max_length 16.
    assert reports["train"] == {"role": "train", "path": str(tmp_path / "train.jsonl"), "examples": 40,
                                "tokens": 40 * 14, "truncated": 0, "dropped": 0, "truncated_share": 0.0}
    assert reports["eval"]["examples"] == 1 and reports["eval"]["truncated"] == 1 and reports["eval"]["tokens"] == 16
    text = plan_cli(path).output
    assert "data.train: 40 examples, 560 tokens, 0.0% truncated at max_length=16" in text


def test_all_problems_reported_at_once(tmp_path, model_dir):
    adapters = [{"type": "c3a", "block_size": [16, 24]}, {"type": "vblora", "vector_length": 24, "num_vectors": 8}]
    result = plan_cli(write_spec(tmp_path, model_dir, adapters))
    assert_user_error(result, "adapter.block_size", "adapter.vector_length")
    # the valid combination is not reported
    assert result.output.count("error") == 2


def test_skip_invalid_and_write_trials(tmp_path, model_dir):
    adapters = [{"type": "c3a", "block_size": [16, 24]}, {"type": "lora", "r": [4, 8]}]
    out = tmp_path / "trials"
    result = plan_cli(write_spec(tmp_path, model_dir, adapters), "--skip-invalid", "--write-trials", str(out))
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "block_size" in result.output
    files = sorted(out.glob("*.json"))
    assert len(files) == 3
    trials = [TrialConfig.load(f) for f in files]
    assert {f.stem for f in files} == {t.trial_id for t in trials}
    assert all(Path(t.data.train).is_absolute() for t in trials)


def test_loftq_allowed_when_gpus_declared(tmp_path, model_dir):
    path = write_spec(tmp_path, model_dir, [{"type": "lora", "init_lora_weights": "loftq"}], resources={"gpus_per_worker": 1})
    result = plan_cli(path, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [t["variant"] for t in plan["trials"]] == ["lora+loftq"]


def test_hra_odd_rank_is_a_warning(tmp_path, model_dir):
    result = plan_cli(write_spec(tmp_path, model_dir, [{"type": "hra", "r": 3}]))
    assert result.exit_code == 0, result.output
    assert "not identity at init" in result.output


def test_grid_expansion_and_per_adapter_trainer(tmp_path, model_dir):
    adapters = [
        {"type": "lora", "r": [4, 8], "init_lora_weights": ["default", "pissa"]},
        {"type": "c3a", "block_size": 16, "trainer": {"learning_rate": 0.3}},
    ]
    path = write_spec(tmp_path, model_dir, adapters, search={"seeds": [0, 1], "trainer": {"learning_rate": [1e-4, 1e-3]}})
    spec, spec_dir = load_spec(path)
    trials = expand(spec, spec_dir).trials
    assert len(trials) == 2 * 2 * 2 * 2 + 1 * 2
    assert {t.trainer.learning_rate for t in trials if t.adapter.type == "c3a"} == {0.3}
    assert len({t.trial_id for t in trials}) == len(trials)
    # duplicates collapse: the same value twice is one trial
    path = write_spec(tmp_path, model_dir, [{"type": "lora", "r": [8, 8]}])
    assert len(expand(*load_spec(path)).trials) == 1


def test_ids_are_stable_across_folders(tmp_path, model_dir):
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    a = write_spec(a_dir, model_dir, [{"type": "lora", "r": [4, 8]}])
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = write_spec(b_dir, model_dir, [{"type": "lora", "r": [4, 8]}])
    ids_a = [t.trial_id for t in expand(*load_spec(a)).trials]
    ids_b = [t.trial_id for t in expand(*load_spec(b)).trials]
    assert ids_a == ids_b
    assert ids_a[0].startswith("lora-")


def test_random_strategy_is_seeded_locally(tmp_path, model_dir):
    search = {
        "strategy": "random", "num_samples": 5, "seeds": [0],
        "trainer": {"learning_rate": {"distribution": "loguniform", "low": 1e-5, "high": 1e-2}},
    }
    path = write_spec(tmp_path, model_dir, [{"type": "lora", "r": [4, 8, 16]}], search=search)
    random.seed(123)
    before = random.random()
    random.seed(123)
    first = [t.trial_id for t in expand(*load_spec(path)).trials]
    assert random.random() == before  # the global RNG was not touched
    second = [t.trial_id for t in expand(*load_spec(path)).trials]
    assert first == second and len(first) == 5
    lrs = [t.trainer.learning_rate for t in expand(*load_spec(path)).trials]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 5


ALL_FAMILIES = [
    {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    {"type": "lora", "r": 4, "init_lora_weights": "pissa", "rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 8}},
    {"type": "lora", "r": 4, "init_lora_weights": "corda", "target_modules": ["q_proj", "v_proj"]},
    {"type": "ln_tuning"},
    {"type": "oft", "oft_block_size": 16},
    {"type": "hra", "r": 8},
    {"type": "waveft", "n_frequency": 64},
    {"type": "vblora", "r": 4, "num_vectors": 16, "vector_length": 16},
    {"type": "c3a", "block_size": 16},
    {"type": "tinylora", "r": 2, "u": 16},
]


def test_plan_counts_equal_peft_on_the_real_model(tmp_path, model_dir):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trials.adapters import Calibration, family_of

    spec, spec_dir = load_spec(write_spec(tmp_path, model_dir, ALL_FAMILIES))
    plan = make_plan(spec, spec_dir)
    assert plan.ok and len(plan.trials) == len(ALL_FAMILIES)
    base_total = sum(p.numel() for p in AutoModelForCausalLM.from_config(load_config(model_dir)).parameters())
    for t in plan.trials:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(load_config(model_dir))
        fam = family_of(t.trial.adapter)
        calib = Calibration([{"input_ids": torch.randint(0, 96, (1, 8))} for _ in range(2)])
        peft_model = fam.wrap(model, t.trial.adapter, calib) if fam.needs_calibration(t.trial.adapter) else get_peft_model(model, fam.peft_config(t.trial.adapter))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert t.trainable == trainable, (t.trial.trial_id, t.trainable, trainable)
        assert t.base_params == base_total
        assert t.percent == pytest.approx(100 * trainable / base_total)


def load_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_schema_command():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "search" in schema["properties"]


def test_cli_process_exit_code_and_no_traceback(tmp_path, model_dir):
    """The installed console script, as a user runs it."""
    path = write_spec(tmp_path, model_dir, [{"type": "c3a", "block_size": 24}])
    proc = subprocess.run([sys.executable, "-m", "sweep", "plan", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "adapter.block_size" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_trainer_bounds_are_checked_first_and_name_only_field_and_value(tmp_path, model_dir):
    path = write_spec(tmp_path, model_dir, [{"type": "lora"}],
                      search={"trainer": {"batch_size": 0, "learning_rate": [1e-3, -1.0], "warmup_ratio": 1.5}})
    result = plan_cli(path)
    assert_user_error(result, "search.trainer.batch_size: must be >= 1 (got 0)",
                      "search.trainer.learning_rate: must be > 0", "(got -1.0)", "search.trainer.warmup_ratio: must be < 1")
    assert "{" not in result.output  # never a dump of the combination


def test_estimate_adds_up_and_follows_zero_stage_and_precision(tmp_path, model_dir):
    """The plan's memory and cost estimate, checked term by term against the model it states
    (sweep/spec/estimate.py): 2 layers, hidden 64, 40 examples of 14 tokens."""
    from sweep.spec.estimate import MiB

    def est(**extra):
        path = write_spec(tmp_path, model_dir, [{"type": "lora", "r": 4}], **extra)
        result = plan_cli(path, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    plan = est(search={"trainer": {"batch_size": 2, "max_steps": 10}}, data={"max_length": 16})
    e, base, trainable = plan["trials"][0]["estimate"], plan["base_params"], plan["trials"][0]["trainable_params"]
    parts = e["parts_mb"]
    assert parts["base_weights"] == pytest.approx(base * 4 / MiB)  # fp32 on CPU workers, not divided at ZeRO-2
    assert parts["gradients"] == pytest.approx(trainable * 4 / 2 / MiB)  # ZeRO-2 divides gradients by 2 workers
    assert parts["optimizer_states"] == pytest.approx(trainable * 8 / 2 / MiB)
    assert parts["activations"] == pytest.approx(2 * 16 * 34 * 64 * 2 * 2 / MiB)  # batch x length x 34h x layers, fp32
    assert e["peak_memory_mb"] == pytest.approx(sum(parts.values()))
    assert e["tokens"] == 10 * 2 * 2 * 14 and e["device_hours"] is None  # CPU workers: no GPU-hours
    assert plan["totals"]["tokens"] == e["tokens"]

    checkpointed = est(search={"trainer": {"batch_size": 2, "max_steps": 10, "gradient_checkpointing": True}},
                       data={"max_length": 16})["trials"][0]["estimate"]
    # Only each layer's input is kept, plus one layer's full activations.
    assert checkpointed["parts_mb"]["activations"] == pytest.approx(2 * 16 * (2 * 64 * 2 + 34 * 64) * 2 / MiB)

    gpu = est(search={"trainer": {"batch_size": 2, "max_steps": 10}}, data={"max_length": 16},
              deepspeed={"zero_stage": 3, "precision": "bf16"},
              resources={"gpus_per_worker": 1, "gpu_memory_gb": 0.5, "workers_per_trial": 2})["trials"][0]["estimate"]
    assert gpu["parts_mb"]["base_weights"] == pytest.approx(base * 2 / 2 / MiB)  # bf16, ZeRO-3 splits the base
    assert gpu["device_hours"] == pytest.approx(6 * base * gpu["tokens"] / (989e12 * 0.35) / 3600)
    assert gpu["fits"] is False  # 1 GiB of CUDA overhead alone exceeds 0.5 GB
