"""One fine-tune: load, wrap with the trial's adapter, train with DeepSpeed, evaluate, save.

Runs on every rank of the process group (Ray Train's, torchrun's, or a private one for a
single process); rank 0 writes the artifacts and every rank returns the same metrics.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trials import artifacts, resident
from trials.adapters import Calibration, effective_values, family_of
from trials.config import TrialConfig
from trials.data import Example, calibration_examples, collate, eval_batches, load_splits, train_batches
from trials.dist import (
    AgreedFlag,
    World,
    all_sum,
    broadcast,
    current_world,
    ensure_process_group,
    import_deepspeed,
    same_on_all_ranks,
)
from trials.engine_config import deepspeed_config, init_fingerprint, warmup_cosine
from trials.errors import TrialError
from trials.evaluate import Evaluator, gather_records
from trials.memory import PeakMemory, current_mb
from trials.metrics import NullReporter, Reporter
from trials.model import (
    PartitionedLoading,
    count_params,
    gathered_forward,
    held_weight_mb,
    is_checkpointing,
    is_partitioned,
    load_tokenizer,
    placement,
    resolve_dtype,
    set_checkpointing,
)
from trials.templates import needs_chat_template, turn_end_ids

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PROBE_EXAMPLES = 4


def check_runnable(cfg: TrialConfig) -> None:
    """Refuse, before anything is loaded, a trial this process cannot run."""
    family, f = family_of(cfg.adapter), cfg.adapter
    problems = family.runtime_requirements(f)
    if problems:
        raise TrialError(f"adapter {family.variant(f)} cannot run here: {'; '.join(problems)}")
    if not family.supports_zero_stage(f, cfg.deepspeed.zero_stage):
        raise TrialError(f"adapter {family.variant(f)} does not train under DeepSpeed ZeRO stage "
                         f"{cfg.deepspeed.zero_stage}; use another deepspeed.zero_stage")


def run_trial(cfg: TrialConfig, out_dir: str | Path, reporter: Reporter | None = None, *,
              keep_base_model: bool = False) -> dict[str, Any]:
    """Run the trial on this rank; returns the final metrics (names from trials.metrics).
    `keep_base_model`: keep the base model loaded for the process's next trial, and take the
    one an earlier trial kept when it is the same (trials.resident)."""
    started = time.perf_counter()
    check_runnable(cfg)
    import torch
    import torch.distributed as dist

    import_deepspeed()
    created = ensure_process_group()
    try:
        world = current_world()
        # Seeding inside fork_rng keeps the caller's RNG streams untouched.
        with torch.random.fork_rng(devices=[world.device.index] if world.device.type == "cuda" else []):
            trial = _Trial(cfg, Path(out_dir), reporter or NullReporter(), world, started, keep_base_model)
            try:
                return trial.run()
            except BaseException:
                resident.drop()  # a model a failed trial left half-wrapped is never handed on
                raise
            finally:
                if trial.memory is not None:
                    trial.memory.stop()  # idempotent: a failed trial leaves no sampler thread behind
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class _Trial:
    cfg: TrialConfig
    out: Path
    reporter: Reporter
    world: World
    started: float
    keep_base_model: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    # Set while preparing:
    pad_id: int = 0
    evaluator: Evaluator | None = None
    forgetting_before: float | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # this rank's, of the latest evaluation
    generate_s: float = 0.0
    memory: PeakMemory | None = None
    load_memory: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    adapter_params: list[Any] = field(default_factory=list)
    initial: Path | None = None  # the saved initial adapter, for inits that rewrite base weights
    trained_base: dict[str, Any] | None = None  # base weights the adapter needs (LoftQ), by name
    scheduler: Any = None
    stop_requested: bool = False  # a reporter's answer to the latest evaluation

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world.device.type != "cuda":
            return {k: v.to(self.world.device) for k, v in batch.items()}
        # From pinned memory without blocking: the host prepares the next batch while the GPU
        # works. The step's one loss read (below) is where the host waits, so the step clock
        # measures the GPU's work, not the launch.
        return {k: v.pin_memory().to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.memory = PeakMemory(self.world.device).start()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.dump(self.out / "trial.json")
        dtype = resolve_dtype(cfg.deepspeed.precision, self.world.device.type == "cuda")
        # Partitioned at load under ZeRO-3, unless the family's wrap needs the base whole (its
        # weights are then partitioned by deepspeed.initialize, as at ZeRO 0-2 they stay whole).
        partition = cfg.deepspeed.zero_stage == 3 and family_of(cfg.adapter).wraps_partitioned(cfg.adapter)
        zero3 = PartitionedLoading(deepspeed_config(cfg, self.world.size, dtype) if partition else None)
        try:
            return self._run(zero3, dtype)
        finally:
            zero3.close()

    def _run(self, zero3: PartitionedLoading, dtype) -> dict[str, Any]:
        cfg, family = self.cfg, family_of(self.cfg.adapter)
        model, splits, info = self._prepare(zero3, dtype)
        self.reporter.on_setup(info)
        engine = self._engine(model, dtype)
        # What DeepSpeed actually built, read back from the engine (not the config we asked for).
        info["engine"] = {"zero_stage": int(engine.zero_optimization_stage()), "dp_world_size": int(engine.dp_world_size),
                          "reduce_bucket_size": int(engine.zero_reduce_bucket_size()),
                          "allgather_bucket_size": int(engine.zero_allgather_bucket_size()),
                          # What DeepSpeed computes and accumulates in, and the adapter's own dtype.
                          "model_dtype": str(engine.get_data_types()[0]).removeprefix("torch."),
                          "grad_accum_dtype": str(engine.get_data_types()[1]).removeprefix("torch."),
                          "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in self.adapter_params})}
        try:
            result = self._train(engine, splits.train, splits.eval, info)
            result.update(self._final(engine, splits))
            self._probe(engine, splits.eval)
            artifacts.save_adapter(engine.module, self.out / artifacts.ADAPTER_DIR, self.adapter_params,
                                   initial=self.initial, is_main=self.is_main, trained_base=self.trained_base)
        finally:
            engine.destroy()
        resident.give_back(engine.module)
        # This trial's own peak (see trials.memory) of every rank; the largest is the metric.
        mine, rank, size = self.memory.stop(), self.world.rank, self.world.size
        mine = [mine, *self.load_memory]
        table = all_sum([v if r == rank else 0.0 for v in mine for r in range(size)], self.world.device)
        per_rank, *loading = (table[i * size:(i + 1) * size] for i in range(len(mine)))
        peak = max(per_rank)
        if self.is_main:
            result["adapter_bytes"] = artifacts.adapter_bytes(self.out / artifacts.ADAPTER_DIR)
            result["peak_memory_mb"] = peak
            result["wall_s"] = time.perf_counter() - self.started
            # Every rank holds one device (a GPU, or a CPU worker) for the whole trial.
            result["device_hours"] = result["wall_s"] * self.world.size / 3600
            artifacts.write_json(self.out / "metrics.json", {
                "trial_id": cfg.trial_id,
                "variant": family.variant(cfg.adapter),
                "metrics": result,
                "evals": self.evals,
                "steps": self.steps,
                "setup": info,
                "peak_memory_mb_per_rank": per_rank,
                # Per rank, up to the loaded base model: peak, held after, the weights' bytes.
                "loading_mb_per_rank": dict(zip(("peak", "held", "weights"), loading)),
                "versions": artifacts.versions(),
            })
        result = broadcast(result)
        self.reporter.on_end(result, str(self.out))
        return result

    def _prepare(self, zero3: PartitionedLoading, dtype):
        """Data, base model, adapter: everything before DeepSpeed, with the static facts."""
        import deepspeed
        import torch

        cfg, family, f = self.cfg, family_of(self.cfg.adapter), self.cfg.adapter
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id
        splits = load_splits(cfg.data, tokenizer)  # bad data fails here, before the model loads
        log.info("data: %d train, %d eval, %d test examples", len(splits.train), len(splits.eval), len(splits.test))
        # ZeRO-3 loads partitioned (model.PartitionedLoading): there is no whole model to keep.
        loaded = resident.acquire(cfg.model, dtype, self.world.device,
                                  placement(self.world.device, cfg.deepspeed.zero_stage),
                                  keep=self.keep_base_model and not zero3.active)
        model = loaded.model
        partitioned = is_partitioned(model)
        # What loading cost this rank, before any training: its peak so far, what it holds after
        # (allocator caches returned), and the weights' own bytes (a ZeRO-3 partition or all).
        self.load_memory = [self.memory.so_far(), current_mb(self.world.device), held_weight_mb(model)]
        base_params = count_params(model)[1]
        if cfg.trainer.gradient_checkpointing:
            # The PEFT way: non-reentrant checkpointing, and embedding outputs that require grad,
            # which reentrant code paths in some models still expect.
            set_checkpointing(model, True)
            model.enable_input_require_grads()
        checkpointing = is_checkpointing(model)
        self.evaluator = Evaluator(cfg.evaluation, tokenizer, self.world.device,
                                   synced_generation=cfg.deepspeed.zero_stage == 3 and self.world.size > 1,
                                   stop_ids=tuple(turn_end_ids(tokenizer)) if needs_chat_template(
                                       cfg.data.template, cfg.data.messages_field) else ())
        if splits.forgetting:
            # The base model itself, before any adapter exists: for PiSSA-like inits, which
            # rewrite base weights, "adapter disabled" after wrapping is not the base any more.
            model.eval()
            with gathered_forward(model) if partitioned else nullcontext():
                self.forgetting_before = self.evaluator.loss(model, self._shard(splits.forgetting))
        base_ids = {id(p) for p in model.parameters()}
        # Found once (a probe wrap of the model), only where something needs them.
        rewritten = (family.rewritten_modules(model, f)
                     if resident.holds(model) or family.needs_trained_base(f) else [])
        if resident.holds(model):
            resident.protect(model, rewritten)

        # Random and data-dependent inits must agree on every rank (ZeRO-3 keeps each rank's
        # own copy of its partition, nothing re-broadcasts it): same seed, same calibration.
        torch.manual_seed(cfg.seed)
        calibration = None
        if family.needs_calibration(f):
            chosen = calibration_examples(splits.train, family.calibration_size(f), cfg.seed)
            # Partitioned, the calibration forwards (and the SVDs after them) need every weight
            # whole: gathered on every rank for the calibration only, then partitioned again.
            whole = ((lambda: deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None))
                     if partitioned else None)
            calibration = Calibration([self.to_device(self._inputs([e])) for e in chosen], **(
                {"whole_model": whole} if whole else {}))
        self.trained_base = family.trained_base(model, f, rewritten) or None  # LoftQ's backbone, saved with the adapter
        log.info("model loaded; wrapping with %s", family.variant(f))
        model = family.wrap(model, f, calibration)
        # What PEFT added: under ZeRO-3 exactly these are gathered to save the adapter.
        self.adapter_params = [p for p in model.parameters() if id(p) not in base_ids]
        if not same_on_all_ranks(init_fingerprint(model, self.adapter_params), self.world.device):
            raise RuntimeError(f"the {family.variant(f)} adapter initialized differently on different workers; "
                               "its initialization must be seeded and calibrated identically on every rank")
        self.initial = self.out / artifacts.INITIAL_ADAPTER_DIR if family.changes_base_weights(f) else None
        if self.initial is not None and self.is_main:
            artifacts.save_initial_adapter(model, self.initial)

        trainable, total = count_params(model)
        log.info("wrapped: %d trainable of %d parameters", trainable, total)
        info = {
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / base_params,
            "base_params": base_params,
            "effective": effective_values(model, family.effective_attrs),
            "world_size": self.world.size,
            "zero_stage": cfg.deepspeed.zero_stage,
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.world.device.type,
            "train_examples": len(splits.train),
            "eval_examples": len(splits.eval),
            "test_examples": len(splits.test),
            "gradient_checkpointing": checkpointing,
            "base_model_load_s": loaded.load_s,
            "base_model_reused": loaded.reused,
            "loaded_partitioned": partitioned,
        }
        return model, splits, info

    def _inputs(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        b = collate(batch, self.pad_id)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    def _engine(self, model, dtype):
        import deepspeed
        import torch

        tc = self.cfg.trainer
        # A torch optimizer: DeepSpeed's own Adam JIT-compiles a native op (~75 s on CPU).
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=tc.learning_rate, weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.max_steps, tc.warmup_ratio))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(self.cfg, self.world.size, dtype,
                                                                       count_params(model)[0]))
        self.scheduler = scheduler
        return engine

    def _train(self, engine, train: list[Example], eval_: list[Example], info: dict[str, Any]) -> dict[str, Any]:
        tc, rank, size = self.cfg.trainer, self.world.rank, self.world.size
        batches = train_batches(train, tc.batch_size, rank, size, self.cfg.seed)
        evals = self._shard(eval_, tc.eval_batches)
        setup_s = time.perf_counter() - self.started
        log.info("DeepSpeed ready (ZeRO stage %d, %d workers)", self.cfg.deepspeed.zero_stage, size)
        before = self._evaluate(engine, evals, 0)
        tokens, samples, train_s, last_loss = 0, 0, 0.0, float("nan")
        nonfinite = AgreedFlag(self.world.device)
        for step in range(1, tc.max_steps + 1):
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            losses = []
            for _ in range(tc.gradient_accumulation_steps):
                cpu_batch = collate(next(batches), self.pad_id)
                # Counted on the host copy: reading a device tensor would wait for the GPU.
                tokens += int(cpu_batch["attention_mask"].sum())
                samples += len(cpu_batch["input_ids"])
                loss = engine(**self.to_device(cpu_batch)).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            last_loss = float(sum(losses)) / len(losses)  # one device read per optimizer step
            # Decided together, so no rank raises while the others wait in a collective; in the
            # background, so no step waits for it (a per-step barrier cost ~10 % of throughput).
            evaluating = step % tc.eval_every == 0 or step == tc.max_steps
            bad = nonfinite.post(step, not math.isfinite(last_loss))
            if bad is None and evaluating:
                bad = nonfinite.flush()
            if bad is not None:
                raise TrialError(f"non-finite loss at step {bad} (lower trainer.learning_rate or check the data)")
            train_s += time.perf_counter() - t0
            self.steps.append({"step": step, "train_loss": last_loss, "learning_rate": lr})
            self.reporter.on_step(step, {"train_loss": last_loss, "learning_rate": lr})
            if evaluating:
                final = self._evaluate(engine, evals, step)
                # Decided together: a rank whose reporter missed the decision must not train on alone.
                if step < tc.max_steps and all_sum([1.0 if self.stop_requested else 0.0], self.world.device)[0]:
                    break
        total_tokens, total_samples = all_sum([float(tokens), float(samples)], self.world.device)
        return {
            **final,
            "train_tokens": total_tokens,
            "train_samples": total_samples,
            "eval_loss_before": before["eval_loss"],
            "train_loss": last_loss,
            "learning_rate": lr,
            "tokens_per_s": total_tokens / train_s,
            # fp16's dynamic loss scaling skips the steps whose gradients overflow: trained, but no update
            "skipped_steps": float(getattr(engine, "skipped_steps", 0) or 0),
            "s_per_step": train_s / step,
            "early_stopped": 1.0 if step < tc.max_steps else 0.0,
            "trainable_params": info["trainable_params"],
            "total_params": info["total_params"],
            "trainable_percent": info["trainable_percent"],
            "setup_s": setup_s,
            "base_model_load_s": info["base_model_load_s"],
            "base_model_reused": 1.0 if info["base_model_reused"] else 0.0,
            "train_s": train_s,
        }

    def _shard(self, examples: list[Example], cap: int | None = None) -> list[list[Example]]:
        return eval_batches(examples, self.cfg.trainer.batch_size, self.world.rank, self.world.size, cap)

    def _evaluate(self, engine, batches: list[list[Example]], step: int) -> dict[str, float]:
        """Eval metrics over all ranks' shards (generation too with evaluation.generate_at:
        every); reported, and this rank's per-example records kept for predictions.jsonl."""
        ev = self.cfg.evaluation
        generate = ev.generate and ev.generate_at == "every" and step > 0
        engine.eval()
        started = time.perf_counter()
        metrics, self.records = self.evaluator.split(engine.module, engine, batches, "eval", generate=generate)
        if generate:
            self.generate_s += time.perf_counter() - started
        engine.train()
        metrics = {"step": step, **metrics}
        self.evals.append(metrics)
        self.stop_requested = bool(self.reporter.on_eval(step, dict(metrics)))
        return metrics

    def _final(self, engine, splits) -> dict[str, Any]:
        """After training, with the final adapter: generation on eval when it has not run at
        the last evaluation, the test split, forgetting; predictions written by rank 0."""
        ev, cfg = self.cfg.evaluation, self.cfg
        out: dict[str, Any] = {}
        engine.eval()
        if ev.generate and "eval_exact_match" not in self.evals[-1]:
            started = time.perf_counter()
            out.update(self.evaluator.add_generation(engine.module, self._shard(splits.eval, cfg.trainer.eval_batches),
                                                     self.records, "eval"))
            self.generate_s += time.perf_counter() - started
            self.evals[-1].update(out)
        files = {artifacts.PREDICTIONS_FILE: gather_records(self.records)}
        if splits.test:
            started = time.perf_counter()
            test, records = self.evaluator.split(engine.module, engine, self._shard(splits.test), "test",
                                                 generate=ev.generate)
            if ev.generate:
                self.generate_s += time.perf_counter() - started
            out.update(test)
            files[artifacts.TEST_PREDICTIONS_FILE] = gather_records(records)
        if self.forgetting_before is not None:
            after = self.evaluator.loss(engine, self._shard(splits.forgetting))
            out.update(forgetting_before=self.forgetting_before, forgetting_after=after,
                       forgetting=after - self.forgetting_before)
        if ev.generate:
            out["generate_s"] = self.generate_s
        engine.train()
        if self.is_main:
            for name, rows in files.items():
                artifacts.write_jsonl(self.out / name, rows)
        return out

    def _probe(self, engine, eval_: list[Example]) -> None:
        """Logits of the trained model on a fixed batch, so a reload can be checked against them.
        Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 saves."""
        import torch

        inputs = self._inputs(eval_[:PROBE_EXAMPLES])
        engine.eval()
        with torch.no_grad():
            logits = engine(**self.to_device(inputs)).logits.float().cpu()
        if self.is_main:
            torch.save({**inputs, "logits": logits}, self.out / artifacts.PROBE_FILE)
