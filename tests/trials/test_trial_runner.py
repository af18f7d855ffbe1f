"""The trial runner with real components: tiny Llama, PEFT, DeepSpeed on 2 processes.

All adapter variants train in one `torchrun --nproc_per_node 2 -m trials run ...` launch
(process start-up and imports cost more than a tiny trial), spread over ZeRO stages 0-3;
each variant is then checked on its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trials import artifacts
from trials.metrics import METRICS

# name -> (adapter fields, ZeRO stage, learning rate). Stages are spread so every stage
# trains several families; the rates give each family a clear drop in 20 steps.
VARIANTS: dict[str, tuple[dict, int, float]] = {
    "lora": ({"type": "lora", "r": 8, "alpha": 16}, 0, 3e-3),
    "pissa": ({"type": "lora", "r": 8, "alpha": 8, "init_lora_weights": "pissa"}, 2, 3e-3),
    "pissa_niter_4": ({"type": "lora", "r": 8, "alpha": 8, "init_lora_weights": "pissa_niter_4"}, 3, 3e-3),
    "corda": ({"type": "lora", "r": 8, "alpha": 8, "init_lora_weights": "corda",
               "target_modules": ["q_proj", "v_proj"], "corda_samples": 8}, 3, 3e-3),
    "ln_tuning": ({"type": "ln_tuning"}, 3, 3e-2),
    "oft": ({"type": "oft", "oft_block_size": 16}, 0, 1e-2),
    "hra": ({"type": "hra", "r": 8}, 2, 1e-2),
    "waveft": ({"type": "waveft", "n_frequency": 256}, 3, 3e-3),
    "vblora": ({"type": "vblora", "r": 4, "num_vectors": 64, "vector_length": 16}, 0, 3e-2),
    "c3a": ({"type": "c3a", "block_size": 16}, 2, 1e-1),
    "tinylora": ({"type": "tinylora", "r": 2, "u": 64}, 3, 5e-2),
    "lora_patterns": ({"type": "lora", "r": 4, "alpha": 8,
                       "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 16},
                       "alpha_pattern": {r"layers\.1\.self_attn\.v_proj": 32}}, 1, 3e-3),
}
MAX_STEPS = 20
# Every variant also generates (ZeRO-3 included), is tested once and measures forgetting.
EVALUATION = {"generate": True, "max_new_tokens": 6, "answer_pattern": "([a-z]+)"}


def trial(tiny: Path, adapter: dict, *, stage: int = 0, lr: float = 3e-3, **data) -> dict:
    return {
        "trial_id": "",
        "model": {"base_model": str(tiny)},
        "data": {"train": str(tiny / "task" / "train.jsonl"), "eval": str(tiny / "task" / "eval.jsonl"),
                 "max_length": 32, **data},
        "adapter": adapter,
        "trainer": {"learning_rate": lr, "max_steps": MAX_STEPS, "batch_size": 8, "eval_every": 10, "eval_batches": 4},
        "seed": 0,
        "deepspeed": {"zero_stage": stage},
    }


def side_files(root: Path, tiny: Path) -> dict[str, str]:
    """A test split (the last 13 eval rows: an odd count, so one rank's shard is short) and a
    forgetting text in the pretraining format."""
    rows = (tiny / "task" / "eval.jsonl").read_text().splitlines()[-13:]
    (root / "test.jsonl").write_text("\n".join(rows) + "\n")
    (root / "forgetting.txt").write_text("copy abc = abc\nreverse hello = olleh\n\nadd 2 3 = 5\nupper dog = DOG\n")
    return {"test": str(root / "test.jsonl"), "forgetting": str(root / "forgetting.txt")}


def write_trials(directory: Path, trials: dict[str, dict]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cfg in trials.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(cfg))
        paths.append(path)
    return paths


def cli(*args: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*launcher, "-m", "trials", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="session")
def variant_runs(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("variants")
    extra = side_files(root, tiny_model)
    # First a trial far larger than any variant, so every later trial in the same processes
    # shows whether its peak memory is its own (trials.memory) or the big one's.
    big = trial(tiny_model, {"type": "lora", "r": 64, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]})
    big["trainer"].update(batch_size=512, max_steps=2, eval_every=2, eval_batches=1)
    trials = {"big": big}
    trials.update({name: {**trial(tiny_model, adapter, stage=stage, lr=lr, **extra), "evaluation": EVALUATION}
                   for name, (adapter, stage, lr) in VARIANTS.items()})
    # A learning rate that must blow up, to see the non-finite-loss guard on 2 workers.
    # (LN tuning: scaled norm weights overflow the logits; LoRA's blow-up is normalised away by
    # the next RMSNorm and ends at a finite, uniform loss.)
    trials["diverges"] = trial(tiny_model, {"type": "ln_tuning"}, stage=0, lr=1e30)
    paths = write_trials(root / "trials", trials)
    result = cli("run", *map(str, paths), "--out", str(root / "out"), "--keep-going", nproc=2, timeout=900)
    (root / "launch.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    assert result.returncode != 0, "the diverging trial should have made the launch fail"
    return root / "out"


def probe_logits_after_reload(tiny: Path, adapter_dir: Path, probe: dict):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


def base_logits(tiny: Path, probe: dict):
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        return base(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_saves_and_reloads_exactly(name, variant_runs, tiny_model):
    import torch

    out = variant_runs / name
    assert not (out / "error.txt").exists(), (out / "error.txt").read_text()
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert set(METRICS) <= set(m), f"missing metrics: {set(METRICS) - set(m)}"
    assert m["step"] == MAX_STEPS and m["skipped_steps"] == 0  # fp32: no loss scaling, no skipped update
    assert math.isfinite(m["eval_loss"]) and math.isfinite(m["eval_loss_before"])
    assert m["eval_loss"] < m["eval_loss_before"] - 0.01, "training did not lower the eval loss"
    assert [e["step"] for e in record["evals"]] == [0, 10, 20]
    assert len(record["steps"]) == MAX_STEPS
    assert record["setup"]["world_size"] == 2
    assert record["setup"]["zero_stage"] == VARIANTS[name][1]
    assert 0 < m["trainable_params"] < m["total_params"] and m["tokens_per_s"] > 0 and m["adapter_bytes"] > 0
    assert record["setup"]["effective"] or name == "ln_tuning"
    assert record["versions"]["peft"] and record["versions"]["deepspeed"]
    assert json.loads((out / "trial.json").read_text())["adapter"]["type"] == VARIANTS[name][0]["type"]

    # The saved adapter on a freshly loaded, untouched base model gives the trained model's
    # logits (PiSSA/CorDA through the converted save), and those differ from the base model's.
    probe = torch.load(out / artifacts.PROBE_FILE)
    reloaded = probe_logits_after_reload(tiny_model, out / artifacts.ADAPTER_DIR, probe)
    torch.testing.assert_close(reloaded, probe["logits"], atol=1e-5, rtol=0)
    assert (base_logits(tiny_model, probe) - probe["logits"]).abs().max() > 1e-3
    check_evaluation_records(out, m, tiny_model)


def check_evaluation_records(out: Path, m: dict, tiny: Path) -> None:
    """predictions.jsonl holds every evaluated example once, in file order, and the metrics
    are its means; the test split and forgetting add up; a prediction is what the saved
    adapter generates for that prompt alone (no batch, no padding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (out / artifacts.PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) == 2 * 4 * 8  # 2 ranks x 4 batches
    assert m["eval_exact_match"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert m["eval_answer_accuracy"] == pytest.approx(sum(r["answer_correct"] for r in rows) / len(rows))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    eval_rows = [json.loads(line) for line in (tiny / "task" / "eval.jsonl").read_text().splitlines()]
    assert all(r["target"] == eval_rows[r["index"]]["response"] for r in rows)
    tested = [json.loads(line) for line in (out / artifacts.TEST_PREDICTIONS_FILE).read_text().splitlines()]
    assert len(tested) == 13 and m["test_exact_match"] == pytest.approx(sum(r["correct"] for r in tested) / 13)
    assert math.isfinite(m["test_loss"]) and m["forgetting"] == pytest.approx(m["forgetting_after"] - m["forgetting_before"])

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                      str(out / artifacts.ADAPTER_DIR)).eval()
    for r in rows[:2]:
        ids = tokenizer(eval_rows[r["index"]]["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert tokenizer.decode(new, skip_special_tokens=True) == r["prediction"]


@pytest.mark.slow
def test_peak_memory_is_each_trials_own_on_kept_processes(variant_runs):
    """The variants run after a big trial in the same two processes (as on a kept gang): their
    peaks are their own, not the process-lifetime maximum the big trial set."""
    peak = {n: json.loads((variant_runs / n / "metrics.json").read_text())["metrics"]["peak_memory_mb"]
            for n in ("big", *VARIANTS)}
    assert all(peak[n] < peak["big"] - 300 for n in VARIANTS), peak


@pytest.mark.slow
def test_attention_kernels_give_the_same_eval_loss(tiny_model, tmp_path):
    """model.attn_implementation reaches the loaded model, and PyTorch's fused attention and
    plain matmuls train the same LoRA to the same eval loss (fp32, CPU)."""
    trials = {}
    for impl in ("sdpa", "eager"):
        cfg = trial(tiny_model, {"type": "lora", "r": 8, "dropout": 0.0})
        cfg["model"]["attn_implementation"] = impl
        cfg["trainer"].update(max_steps=4, eval_every=4, eval_batches=2)
        trials[impl] = cfg
    result = cli("run", *map(str, write_trials(tmp_path / "trials", trials)), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    sdpa, eager = (json.loads((tmp_path / "out" / k / "metrics.json").read_text())["metrics"] for k in trials)
    assert eager["eval_loss"] == pytest.approx(sdpa["eval_loss"], abs=1e-5)
    assert eager["eval_loss"] < eager["eval_loss_before"]


def test_gradient_checkpointing_gives_the_same_eval_loss(tiny_model, tmp_path):
    """Recomputing activations changes memory, not results: with dropout 0, the same trial with
    and without trainer.gradient_checkpointing ends at the same eval loss, for families and
    ZeRO stages that differ in how gradients reach the adapter."""
    cases = {"lora": ({"type": "lora", "r": 8, "dropout": 0.0}, 2), "oft": ({"type": "oft", "oft_block_size": 16}, 3),
             "ln_tuning": ({"type": "ln_tuning"}, 0)}
    trials = {}
    for name, (adapter, stage) in cases.items():
        for on in (False, True):
            cfg = trial(tiny_model, adapter, stage=stage, lr=VARIANTS[name][2])
            cfg["trainer"].update(max_steps=4, eval_every=4, eval_batches=2, gradient_checkpointing=on)
            trials[f"{name}-{'gc' if on else 'plain'}"] = cfg
    result = cli("run", *map(str, write_trials(tmp_path / "trials", trials)), "--out", str(tmp_path / "out"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in cases:
        plain, gc = (json.loads((tmp_path / "out" / f"{name}-{k}" / "metrics.json").read_text())
                     for k in ("plain", "gc"))
        assert not plain["setup"]["gradient_checkpointing"] and gc["setup"]["gradient_checkpointing"]
        assert gc["metrics"]["eval_loss"] == pytest.approx(plain["metrics"]["eval_loss"], abs=1e-6), name
        assert gc["metrics"]["eval_loss"] < gc["metrics"]["eval_loss_before"]


@pytest.mark.slow
def test_bf16_trains_in_bf16_accumulates_in_fp32_and_reloads(tiny_model, tmp_path):
    """precision bf16, decided once: DeepSpeed computes in bf16 (the adapter too) with fp32
    master weights, gradients accumulate in fp32, and the saved bf16 adapter reloads onto a bf16
    base to the trained model's logits (within bf16 rounding)."""
    import torch

    cfg = trial(tiny_model, {"type": "lora", "r": 8, "alpha": 16}, stage=2)
    cfg["deepspeed"]["precision"] = "bf16"
    result = cli("run", *map(str, write_trials(tmp_path / "trials", {"bf16": cfg})), "--out", str(tmp_path / "out"),
                 nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    engine = record["setup"]["engine"]
    assert record["setup"]["dtype"] == "bfloat16"
    assert (engine["model_dtype"], engine["grad_accum_dtype"], engine["adapter_dtypes"]) == (
        "bfloat16", "float32", ["bfloat16"])
    assert record["metrics"]["eval_loss"] < record["metrics"]["eval_loss_before"] - 0.01

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.load(tmp_path / "out" / artifacts.PROBE_FILE)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(tmp_path / "out" / artifacts.ADAPTER_DIR),
                                      autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    torch.testing.assert_close(logits, probe["logits"], atol=0.1, rtol=0.02)


@pytest.mark.slow
def test_pattern_overrides_reach_the_wrapped_modules(variant_runs):
    effective = json.loads((variant_runs / "lora_patterns" / "metrics.json").read_text())["setup"]["effective"]
    assert effective["model.layers.0.self_attn.q_proj"]["r"] == 16
    assert effective["model.layers.1.self_attn.v_proj"]["lora_alpha"] == 32
    assert effective["model.layers.1.self_attn.q_proj"]["r"] == 4


@pytest.mark.slow
def test_weight_rewriting_inits_keep_their_initial_adapter(variant_runs):
    for name in ("pissa", "pissa_niter_4", "corda"):
        initial = json.loads((variant_runs / name / artifacts.INITIAL_ADAPTER_DIR / "adapter_config.json").read_text())
        assert initial["init_lora_weights"] is True  # reloading it must not decompose again
        saved = json.loads((variant_runs / name / artifacts.ADAPTER_DIR / "adapter_config.json").read_text())
        assert saved["r"] == 2 * VARIANTS[name][0]["r"]  # converted: [trained | -initial]


@pytest.mark.slow
def test_every_zero_stage_trained_on_two_workers(variant_runs):
    """Read back from each trial's DeepSpeed engine: the stage it built and its data-parallel size."""
    engines = {n: json.loads((variant_runs / n / "metrics.json").read_text())["setup"]["engine"] for n in VARIANTS}
    assert {n: e["zero_stage"] for n, e in engines.items()} == {n: stage for n, (_, stage, _) in VARIANTS.items()}
    assert {e["zero_stage"] for e in engines.values()} == {0, 1, 2, 3}
    assert {n: e["dp_world_size"] for n, e in engines.items()} == {n: 2 for n in VARIANTS}
    # ZeRO-1/2 gradient buckets sized to the adapter (here the 5e7 floor), not DeepSpeed's 5e8 default.
    for n, e in engines.items():
        if e["zero_stage"] in (1, 2):
            assert e["reduce_bucket_size"] == e["allgather_bucket_size"] == 50_000_000, (n, e)


@pytest.mark.slow
def test_zero3_loads_partitioned_and_sees_the_same_base(variant_runs):
    """Under ZeRO-3 the base is loaded partitioned (every family whose wrap works on partitions)
    and its loss on the forgetting text, run module by module with each module's weights
    gathered, is the whole model's: every variant, at every stage, measures the same base."""
    from trials.adapters import family_of
    from trials.config import TrialConfig

    records = {n: json.loads((variant_runs / n / "metrics.json").read_text()) for n in VARIANTS}
    for n, (adapter, stage, _) in VARIANTS.items():
        f = TrialConfig.model_validate(trial(Path("/m"), adapter)).adapter
        expected = stage == 3 and family_of(f).wraps_partitioned(f)
        assert records[n]["setup"]["loaded_partitioned"] is expected, n
    assert sum(r["setup"]["loaded_partitioned"] for r in records.values()) >= 3
    whole = records["lora"]["metrics"]["forgetting_before"]
    for n, r in records.items():
        assert r["metrics"]["forgetting_before"] == pytest.approx(whole, abs=1e-6), n
    # What each rank holds of the base weights after loading: half the model when partitioned
    # over 2 ranks (ZeRO-0's lora holds all of it on each).
    all_of_it = records["lora"]["loading_mb_per_rank"]["weights"][0]
    for n, r in records.items():
        share = [w / all_of_it for w in r["loading_mb_per_rank"]["weights"]]
        assert share == pytest.approx([0.5, 0.5] if r["setup"]["loaded_partitioned"] else [1, 1], abs=0.01), n


def test_bucket_size_follows_the_trainable_count():
    from trials.config import TrialConfig
    from trials.engine_config import bucket_size, deepspeed_config

    assert bucket_size(14_336) == 50_000_000 and bucket_size(80_000_000) == 80_000_000
    assert bucket_size(8_000_000_000) == 500_000_000  # a full fine-tune keeps DeepSpeed's default
    cfg = TrialConfig.model_validate(trial(Path("/m"), {"type": "lora"}, stage=2))
    zero = deepspeed_config(cfg, 2, None, trainable=60_000_000)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 60_000_000, "allgather_bucket_size": 60_000_000}
    cfg3 = TrialConfig.model_validate(trial(Path("/m"), {"type": "lora"}, stage=3))
    assert deepspeed_config(cfg3, 2, None, trainable=1)["zero_optimization"] == {"stage": 3}


def test_loftq_accepts_only_the_bit_widths_peft_quantizes():
    from pydantic import ValidationError

    from trials.adapters.lora import LoraFields

    assert LoraFields(init_lora_weights="loftq", loftq_bits=8).loftq_bits == 8
    with pytest.raises(ValidationError, match="use 4 \\(NF4\\) or 8 \\(int8\\)"):
        LoraFields(init_lora_weights="loftq", loftq_bits=2)


@pytest.mark.slow
def test_non_finite_loss_stops_the_trial(variant_runs):
    error = (variant_runs / "diverges" / "error.txt").read_text()
    assert error.startswith("non-finite loss at step ")
    assert not (variant_runs / "diverges" / "metrics.json").exists()


# --- user mistakes: one line on stderr, exit 2, before any training --------------------


def run_in_process(capsys, *args: str) -> tuple[int, str]:
    from trials.__main__ import main

    code = main(["run", *args])
    return code, capsys.readouterr().err


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_loftq_without_gpu_is_refused_before_starting(tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("loftq can run here")
    [path] = write_trials(tmp_path, {"loftq": trial(tiny_model, {"type": "lora", "init_lora_weights": "loftq"})})
    result = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "lora+loftq", "CUDA")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"prompt": "rot1 abc =", "response": " bcd"}\n{"prompt": "rot1 xyz ="}\n',
         ["train.jsonl line 2", "'response'", "missing"]),
        ("", ["train.jsonl", "empty"]),
        ('{"prompt": "rot1 abc =", "response": 7}\n', ["train.jsonl line 1", "'response'", "string"]),
        ('{"prompt": "' + "rot1 abcdefgh =" * 4 + '", "response": " b"}\n', ["all 1 examples", "max_length=32"]),
    ],
    ids=["missing-field", "empty-file", "not-a-string", "truncated-away"],
)
def test_bad_data_is_one_line_before_training(tiny_model, tmp_path, capsys, content, needles):
    (tmp_path / "train.jsonl").write_text(content)
    cfg = trial(tiny_model, {"type": "lora"}, train=str(tmp_path / "train.jsonl"))
    [path] = write_trials(tmp_path, {"bad": cfg})
    code, stderr = run_in_process(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(stderr, *needles)
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not (tmp_path / "out" / artifacts.ADAPTER_DIR).exists()


def test_missing_base_model_names_the_fix(tmp_path, capsys, tiny_model):
    cfg = trial(tiny_model, {"type": "lora"})
    cfg["model"]["base_model"] = "no-such-org/no-such-model"
    [path] = write_trials(tmp_path, {"nomodel": cfg})
    code, stderr = run_in_process(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(stderr, "no-such-org/no-such-model", "never download")


# --- data: formats, labels, splits, shards ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from trials.config import ModelConfig
    from trials.model import load_tokenizer

    return load_tokenizer(ModelConfig(base_model=str(tiny_model)))


ROWS = [{"prompt": f"rot1 {w} =", "response": f" {w}x"} for w in ("abc", "def", "ghi", "jkl", "mno")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf-dir"])
def test_every_format_reads_the_same_pairs(tmp_path, fmt):
    from trials.data import read_pairs

    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        import csv

        path = tmp_path / "d.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["prompt", "response"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        from datasets import Dataset

        path = tmp_path / "d"
        Dataset.from_list(ROWS).save_to_disk(str(path))
    assert read_pairs(path, "prompt", "response") == [(r["prompt"], r["response"]) for r in ROWS]


def test_csv_missing_column_names_line_and_field(tmp_path):
    from trials.data import read_pairs
    from trials.errors import TrialError

    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nrot1 a =, b\n")
    with pytest.raises(TrialError, match=r"d\.csv line 2: field 'response' is missing \(fields present: prompt, answer\)"):
        read_pairs(path, "prompt", "response")


def test_labels_cover_response_and_eos_only(tokenizer):
    from trials.data import IGNORE, tokenize

    [ex] = tokenize([("rot1 abc =", " bcd")], tokenizer, 64, "mem")
    n_prompt = len(tokenizer("rot1 abc =")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[n_prompt:-1]) == " bcd"


def test_truncation_keeps_examples_with_some_response_left(tokenizer):
    from trials.data import tokenize

    prompt = "rot1 abcdefgh ="  # BOS + 15 characters
    kept = tokenize([(prompt, " bcdefghi"), ("x" * 40, " y")], tokenizer, 18, "mem")
    assert len(kept) == 1
    [ex] = kept
    assert len(ex.input_ids) == 18 and ex.labels[16:] == ex.input_ids[16:] == tokenizer(" b", add_special_tokens=False)["input_ids"]


def test_eval_fraction_split_is_fixed_disjoint_and_indexed(tokenizer, tmp_path):
    """Every trial holds out the same examples (whatever its seed), so trials compare item by
    item; each example keeps its row number and response text."""
    from trials.config import DataConfig
    from trials.data import load_splits

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"rot1 {i} =", "response": f" {i}"}) + "\n" for i in range(50)))
    cfg = DataConfig(train=str(path), eval_fraction=0.2)
    a, b = load_splits(cfg, tokenizer), load_splits(cfg, tokenizer)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a == b
    assert [e.index for e in a.eval] == sorted(e.index for e in a.eval)
    assert all(e.target == f" {e.index}" for e in a.eval + a.train)
    assert sorted(e.index for e in a.eval + a.train) == list(range(50))
    assert not {tuple(e.input_ids) for e in a.eval} & {tuple(e.input_ids) for e in a.train}
    default = load_splits(DataConfig(train=str(path)), tokenizer)
    assert len(default.eval) == 5  # eval_fraction defaults to 0.1


def test_shards_split_each_epoch_between_ranks():
    from itertools import islice

    from trials.data import Example, eval_batches, train_batches

    examples = [Example([i], [i]) for i in range(10)]
    shards = [list(islice(train_batches(examples, 5, rank, 2, seed=3), 1))[0] for rank in (0, 1)]
    assert sorted(e.input_ids[0] for s in shards for e in s) == list(range(10))
    again = list(islice(train_batches(examples, 5, 0, 2, seed=3), 1))[0]
    assert again == shards[0]
    # 5 eval examples on 2 ranks, batch 1: both ranks run 3 batches (ZeRO-3 needs equal
    # counts); rank 1's third is a loss-free filler.
    batches = [eval_batches(examples[:5], 1, rank, 2, None) for rank in (0, 1)]
    assert [len(b) for b in batches] == [3, 3]
    assert [e.input_ids[0] for b in batches[0] for e in b] == [0, 2, 4]
    assert all(label == -100 for label in batches[1][2][0].labels)
    assert len(eval_batches(examples[:5], 1, 0, 2, cap=2)) == 2


def test_warmup_then_cosine_to_zero():
    from trials.train import warmup_cosine

    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_a_reporter_can_stop_the_trial_after_an_evaluation(tiny_model, tmp_path):
    """An early-stopping scheduler's decision arrives as on_eval's answer: training ends at
    that evaluation, yet the adapter is saved and on_end still sees the whole result."""
    from trials.config import TrialConfig
    from trials.metrics import NullReporter
    from trials.train import run_trial

    class StopAtFirstEval(NullReporter):
        def __init__(self):
            self.evals, self.ended = [], {}

        def on_eval(self, step, metrics):
            self.evals.append(step)
            return step > 0

        def on_end(self, result, out_dir):
            self.ended.update(result)

    cfg = TrialConfig.model_validate(trial(tiny_model, {"type": "lora", "r": 4})).with_id()
    reporter = StopAtFirstEval()
    result = run_trial(cfg, tmp_path, reporter)
    assert reporter.evals == [0, 10]
    assert result["step"] == 10 and result["early_stopped"] == 1.0 and reporter.ended["early_stopped"] == 1.0
    assert (tmp_path / artifacts.ADAPTER_DIR / "adapter_config.json").is_file()
