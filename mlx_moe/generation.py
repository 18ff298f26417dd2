"""Text generation: `generate` / `stream_generate` and the `generate` CLI.

Built on mlx-lm's `stream_generate` (its sampler, KV cache and prefill
chunking); we add the routing hook's delivery points, the expert log, and
the chat template default.

    python -m mlx_moe.generate --prompt "Hello"          # the built-in demo model
    python -m mlx_moe.generate --model Qwen/Qwen3-30B-A3B --prompt "Hello" --expert-log log.csv
    python -m mlx_moe.generate --model Qwen/Qwen3-30B-A3B --prompt "Hello" --compile

compile=True (--compile) decodes with one mx.compile'd step over a
fixed-capacity KV cache (mlx_moe/compiled.py); models or options it does not
cover decode uncompiled, with a warning that says why.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Union

import mlx.core as mx

from .hooks import HOOKS

DEFAULT_PROMPT = "Explain in one sentence what a mixture-of-experts model is."


def encode_prompt(tokenizer, prompt: Union[str, List[int]], chat_template: Optional[bool] = None) -> List[int]:
    """Token ids for `prompt`, through the tokenizer's chat template when it has one
    (chat_template=None: use it if present; False: raw text)."""
    if not isinstance(prompt, str):
        return list(prompt)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template is None:
        chat_template = has_template
    if chat_template:
        if not has_template:
            raise ValueError("this tokenizer has no chat template; pass chat_template=False")
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(prompt))


@contextmanager
def routing_session(model, n_prompt: int, prompt_cache=None, expert_log=None, expert_log_weights: bool = False):
    """Set up the routing hook for one generation: prompt/decode phases, the
    expert log (a path: a new log; an `ExpertLog`: one more sequence in it),
    and cleanup whatever happens."""
    from .loader import _cache_offset

    log, own_log = None, False
    if expert_log is not None:
        from .expert_log import ExpertLog

        if isinstance(expert_log, ExpertLog):
            log = expert_log
        else:
            log, own_log = ExpertLog.for_model(expert_log, model, weights=expert_log_weights), True
    offset = _cache_offset(prompt_cache)
    handle = log.attach(new_sequence=offset == 0) if log else None
    HOOKS.prompt_end = offset + n_prompt
    finished = False
    try:
        yield log
        finished = True
    finally:
        HOOKS.prompt_end = None
        if log is not None:
            log.detach(handle)
            if own_log:
                log.close()
        if not HOOKS.active:
            HOOKS.discard()
    if finished and log is not None:
        log.raise_error()  # a write of the last rows failed: say so (the file keeps every complete row)


def expert_parallel_setup(model, sampler, expert_log):
    """Under expert parallelism (mlx_moe.distributed) every rank takes rank 0's
    token, only rank 0 writes the expert log, and steps run under the peer
    watchdog. Returns (sampler, expert_log, guard) for this rank."""
    ep = getattr(model, "expert_parallel", None)
    if ep is None:
        return sampler, expert_log, lambda steps: steps
    return ep.agree_sampler(sampler), (expert_log if ep.rank == 0 else None), ep.guard


def flushing(steps: Iterable) -> Iterator:
    """Deliver routing events as tokens come out of mlx-lm's step generator.

    When mlx-lm yields token n it has already queued the step for token n+1,
    so every forward pass but the newest is evaluated: `HOOKS.poll()` hands
    those over (mlx_moe/hooks.py).  If generation stops early (an
    exception, Ctrl-C, the consumer closing the generator) the evaluated
    forward passes are still delivered, so a log keeps every completed row."""
    try:
        for item in steps:
            HOOKS.poll()
            yield item
    except BaseException:
        HOOKS.flush(keep_last=1)
        raise
    HOOKS.flush()


# generate_step options the compiled path implements itself; any other option given
# a non-default value makes it fall back to mlx-lm's uncompiled generate_step.
_COMPILED_OPTIONS = ("sampler", "prefill_step_size", "prompt_progress_callback", "max_tokens")


def compile_fallback_reason(model, prompt_cache=None, options: Optional[dict] = None) -> Optional[str]:
    """Why compile=True cannot be honoured for this call (None: it can)."""
    from .compiled import StaticKVCache, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    if prompt_cache is not None and not all(isinstance(c, StaticKVCache) for c in prompt_cache):
        return ("the prompt_cache is not a list of mlx_moe.compiled.StaticKVCache "
                "(make one with mlx_moe.compiled.decoder_for(model).make_cache(capacity))")
    for key, value in (options or {}).items():
        if key not in _COMPILED_OPTIONS and value not in (None, False, [], ()):
            return f"option {key}={value!r} is not supported by the compiled decode step"
    return None


def _token_steps(model, prompt: List[int], compile: bool, prompt_cache, max_tokens: int, kwargs: dict):
    """(token, logprobs) pairs: mlx-lm's generate_step, or the compiled one when
    compile=True and the call allows it (else a warning says why not)."""
    from mlx_lm.generate import generate_step

    if compile:
        reason = compile_fallback_reason(model, prompt_cache, kwargs)
        if reason is None:
            from .compiled import compiled_generate_step

            return compiled_generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                          prompt_cache=prompt_cache, **kwargs)
        warnings.warn(f"compile=True: {reason}; decoding uncompiled", RuntimeWarning, stacklevel=3)
    if prompt_cache is None:
        from mlx_lm.models.cache import make_prompt_cache

        prompt_cache = make_prompt_cache(model)
    return generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=prompt_cache, **kwargs)


def _responses(steps, tokenizer, n_prompt: int, max_tokens: int) -> Iterator:
    """mlx-lm `GenerationResponse`s from (token, logprobs) pairs, with mlx-lm's
    stream_generate semantics: stop at EOS (not yielded) or after max_tokens; the
    last response carries finish_reason "stop" or "length"."""
    from mlx_lm.generate import GenerationResponse
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tic = time.perf_counter()
    prompt_tps = 0.0
    token = logprobs = None
    finish = "length"
    n = 0
    for n, (token, logprobs) in enumerate(steps):
        if n == 0:
            prompt_tps = n_prompt / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield GenerationResponse(
            text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=False,
            prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=None)
    if token is None:
        return
    detokenizer.finalize()
    yield GenerationResponse(
        text=detokenizer.last_segment, token=token, logprobs=logprobs, from_draft=False,
        prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n + 1,
        generation_tps=(n + 1) / (time.perf_counter() - tic),
        peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    chat_template: Optional[bool] = None,
    prompt_cache=None,
    expert_log=None,
    expert_log_weights: bool = False,
    compile: bool = False,
    **kwargs,
) -> Iterator:
    """Yield mlx-lm `GenerationResponse`s (text, token, prompt_tps, generation_tps, peak_memory...).

    expert_log: a CSV path (a new log) or an open `mlx_moe.expert_log.ExpertLog`
    (several calls into one file, one sequence_id each).
    compile: decode with the compiled step (mlx_moe/compiled.py) where the model
    and options allow it (else a RuntimeWarning says why, and it decodes uncompiled).
    Extra keyword arguments go to mlx-lm's `stream_generate` (e.g. prefill_step_size).
    """
    from mlx_lm.generate import stream_generate as mlx_stream_generate
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    tokens = encode_prompt(tokenizer, prompt, chat_template)
    from .compiled import greedy

    # temperature 0 is mlx-lm's argmax; as `greedy` the compiled step picks the token itself
    sampler = greedy if temp == 0 else make_sampler(temp=temp, top_p=top_p)
    sampler, expert_log, guard = expert_parallel_setup(model, sampler, expert_log)
    with routing_session(model, len(tokens), prompt_cache, expert_log, expert_log_weights):
        if compile:
            if max_tokens == 0:
                raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
            from mlx_lm.generate import generation_stream, wired_limit

            steps = _token_steps(model, tokens, True, prompt_cache, max_tokens, dict(kwargs, sampler=sampler))
            with wired_limit(model, [generation_stream]):
                yield from flushing(guard(_responses(steps, tokenizer, len(tokens), max_tokens)))
            return
        yield from flushing(guard(mlx_stream_generate(
            model, tokenizer, mx.array(tokens), max_tokens=max_tokens,
            sampler=sampler, prompt_cache=prompt_cache, **kwargs,
        )))


def generate_tokens(
    model,
    prompt: List[int],
    max_tokens: int = 256,
    prompt_cache=None,
    expert_log=None,
    expert_log_weights: bool = False,
    compile: bool = False,
    **kwargs,
) -> Iterator[int]:
    """Token ids only: no tokenizer, no stop on EOS (benchmarks, tests).
    compile: as in `stream_generate`.
    Keyword arguments go to mlx-lm's `generate_step` (sampler, prefill_step_size...)."""
    from .compiled import greedy

    sampler = kwargs.pop("sampler", None) or greedy
    sampler, expert_log, guard = expert_parallel_setup(model, sampler, expert_log)
    with routing_session(model, len(prompt), prompt_cache, expert_log, expert_log_weights):
        steps = _token_steps(model, prompt, compile, prompt_cache, max_tokens, dict(kwargs, sampler=sampler))
        for token, _ in flushing(guard(steps)):
            yield token


