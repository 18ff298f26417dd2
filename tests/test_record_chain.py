"""The routing hook's record chain (mlx_moe/hooks.py, metal/router.metal option
RECORD): where reading device arrays is costly (MLX's CUDA backend), each MoE
layer's router kernel carries the forward's records forward in one small array,
which the host reads once per `forwards_per_read` tokens.

Checked here on the CPU: the router kernel under the Metal emulation (the kernel
itself: kernel_cases' moe_router_topk_record case, also run on CUDA), and, for the
compiled step (the emulation cannot run inside mx.compile), a stand-in backend that
extends the chain with MLX ops.  The oracle is the same generation logged from the
per-layer arrays."""

import csv

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe
from mlx_moe.backends.kernels import KernelBackend
from mlx_moe.backends.mlx import MLXBackend
from mlx_moe.expert_log import ExpertLog
from mlx_moe.hooks import HOOKS, RoutingHooks
from mlx_moe.moe import moe_layers, set_expert_backend
from tiny import write_tiny_qwen3

PROMPT = [5, 6, 7, 8, 9]


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def extend_with_mlx_ops(record: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """The RECORD rule with MLX ops: (ids, weights) into the slot the last word counts,
    the count + 1, everything else kept; a full chain only counts."""
    words = record.shape[0]
    n = ids.size
    slots = (words - 1) // (2 * n)
    slot = record[-1].astype(mx.int32)
    pos = mx.arange(words, dtype=mx.int32)
    room = slot < slots
    lo_i, lo_w = slot * n, (slots + slot) * n
    in_i = room & (pos >= lo_i) & (pos < lo_i + n)
    in_w = room & (pos >= lo_w) & (pos < lo_w + n)
    gi = mx.take(ids.reshape(-1).astype(mx.int32).view(mx.uint32), mx.clip(pos - lo_i, 0, n - 1))
    gw = mx.take(weights.reshape(-1).astype(mx.float32).view(mx.uint32), mx.clip(pos - lo_w, 0, n - 1))
    out = mx.where(in_i, gi, mx.where(in_w, gw, record))
    return mx.where(pos == words - 1, (slot + 1).astype(mx.uint32), out)


class MLXOpsChainBackend(MLXBackend):
    """The `mlx` backend extending the record chain with MLX ops (runs inside mx.compile)."""

    def route_recorded(self, logits, params, record):
        ids, weights = self.route(logits, params)
        return ids, weights, extend_with_mlx_ops(record, ids, weights)


class StuckChainBackend(MLXBackend):
    """A broken router: hands the chain back without extending it."""

    def route_recorded(self, logits, params, record):
        ids, weights = self.route(logits, params)
        return ids, weights, record + 0


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    return mlx_moe.load(str(write_tiny_qwen3(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture
def hooks_config(model_tok):
    """Restores HOOKS' settings and the model's expert backend after a test."""
    model, _ = model_tok
    saved = (HOOKS.join_flavor, HOOKS.forwards_per_read, HOOKS.MAX_RECORD_WORDS, HOOKS.chain_by,
             moe_layers(model)[0].backend)
    yield
    HOOKS.join_flavor, HOOKS.forwards_per_read, HOOKS.MAX_RECORD_WORDS, HOOKS.chain_by, backend = saved
    if "MAX_RECORD_WORDS" in vars(HOOKS):
        del HOOKS.MAX_RECORD_WORDS
    set_expert_backend(model, backend)
    HOOKS.discard()


@pytest.fixture
def reads(monkeypatch):
    """Counts the host reads of record chains."""
    counted = []
    original = RoutingHooks._read_chains

    def counting(done):
        words = original(done)
        counted.append(len(words))
        return words

    monkeypatch.setattr(RoutingHooks, "_read_chains", staticmethod(counting))
    return counted


def per_layer_log(model, tok, path, **kw):
    HOOKS.join_flavor = None
    mlx_moe.generate(model, tok, PROMPT, expert_log=path, expert_log_weights=True, **kw)
    return read_log(path)


@pytest.mark.parametrize("chain_by", ["router", "join"])
def test_kernels_log_through_the_chain_as_from_per_layer_arrays(model_tok, tmp_path, hooks_config, reads,
                                                                chain_by):
    """Emulated router (or join) kernels extend the chain; two generate calls into one log
    (chains spanning sequences, a full chain followed by a new one); the host reads one
    chain per delivery, never a per-layer array, and the log equals the per-layer one."""
    model, tok = model_tok
    HOOKS.chain_by = chain_by
    set_expert_backend(model, KernelBackend("emulated"))
    want = tmp_path / "per_layer.csv"
    HOOKS.join_flavor = None
    with ExpertLog.for_model(want, model, weights=True) as log:
        for n in (9, 4):
            mlx_moe.generate(model, tok, PROMPT, max_tokens=n, expert_log=log)
    HOOKS.join_flavor = "emulated"
    HOOKS.forwards_per_read = 3
    got = tmp_path / "chain.csv"
    delivered = []
    with mlx_moe.routing_hook(lambda evs: delivered.append(evs.arrays._host is not None), per_forward=True):
        with ExpertLog.for_model(got, model, weights=True) as log:
            for n in (9, 4):
                mlx_moe.generate(model, tok, PROMPT, max_tokens=n, expert_log=log)
    assert read_log(got) == read_log(want) and len(read_log(got)) > 1
    assert delivered and all(delivered)  # every forward's records came out of a chain
    # 2 prompts + 11 decode forwards: at most 3 forwards per chain, so >= 5 reads, and one
    # read per delivery (a delivery spans at most two chains), not one per forward
    assert sum(reads) <= len(reads) * 2 and 5 <= sum(reads) < len(delivered)


def test_chain_adds_no_launch_to_the_forward(model_tok, tmp_path, hooks_config):
    """The chain rides on the router launches: the forward's graph has the same nodes as
    without a hook (no join kernel, no copy), and the chain is computed with it."""
    import re

    model, _ = model_tok
    set_expert_backend(model, KernelBackend("emulated"))
    HOOKS.join_flavor = "emulated"

    def nodes(out):
        dot = tmp_path / "graph.dot"
        mx.export_to_dot(str(dot), out)
        return sorted(re.findall(r'label ="([^"]+)", shape=rectangle', dot.read_text()))

    x = mx.array([[1, 2, 3]])
    plain = nodes(model(x))
    seen = []
    with mlx_moe.routing_hook(seen.append):
        y = model(x)
        f = HOOKS._pending[-1]
        assert f.chain is not None and f.joined is f.chain.array  # the forward is in the chain
        assert nodes(y) == plain
        mx.eval(y)
        mlx_moe.flush()
    assert [ev.layer for ev in seen] == [0, 1] and seen[0].expert_ids.shape == (3, 2)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("chain_by", ["router", "join"])
def test_chain_under_compile_and_across_chain_sizes(model_tok, tmp_path, hooks_config, compile, chain_by):
    """The compiled step takes and returns the chain; a prompt too large for a chain is
    joined instead (MAX_RECORD_WORDS), decode forwards are chained: same log."""
    model, tok = model_tok
    HOOKS.chain_by = chain_by
    set_expert_backend(model, MLXOpsChainBackend())
    want = per_layer_log(model, tok, tmp_path / "per_layer.csv", max_tokens=10, compile=compile)
    HOOKS.join_flavor = "mlx"
    HOOKS.MAX_RECORD_WORDS = 2 * 2 * 2 * 3 + 1  # 2 layers of top-2: 3 one-token forwards, not the prompt
    kinds = []
    with mlx_moe.routing_hook(lambda evs: kinds.append(
            "chain" if evs.arrays._host is not None else "joined" if evs.arrays._packed is not None else "layers"),
            per_forward=True):
        path = tmp_path / "chain.csv"
        mlx_moe.generate(model, tok, PROMPT, max_tokens=10, expert_log=path, expert_log_weights=True,
                         compile=compile)
    assert read_log(path) == want
    assert kinds[0] == "joined" and set(kinds[1:]) == {"chain"} and len(kinds) >= 10


@pytest.mark.parametrize("chain_by", ["router", "join"])
def test_exception_mid_generation_keeps_the_rows_of_every_chained_forward(model_tok, tmp_path, hooks_config,
                                                                          chain_by):
    """Delivery every few forwards loses nothing when generation fails: the log holds the
    same rows as the per-layer log of the same failing generation."""
    model, tok = model_tok
    HOOKS.chain_by = chain_by
    set_expert_backend(model, KernelBackend("emulated"))

    def failing(after):
        calls = {"n": 0}

        def processor(tokens, logits):
            calls["n"] += 1
            if calls["n"] == after:
                raise RuntimeError("injected failure")
            return logits
        return processor

    logs = []
    for flavor in (None, "emulated"):
        HOOKS.join_flavor = flavor
        HOOKS.forwards_per_read = 8
        path = tmp_path / f"{flavor}.csv"
        with pytest.raises(RuntimeError, match="injected failure"):
            mlx_moe.generate(model, tok, PROMPT, max_tokens=20, expert_log=path, expert_log_weights=True,
                             logits_processors=[failing(7)])
        assert path.read_text().endswith("\n")
        logs.append(read_log(path))
    assert logs[1] == logs[0] and len(logs[0]) > 1 + 2 * len(PROMPT)


def test_a_chain_not_extended_is_an_error_not_wrong_rows(model_tok, hooks_config):
    model, tok = model_tok
    set_expert_backend(model, StuckChainBackend())
    HOOKS.join_flavor = "mlx"
    with pytest.raises(RuntimeError, match="did not extend it"):
        with mlx_moe.routing_hook(lambda ev: None):
            mlx_moe.generate(model, tok, PROMPT, max_tokens=2)


def test_record_chain_shape_is_checked():
    from mlx_moe.kernels.router import fused_topk
    from mlx_moe.router import RouterParams

    lg = mx.zeros((3, 16))
    with pytest.raises(ValueError, match=r"uint32 \[2 \* slots \* 6 \+ 1\]"):
        fused_topk(lg, RouterParams(2), "emulated", record=mx.zeros((10,), mx.uint32))
    with pytest.raises(ValueError, match="uint32"):
        fused_topk(lg, RouterParams(2), "emulated", record=mx.zeros((13,), mx.int32))
    np.testing.assert_array_equal(np.array(fused_topk(lg, RouterParams(2), "emulated",
                                                      record=mx.zeros((13,), mx.uint32))[2])[-1], 1)


@pytest.mark.gpu
@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                    reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("chain_by", ["router", "join"])
def test_cuda_chain_logs_as_per_layer_arrays(model_tok, tmp_path, hooks_config, compile, chain_by):
    """On CUDA (where the chain is the default): the chain extended by the cuda router or
    join kernels, uncompiled and compiled, logs the same rows as the per-layer arrays."""
    model, tok = model_tok
    HOOKS.chain_by = chain_by
    set_expert_backend(model, KernelBackend("cuda"))
    want = per_layer_log(model, tok, tmp_path / "per_layer.csv", max_tokens=12, compile=compile)
    HOOKS.join_flavor = "auto"
    kinds = []
    with mlx_moe.routing_hook(lambda evs: kinds.append(evs.arrays._host is not None), per_forward=True):
        path = tmp_path / "chain.csv"
        mlx_moe.generate(model, tok, PROMPT, max_tokens=12, expert_log=path, expert_log_weights=True,
                         compile=compile)
    assert read_log(path) == want and kinds and all(kinds)
