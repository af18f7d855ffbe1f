"""The trials command line (the only one):

- `python -m trials run TRIAL.json [MORE.json ...] --out DIR` (also under torchrun);
- `python -m trials build-tiny [--quick] [--out DIR] [--seed N] [--steps N]`: the tiny
  pretrained Llama and its task;
- `python -m trials tiny-task --out DIR [--seed N] [--n-train N] [--n-eval N]`: the task only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _fail(message: str) -> None:
    if _rank() == 0:
        print(f"error: {message}", file=sys.stderr)


def _load(paths: list[Path]):
    from pydantic import ValidationError

    from trials.config import TrialConfig
    from trials.errors import TrialError

    configs = []
    for path in paths:
        try:
            configs.append(TrialConfig.load(path))
        except FileNotFoundError as err:
            raise TrialError(f"{path}: no such trial file") from err
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "trial"
            raise TrialError(f"{path}: {where}: {first['msg']} ({err.error_count()} problem(s))") from err
    return configs


def _out_dirs(paths: list[Path], configs, out: Path) -> list[Path]:
    """One trial writes into DIR itself; several write into DIR/<trial_id or file stem>."""
    if len(paths) == 1:
        return [out]
    names = [cfg.trial_id or p.stem for p, cfg in zip(paths, configs)]
    if len(set(names)) != len(names):
        names = [p.stem for p in paths]
    return [out / n for n in names]


def run(args: argparse.Namespace) -> int:
    from trials.errors import TrialError

    configs = _load(args.trials)
    from trials.dist import ensure_process_group, import_deepspeed
    from trials.train import check_runnable, run_trial

    for cfg in configs:
        if not args.keep_going:
            check_runnable(cfg)  # refuse every unrunnable trial before the first one starts
    import_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    created = ensure_process_group()
    code = 0
    try:
        for cfg, out in zip(configs, _out_dirs(args.trials, configs, args.out)):
            try:
                result = run_trial(cfg, out, keep_base_model=args.keep_base_model)
            except Exception as err:
                if not args.keep_going:
                    raise
                # Record and go on: the other trials in this launch are independent.
                user_error = isinstance(err, TrialError)
                code = max(code, 2 if user_error else 1)
                if _rank() == 0:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "error.txt").write_text(str(err) if user_error else traceback.format_exc())
                _fail(f"{out}: {err}")
                continue
            if _rank() == 0:
                print(json.dumps({"out": str(out), **result}))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return code


def build_tiny(args: argparse.Namespace) -> int:
    from trials import tiny

    if args.out is None:
        print(tiny.ensure_tiny(quick=args.quick))
    else:
        steps = args.steps if args.steps is not None else tiny.DEFAULT_STEPS
        path = tiny.build_base_model(args.out, seed=args.seed, steps=steps, quick=args.quick)
        tiny.write_task(path / "task", seed=args.seed)
        print(path)
    return 0


def tiny_task(args: argparse.Namespace) -> int:
    from trials import tiny

    tiny.write_task(args.out, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trials", description="Run peft-sweep trials outside a sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="Run trial files one after another in this process (or torchrun's processes).")
    r.add_argument("trials", nargs="+", type=Path, help="TrialConfig JSON files.")
    r.add_argument("--out", type=Path, required=True,
                   help="Output directory (with several trials: one subdirectory per trial).")
    r.add_argument("--keep-going", action="store_true",
                   help="After a failed trial, record out/error.txt and run the next; exit nonzero at the end.")
    r.add_argument("--keep-base-model", action="store_true",
                   help="Keep the base model loaded between trials that use the same one (trials.resident).")
    b = sub.add_parser("build-tiny", help="Build the tiny pretrained Llama and its task (cached unless --out).")
    b.add_argument("--quick", action="store_true", help="A few training steps only (for tests).")
    b.add_argument("--out", type=Path, help="Build into this directory instead of the cache (always rebuilds).")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="Pretraining steps (default: the shipped model's).")
    t = sub.add_parser("tiny-task", help="Write train.jsonl and eval.jsonl of the tiny model's downstream task.")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-train", type=int, default=2000)
    t.add_argument("--n-eval", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from trials.errors import TrialError

    try:
        return {"run": run, "build-tiny": build_tiny, "tiny-task": tiny_task}[args.command](args)
    except TrialError as err:
        _fail(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
