"""The routing hook's record chain (mlx_moe/hooks.py, metal/routing_join.metal's
routing_join_record): where reading device arrays is costly (MLX's CUDA backend),
each forward's records are appended by one kernel to a small array spanning
several forwards, which the host reads once per `forwards_per_read` tokens.

Checked here on the CPU: the kernel under the Metal emulation (the kernel itself:
kernel_cases' routing_join_record case, also run on CUDA), and, for the compiled
step (the emulation cannot run inside mx.compile), its MLX-op stand-in.  The
oracle is the same generation logged from the per-layer arrays."""

import csv
import re

import mlx.core as mx
import pytest

import mlx_moe
from mlx_moe.expert_log import ExpertLog
from mlx_moe.hooks import HOOKS, RoutingHooks
from tiny import write_tiny_qwen3

PROMPT = [5, 6, 7, 8, 9]


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    return mlx_moe.load(str(write_tiny_qwen3(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture
def hooks_config():
    """Restores HOOKS' settings after a test."""
    saved = (HOOKS.join_flavor, HOOKS.forwards_per_read)
    yield
    HOOKS.join_flavor, HOOKS.forwards_per_read = saved
    if "MAX_RECORD_WORDS" in vars(HOOKS):
        del HOOKS.MAX_RECORD_WORDS
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


def test_chain_logs_as_the_per_layer_arrays_with_one_read_per_chain(model_tok, tmp_path, hooks_config, reads):
    """The emulated kernel extends the chain; two generate calls into one log (chains
    spanning sequences, a full chain followed by a new one); the host reads one chain per
    delivery, never a per-layer array, and the log equals the per-layer one."""
    model, tok = model_tok
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


def test_chain_is_evaluated_with_the_forward(model_tok, tmp_path, hooks_config):
    """The forward's output depends on the extended chain (else the join would run only
    when the host reads it, queued behind the next step).  MLX ops stand in for the
    kernel: the emulation runs eagerly, outside the graph."""
    from collections import Counter

    model, _ = model_tok
    HOOKS.join_flavor = "mlx"

    def nodes(out):
        dot = tmp_path / "graph.dot"
        mx.export_to_dot(str(dot), out)
        return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', dot.read_text()))

    x = mx.array([[1, 2, 3]])
    plain = nodes(model(x))
    seen = []
    with mlx_moe.routing_hook(seen.append):
        y = model(x)
        f = HOOKS._pending[-1]
        assert f.chain is not None and f.joined is f.chain.array  # the forward is in the chain
        hooked = nodes(y)
        assert not plain - hooked and hooked["Depends"] == 1 and hooked["Select"] > plain["Select"]
        mx.eval(y)
        mlx_moe.flush()
    assert [ev.layer for ev in seen] == [0, 1] and seen[0].expert_ids.shape == (3, 2)


@pytest.mark.parametrize("compile", [False, True])
def test_chain_under_compile_and_across_chain_sizes(model_tok, tmp_path, hooks_config, compile):
    """The compiled step takes and returns the chain; a prompt too large for a chain is
    joined on its own (MAX_RECORD_WORDS), decode forwards are chained: same log."""
    model, tok = model_tok
    want = per_layer_log(model, tok, tmp_path / "per_layer.csv", max_tokens=10, compile=compile)
    HOOKS.join_flavor = "mlx"  # the kernel's MLX-op stand-in (runs inside mx.compile)
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


def test_exception_mid_generation_keeps_the_rows_of_every_chained_forward(model_tok, tmp_path, hooks_config):
    """Delivery every few forwards loses nothing when generation fails: the log holds the
    same rows as the per-layer log of the same failing generation."""
    model, tok = model_tok

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


def test_a_chain_not_extended_is_an_error_not_wrong_rows(model_tok, hooks_config, monkeypatch):
    import mlx_moe.kernels.routing_join as rj

    model, tok = model_tok
    monkeypatch.setattr(rj, "_extend_with_mlx_ops", lambda record, ids, weights: record + 0)  # a broken join
    HOOKS.join_flavor = "mlx"
    with pytest.raises(RuntimeError, match="did not extend it"):
        with mlx_moe.routing_hook(lambda ev: None):
            mlx_moe.generate(model, tok, PROMPT, max_tokens=2)
    assert not HOOKS.active and not HOOKS._pending  # the hook is gone all the same


def test_record_chain_shape_is_checked():
    from mlx_moe.kernels.routing_join import routing_join

    a = [mx.zeros((3, 2), mx.int32)] * 2
    w = [mx.zeros((3, 2), mx.float32)] * 2
    with pytest.raises(ValueError, match=r"uint32 \[2 \* slots \* 6 \+ 1\]"):
        routing_join(a, w, "emulated", record=mx.zeros((10,), mx.uint32))
    with pytest.raises(ValueError, match="uint32"):
        routing_join(a, w, "emulated", record=mx.zeros((13,), mx.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                    reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_chain_logs_as_per_layer_arrays(model_tok, tmp_path, hooks_config, compile):
    """On CUDA (where the chain is the default) with the cuda kernels, uncompiled and
    compiled: the same rows as from the per-layer arrays."""
    from mlx_moe.backends.kernels import KernelBackend
    from mlx_moe.moe import moe_layers, set_expert_backend

    model, tok = model_tok
    saved = moe_layers(model)[0].backend
    set_expert_backend(model, KernelBackend("cuda"))
    try:
        want = per_layer_log(model, tok, tmp_path / "per_layer.csv", max_tokens=12, compile=compile)
        HOOKS.join_flavor = "auto"
        kinds = []
        with mlx_moe.routing_hook(lambda evs: kinds.append(evs.arrays._host is not None), per_forward=True):
            path = tmp_path / "chain.csv"
            mlx_moe.generate(model, tok, PROMPT, max_tokens=12, expert_log=path, expert_log_weights=True,
                             compile=compile)
        assert read_log(path) == want and kinds and all(kinds)
    finally:
        set_expert_backend(model, saved)
