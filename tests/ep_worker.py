"""One rank of an expert-parallel test run (a helper for tests/test_distributed.py).

    mlx.launch -n N --backend ring -- python tests/ep_worker.py JOB.json
    python tests/ep_worker.py JOB.json            # plain single process (job "plain": true)

JOB.json:
    models       [{"name", "path", "quantize": null | {"group_size", "bits"}}]
    prompt       token ids fed to the model
    max_tokens   greedy tokens to generate
    out          directory; rank r writes rank{r}.json there
    plain        true: mlx_moe.load + generate in one process, no expert parallelism
    timeout      the expert-parallel watchdog's limit in seconds
    expert_log   true: every rank passes expert_log=out/NAME.csv (only rank 0 may write it)
    race_rounds  rounds of tests/ep_race_repro.py's two-stream pattern with
                 ExpertParallel.all_sum (issue 8); the rounds with a wrong sum go to
                 "race_bad" in rank{r}.json
    cli          argv for `mlx_moe.generation.main`, run after the models on every rank;
                 its stdout goes to out/cli_stdout{r}.txt
    (per model)  "placement_log": an expert log CSV to place that model's experts by load
    tail         {"path", "max_tokens", "pace"}: after writing rank{r}.json, a long greedy
                 generation with that model, sleeping `pace` s after each token and writing
                 the count so far to out/progress{r} (the failure tests kill or stop a rank
                 during it)

Per model the JSON holds the greedy tokens, the logits of the prompt, the bytes of
the expert weights held, and the MLX active/peak memory the load added.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import mlx_moe  # noqa: E402
from mlx_moe import distributed  # noqa: E402


def _quantize(model, spec) -> None:
    # Same predicate on both sides of a comparison: every layer MLX can quantize whose
    # input width the group divides (the tiny models' widths are multiples of 32).
    nn.quantize(model, group_size=spec["group_size"], bits=spec["bits"],
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % spec["group_size"] == 0)


def _load(entry, job, group):
    if job.get("plain"):
        model, tok = mlx_moe.load(entry["path"], lazy=True)
        if entry.get("quantize"):
            _quantize(model, entry["quantize"])
        mx.eval(model.parameters())
        return model, tok
    model, tok = mlx_moe.load(entry["path"], lazy=True)
    if entry.get("quantize"):
        _quantize(model, entry["quantize"])
    placement = distributed.plan_placement(model, group.size(), entry.get("placement_log"))
    distributed.shard_experts(model, group, placement, timeout=job.get("timeout", distributed.DEFAULT_TIMEOUT))
    mx.eval(model.parameters())
    return model, tok


def run_model(entry, job, group, rank: int, out: Path) -> dict:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    active0 = mx.get_active_memory()
    model, tok = _load(entry, job, group)
    gc.collect()
    mx.clear_cache()
    result = {
        "expert_bytes": distributed.expert_nbytes(model),
        "active_bytes": mx.get_active_memory() - active0,
        "peak_bytes": mx.get_peak_memory() - active0,
        "local_experts": {str(l.layer_idx): l.switch_mlp.num_experts for l in mlx_moe.moe_layers(model)},
    }
    ep = getattr(model, "expert_parallel", None)
    result["placement"] = ep.placement.method if ep is not None else None
    log = str(out / f"{entry['name']}.csv") if job.get("expert_log") else None
    tokens = []
    for response in mlx_moe.stream_generate(model, tok, list(job["prompt"]), max_tokens=job["max_tokens"],
                                            temp=0.0, expert_log=log):
        tokens.append(int(response.token))
    result["tokens"] = tokens
    if ep is not None:
        with ep.watch("computing logits"):
            logits = model(mx.array([job["prompt"]]))[0]
            mx.eval(logits)
    else:
        logits = model(mx.array([job["prompt"]]))[0]
    result["logits"] = logits.astype(mx.float32).tolist()
    del model
    return result


def main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    group = None
    rank = 0
    try:
        if not job.get("plain"):
            group = distributed.init_group("ring", timeout=job.get("timeout", distributed.DEFAULT_TIMEOUT))
            rank = group.rank()
        results = {"size": group.size() if group else 1, "models": {}}
        (out / f"pid{rank}").write_text(str(os.getpid()))
        for entry in job["models"]:
            results["models"][entry["name"]] = run_model(entry, job, group, rank, out)
        if job.get("race_rounds"):
            from ep_race_repro import two_stream_rounds

            ep = distributed.ExpertParallel(group, distributed.Placement(group.size(), {}))
            with ep.watch("running the two-stream collectives check"):
                results["race_bad"] = two_stream_rounds(group, ep.all_sum, job["race_rounds"])
            ep.watchdog.close()
        if job.get("cli"):
            from mlx_moe.generation import main as cli_main

            with open(out / f"cli_stdout{rank}.txt", "w") as f, contextlib.redirect_stdout(f):
                results["cli_status"] = cli_main(job["cli"])
            if results["cli_status"] != 0:
                print(f"cli failed: {results['cli_status']}", file=sys.stderr)
                return 1
    except distributed.ExpertParallelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    if job.get("tail"):
        try:
            run_tail(job["tail"], job, group, rank, out)
        except distributed.ExpertParallelError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
    return 0


def run_tail(tail, job, group, rank: int, out: Path) -> None:
    model, tok = _load({"path": tail["path"]}, job, group)
    # EOS cannot end it early: generate_tokens does not stop on EOS.
    from mlx_moe.generation import generate_tokens

    for n, _ in enumerate(generate_tokens(model, list(job["prompt"]),
                                          max_tokens=tail["max_tokens"]), start=1):
        (out / f"progress{rank}").write_text(str(n))
        time.sleep(tail["pace"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