def generate(
    model,
    tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a completion of `prompt` and return its text.

    verbose=True streams the text to stdout and ends with mlx_lm.generate's
    closing lines (prompt and generation tok/s, peak memory)."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None:
            print("No text generated for this prompt")
        else:
            print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
            print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="mlx-moe generate", description="Generate text with a MoE model.")
    p.add_argument("--model", default=None,
                   help="model directory, .gguf file or Hugging Face repo id (default: the built-in demo model, random weights)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the prompt ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kernels", default="auto", choices=["auto", "mlx", "metal", "cuda"],
                   help="expert backend (auto: metal on Apple GPUs, cuda on NVIDIA, mlx on the CPU)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--expert-log", metavar="FILE.csv", default=None,
                   help="write every routing decision (token, layer, experts) to this CSV")
    p.add_argument("--expert-log-weights", action="store_true", help="add weight_0..weight_{k-1} columns to the log")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--compile", action="store_true",
                   help="decode with one compiled (mx.compile) step over a fixed-capacity KV cache "
                        "(qwen3_moe, qwen2_moe, mixtral, olmoe; others decode uncompiled with a warning)")
    ep = p.add_argument_group("expert parallelism (run under `mlx.launch -n N ...`)")
    ep.add_argument("--expert-parallel", action="store_true",
                    help="split every MoE layer's experts over the N ranks (mx.distributed); "
                         "attention and dense layers are replicated")
    ep.add_argument("--placement-log", metavar="FILE.csv", default=None,
                    help="an --expert-log of this model: spread the hot experts across ranks (default: by bytes)")
    ep.add_argument("--ep-backend", default="any", choices=["any", "ring", "jaccl", "nccl", "mpi"],
                    help="mx.distributed backend (default: what mlx.launch set up)")
    ep.add_argument("--ep-timeout", type=float, default=120.0,
                    help="seconds a rank waits on its peers (connecting, each step) before it stops with an error")
    return p


