"""Wall time of the bundled suite per task: mvquant's prefix-sharing scorer vs lm-eval's plain HFLM
(batch size 8, every context + choice in full), on the same model, tasks and items, in one run.

    flock /tmp/mvquant-heavy.lock python benchmarks/bench_eval.py [--limit 50] [--tasks contextual,parametric]

Prints seconds per task for both, the speed-up ratio, and both accuracies (they must agree: the two
paths compute the same log-likelihoods; tiny float differences can flip a near-tie).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch


def run_task(lm, task, manager, limit):
    from lm_eval import simple_evaluate
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                          bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = out["samples"][task]
    return seconds, sum(float(s["acc"]) for s in samples) / len(samples), len(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="contextual,parametric")
    p.add_argument("--limit", type=int, default=50, help="items per task (default 50; 0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-baseline", action="store_true", help="time only the mvquant scorer (the full suite)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval.evaluator as ev
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mvquant import load_model
    from mvquant.evaluation import tasks as T
    from mvquant.evaluation.lm import MvquantLM

    ev.add_env_info = lambda _r: None   # same for both paths: skip the environment probe
    model, tok = load_model(args.model)
    ours, _ = T.resolve_tasks(args.tasks)
    manager = TaskManager(include_path=[str(T.tasks_dir())], include_defaults=False)
    limit = args.limit or None
    fast = MvquantLM(args.model, model=model, tokenizer=tok, progress=False)
    base = None if args.skip_baseline else HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    print(f"model {args.model}, {torch.get_num_threads()} threads, limit {limit or 'all'} items per task")
    print(f"{'task':20s} {'n':>4s} {'mvquant s':>10s} {'HFLM s':>8s} {'speed-up':>9s} {'acc mvquant':>12s} {'acc HFLM':>9s}")
    tot_fast = tot_base = 0.0
    for task in ours:
        s_fast, acc_fast, n = run_task(fast, task, manager, limit)
        tot_fast += s_fast
        if base is None:
            print(f"{task:20s} {n:4d} {s_fast:10.1f} {'-':>8s} {'-':>9s} {acc_fast:12.3f}", flush=True)
            continue
        s_base, acc_base, _ = run_task(base, task, manager, limit)
        tot_base += s_base
        print(f"{task:20s} {n:4d} {s_fast:10.1f} {s_base:8.1f} {s_base / s_fast:8.2f}x {acc_fast:12.3f} {acc_base:9.3f}",
              flush=True)
    if base is not None:
        print(f"{'total':20s} {'':4s} {tot_fast:10.1f} {tot_base:8.1f} {tot_base / tot_fast:8.2f}x")
    else:
        print(f"{'total':20s} {'':4s} {tot_fast:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