def main(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    args = build_parser(parser).parse_args(argv)
    from . import load
    from .demo import demo_model_path
    from .loader import ModelLoadError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    log = None
    if args.placement_log and not args.expert_parallel:
        print("error: --placement-log needs --expert-parallel", file=sys.stderr)
        return 2
    try:
        group = None
        if args.expert_parallel:
            from . import distributed

            group = distributed.init_group(args.ep_backend, args.ep_timeout)
            if group.size() == 1:
                print("[mlx-moe] --expert-parallel in a single process: start N ranks with "
                      "`mlx.launch -n N -- mlx-moe generate --expert-parallel ...`", file=sys.stderr)
        rank0 = group is None or group.rank() == 0
        if args.expert_log and rank0:
            from .expert_log import ExpertLog

            ExpertLog.check_writable(args.expert_log)  # fail before loading a large model
        if args.model is None:
            print("[mlx-moe] no --model given: using the built-in demo model (random weights, "
                  "meaningless text). Try --model Qwen/Qwen3-30B-A3B for a real one.", file=sys.stderr)
            path = str(demo_model_path())
        else:
            path = args.model
        if group is not None:
            model, tokenizer = distributed.load(path, group=group, placement_log=args.placement_log,
                                                kernels=args.kernels, timeout=args.ep_timeout)
            if rank0:
                print(f"[mlx-moe] {model.expert_parallel.describe()}", file=sys.stderr)
        else:
            model, tokenizer = load(path, kernels=args.kernels)
        if args.expert_log and rank0:  # one log, written by rank 0 (every rank routes every token)
            log = ExpertLog.for_model(args.expert_log, model, weights=args.expert_log_weights, model_name=path)
        generate(model, tokenizer, prompt, max_tokens=args.max_tokens, verbose=rank0, temp=args.temp,
                 top_p=args.top_p, seed=args.seed, chat_template=not args.no_chat_template and None,
                 expert_log=log, prefill_step_size=args.prefill_step_size, compile=args.compile)
        if log is not None:
            log.close()
            log.raise_error()  # the last rows' write failed (the file keeps every complete row)
    except (ModelLoadError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[mlx-moe] interrupted", file=sys.stderr)
        return 130
    finally:
        if log is not None:
            log.close()
            print(f"[mlx-moe] expert log: {log.rows_written} rows in {log.path}", file=sys.stderr)
    return 0
