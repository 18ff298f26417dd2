"""The routing hook and --expert-log: content against transformers' routers,
positions and sequences, and a valid CSV after Ctrl-C, exceptions and a full disk."""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe
from mlx_moe.expert_log import ExpertLog
from tiny import write_tiny_qwen3

FAMILY_VARIANTS = ["qwen3_moe_mixed", "qwen2_moe_shared", "qwen2_moe_noshared", "mixtral", "olmoe",
                   "deepseek_v2_group", "longcat_flash"]


def read_log(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return mlx_moe.load(str(tiny))


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_logged_experts_equal_transformers_routing(reference_checkpoints, tmp_path, name):
    """Same prompt, same greedy tokens: the CSV's expert sets and weights per
    (token, layer) equal what transformers' router chose."""
    ref = reference_checkpoints.reference(name)
    model, tok = mlx_moe.load(str(ref.path))
    log = tmp_path / "log.csv"
    n_gen = len(ref.generated)
    out = [r.token for r in mlx_moe.stream_generate(model, tok, ref.prompt, max_tokens=n_gen,
                                                      expert_log=log, expert_log_weights=True)]
    assert out == ref.generated[: len(out)]
    cols, rows = read_log(log)
    k = sum(c.startswith("expert_") for c in cols)
    moe_layers = [l.layer_idx for l in mlx_moe.moe_layers(model)]
    fed = len(ref.prompt) + len(out)  # every generated token is fed back once
    assert len(rows) == fed * len(moe_layers)

    by_key = {(int(r[0]), int(r[1])): r for r in rows}
    for j, layer in enumerate(moe_layers):
        rec = ref.routing[j]
        for t in range(len(ref.tokens)):
            r = by_key[(t, layer)]
            ids = np.array(r[2:2 + k], dtype=np.int64)
            w = np.array(r[2 + k:2 + 2 * k], dtype=np.float64)
            assert sorted(ids) == sorted(rec.indices[t].tolist()), (layer, t)
            assert np.all(np.diff(w) <= 0), "ordered by descending weight"
            expect = dict(zip(rec.indices[t].tolist(), rec.weights[t].tolist()))
            # The reference scales router weights up (to keep top-k choices well
            # apart), which turns fp32 rounding of the hidden states (~1e-6) into
            # router-logit differences of ~1e-4; weights are exp(logit), so 1e-3
            # relative is the honest bound (the 6-digit CSV adds 5e-6).
            np.testing.assert_allclose(w, [expect[i] for i in ids], rtol=1e-3, atol=1e-6)
            assert r[-2] == ("prefill" if t < len(ref.prompt) else "decode")
            assert r[-1] == "0"
    meta = json.loads(Path(str(log) + ".json").read_text())
    assert meta["moe_layers"] == moe_layers and meta["top_k"] == k
    # what end_forward relies on instead of asking 2L arrays their shapes: every layer's
    # routing is [tokens, top_k], top_k as the layer says it
    from mlx_moe.hooks import HOOKS

    with mlx_moe.routing_hook(lambda ev: None):
        mx.eval(model(mx.array([ref.prompt])))
        f = HOOKS._pending[-1]
        assert f.top_k == k and len(f.records) == len(moe_layers)
        assert all(r[1].shape == r[2].shape == (len(ref.prompt), k) for r in f.records)


def test_events_are_delivered_after_the_forward_not_inside(tiny_model):
    model, _ = tiny_model
    seen = []
    with mlx_moe.routing_hook(seen.append):
        y = model(mx.array([[1, 2, 3, 4]]))
        assert seen == []  # recorded lazily, nothing delivered inside the forward
        mx.eval(y)
        mlx_moe.flush()
        assert [ev.layer for ev in seen] == [0, 1]
        ev = seen[0]
        assert ev.expert_ids.shape == (4, 2) and ev.expert_ids.dtype == np.int32
        assert ev.positions.tolist() == [0, 1, 2, 3] and ev.phase == "prefill"
        assert np.all(ev.weights[:, 0] >= ev.weights[:, 1])
        assert ev.is_zero is None


def _graph_nodes(tmp_path, out) -> list:
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), out)
    return sorted(re.findall(r'label ="([^"]+)", shape=rectangle', dot.read_text()))


def test_the_hook_adds_nothing_to_the_forward_graph(tiny_model, tmp_path):
    """The records are arrays the step computes anyway: with a hook registered the
    forward's graph is the same graph (no join, no copy, no extra launch), and the
    recorded arrays are evaluated with it."""
    model, _ = tiny_model
    x = mx.array([[1, 2, 3]])
    plain = _graph_nodes(tmp_path, model(x))
    seen = []
    with mlx_moe.routing_hook(seen.append):
        y = model(x)
        hooked = _graph_nodes(tmp_path, y)
        mx.eval(y)
        mlx_moe.flush()
    assert hooked == plain
    assert [ev.layer for ev in seen] == [0, 1] and seen[0].expert_ids.shape == (3, 2)


def test_events_are_read_on_another_thread(tiny_model):
    """The expert log converts events on its writer thread; delivery evaluates them
    first on the generating thread, so that thread never evaluates a graph."""
    import threading

    model, tok = tiny_model
    got = []

    def on_forward(events):
        t = threading.Thread(target=lambda: got.append(events[0].expert_ids.copy()))
        t.start()
        t.join()

    with mlx_moe.routing_hook(on_forward, per_forward=True):
        mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=5)
    assert len(got) >= 5 and all(g.dtype == np.int32 for g in got)


def test_sequences_and_positions_in_one_log(tiny_model, tmp_path):
    """Two generate calls and a continued chat turn into one log."""
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = tiny_model
    path = tmp_path / "log.csv"
    with ExpertLog.for_model(path, model) as log:
        mlx_moe.generate(model, tok, [10, 11, 12], max_tokens=3, expert_log=log)
        cache = make_prompt_cache(model)
        mlx_moe.generate(model, tok, [20, 21], max_tokens=2, expert_log=log, prompt_cache=cache)
        mlx_moe.generate(model, tok, [22, 23, 24], max_tokens=2, expert_log=log, prompt_cache=cache)
    _, rows = read_log(path)
    seqs = {}
    for r in rows:
        seqs.setdefault(int(r[-1]), []).append((int(r[0]), int(r[1]), r[-2]))
    assert sorted(seqs) == [0, 1]
    assert sorted({p for p, _, _ in seqs[0]}) == list(range(6))  # 3 prompt + 3 generated
    # sequence 1: 2 + 2 tokens, then the second turn continues at position 4 (cache offset)
    assert sorted({p for p, _, _ in seqs[1]}) == list(range(4 + 3 + 2))
    phases = {p: ph for p, _, ph in seqs[1]}
    assert [phases[p] for p in range(9)] == ["prefill"] * 2 + ["decode"] * 2 + ["prefill"] * 3 + ["decode"] * 2
    for s in seqs.values():
        assert len(s) == 2 * len({p for p, _, _ in s})  # every token has both MoE layers


def test_exception_mid_generation_keeps_exactly_the_completed_rows(tiny_model, tmp_path):
    model, tok = tiny_model
    full = tmp_path / "full.csv"
    mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=12, expert_log=full)
    _, full_rows = read_log(full)

    calls = {"n": 0}

    def failing_processor(tokens, logits):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected failure")
        return logits

    part = tmp_path / "part.csv"
    with pytest.raises(RuntimeError, match="injected failure"):
        mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=12, expert_log=part,
                         logits_processors=[failing_processor])
    text = part.read_text()
    assert text.endswith("\n")
    _, rows = read_log(part)
    assert 0 < len(rows) < len(full_rows)
    assert len(rows) % 2 == 0  # whole tokens: both MoE layers
    assert rows == full_rows[: len(rows)]  # exactly a prefix of the uninterrupted log
    assert len(rows) >= 4 * 2  # at least the prompt


CLI_SCRIPT = """
import sys, resource, signal
limit = int(sys.argv[1])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mlx_moe.generation import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(tmp_path, args, limit=0, **kw):
    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(limit), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_full_disk_leaves_complete_rows_and_a_clear_message(tiny, tmp_path):
    full = tmp_path / "full.csv"
    p = run_cli(tmp_path, ["--model", str(tiny), "--prompt", "abcdef", "--max-tokens", "40",
                           "--no-chat-template", "--expert-log", str(full)])
    p.communicate(timeout=120)
    assert p.returncode == 0
    _, full_rows = read_log(full)

    log = tmp_path / "log.csv"
    limit = 1500  # bytes: the header and some rows fit, the rest does not
    p = run_cli(tmp_path, ["--model", str(tiny), "--prompt", "abcdef", "--max-tokens", "40",
                           "--no-chat-template", "--expert-log", str(log)], limit=limit)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "expert log" in err and "writing failed" in err and "complete rows" in err
    text = log.read_text()
    assert text.endswith("\n") and len(text.encode()) <= limit
    _, rows = read_log(log)
    assert 0 < len(rows) < len(full_rows)
    assert rows == full_rows[: len(rows)]


def test_ctrl_c_leaves_complete_rows(tiny, tmp_path):
    full = tmp_path / "full.csv"
    args = ["--model", str(tiny), "--prompt", "abcdef", "--no-chat-template"]
    p = run_cli(tmp_path, args + ["--max-tokens", "300", "--expert-log", str(full)])
    p.communicate(timeout=300)
    _, full_rows = read_log(full)

    log = tmp_path / "log.csv"
    p = run_cli(tmp_path, args + ["--max-tokens", "100000", "--expert-log", str(log)])
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.stat().st_size < 4000):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    text = log.read_text()
    assert text.endswith("\n")
    _, rows = read_log(log)
    assert len(rows) % 2 == 0 and len(rows) > 0
    n = min(len(rows), len(full_rows))
    assert rows[:n] == full_rows[:n]


def test_unwritable_log_fails_before_loading_the_model(tmp_path):
    p = run_cli(tmp_path, ["--model", str(tmp_path / "no-such-model"),
                           "--expert-log", str(tmp_path / "missing-dir" / "log.csv")])
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "cannot write expert log" in err and "does not exist" in err
    assert "no-such-model" not in err  # the model was never looked at


def test_host_conversion_of_per_layer_arrays():
    """The joined-buffer fast path gives numpy's own conversion, and anything it cannot
    take (a strided view, another dtype) goes the slow way with the same result."""
    from mlx_moe.hooks import _to_bytes

    def _to_numpy(arrays, mx_dtype, np_dtype):
        return np.frombuffer(_to_bytes(arrays, mx_dtype, np_dtype), np_dtype).reshape(-1, arrays[0].shape[-1])

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 300, (3, 4)).astype(np.int32) for _ in range(5)]
    want = np.concatenate(parts)
    np.testing.assert_array_equal(_to_numpy([mx.array(p) for p in parts], mx.int32, np.int32), want)
    wide = [mx.array(np.repeat(p, 2, axis=1))[:, ::2] for p in parts]  # strided views of the same values
    np.testing.assert_array_equal(_to_numpy(wide, mx.int32, np.int32), want)
    as64 = [mx.array(p.astype(np.int64)) for p in parts]  # bytes must not be reinterpreted
    got = _to_numpy(as64, mx.int32, np.int32)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def _frames(rng, n, L=3, k=4):
    """n random forward passes (1 token each but the first, a 5-token prefill)."""
    from mlx_moe.log_writer import pack_frame

    out, pos = [], 0
    for i in range(n):
        T = 5 if i == 0 else 1
        ids = rng.integers(0, 64, (L, T, k)).astype(np.int32)
        w = rng.choice([0.1, 0.2, 0.3, 0.4], (L, T, k)).astype(np.float32)  # ties on purpose
        positions = np.arange(pos, pos + T)
        pos += T
        frame = b"".join(pack_frame(positions, [1, 4, 7], ids.tobytes(), w.tobytes(), k,
                                    "prefill" if i == 0 else "decode", 3))
        out.append((frame, positions, ids, w))
    return out


def _expected_rows(frames, L=3, k=4):
    """Independently: per token, per layer, ids by descending weight (ties in slot order)."""
    rows = []
    for _, positions, ids, w in frames:
        for t, p in enumerate(positions):
            for l, layer in enumerate([1, 4, 7]):
                order = sorted(range(k), key=lambda j: (-float(w[l, t, j]), j))
                rows.append([str(p), str(layer)] + [str(ids[l, t, j]) for j in order]
                            + ["prefill" if len(positions) > 1 else "decode", "3"])
    return rows


def test_writer_process_drops_a_frame_cut_short_and_ignores_ctrl_c(tmp_path):
    """What the writer sees when the generating process dies mid-frame: every whole
    frame becomes rows, the torn one none; a Ctrl-C meant for the generating
    process does not stop it."""
    log = ExpertLog(tmp_path / "log.csv", top_k=4)
    frames = _frames(np.random.default_rng(0), 6)
    for frame, *_ in frames[:3]:
        log._send(frame)
    deadline = time.time() + 60  # rows on disk: it is past its start-up (a terminal's Ctrl-C
    while time.time() < deadline and len(read_log(tmp_path / "log.csv")[1]) < 15:  # never reaches
        time.sleep(0.01)  # it, being in its own session; this one is sent to it directly)
    log._proc.send_signal(signal.SIGINT)
    for frame, *_ in frames[3:5]:
        log._send(frame)
    log._send(frames[5][0][: len(frames[5][0]) // 2])
    log.close()
    log.raise_error()
    header, rows = read_log(tmp_path / "log.csv")
    assert header == ["token_id", "layer_id", "expert_0", "expert_1", "expert_2", "expert_3", "phase",
                      "sequence_id"]
    assert rows == _expected_rows(frames[:5])
    assert log.rows_written == len(rows) == (5 + 4) * 3


def test_ctrl_c_in_a_callback_leaves_the_other_forwards_for_the_next_flush(tiny_model):
    """Delivery of several forward passes at once (record chains deliver up to 8) stopped
    by Ctrl-C in a callback: the forwards not yet handed over stay pending, none is lost
    or delivered twice."""
    model, _ = tiny_model
    seen = []

    def on_forward(events):
        seen.append(events[0].forward_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with mlx_moe.routing_hook(on_forward, per_forward=True):
        for i in range(4):
            mx.eval(model(mx.array([[i + 1]])))  # four forwards pending (no cache: position 0 each)
        with pytest.raises(KeyboardInterrupt):
            mlx_moe.flush()
        assert len(seen) == 2
        mlx_moe.flush()
    assert len(seen) == len(set(seen)) == 4


def test_ctrl_c_just_after_a_write_sends_the_frame_once(tmp_path, monkeypatch):
    """A SIGINT that lands after os.write has written (part of) a frame, before its count
    is taken: the frame still goes out whole and exactly once, then KeyboardInterrupt."""
    import os

    import mlx_moe.expert_log as expert_log

    before = signal.getsignal(signal.SIGINT)
    log = ExpertLog(tmp_path / "log.csv", top_k=4)
    frames = _frames(np.random.default_rng(2), 3)
    log._send(frames[0][0])
    real_write = os.write
    calls = []

    def write_then_signal(fd, data):
        n = real_write(fd, data[: max(1, len(data) // 2)])  # a partial write, then the signal
        calls.append(n)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return n

    monkeypatch.setattr(expert_log.os, "write", write_then_signal)
    with pytest.raises(KeyboardInterrupt):
        log._send(frames[1][0])
    monkeypatch.setattr(expert_log.os, "write", real_write)
    assert len(calls) > 1 and sum(calls) == len(frames[1][0])
    log._send(frames[2][0])
    log.close()
    log.raise_error()
    assert signal.getsignal(signal.SIGINT) == before  # the log's handler is gone with it
    _, rows = read_log(tmp_path / "log.csv")
    assert rows == _expected_rows(frames)


def test_writer_process_failure_is_reported_in_the_generating_thread(tmp_path):
    log = ExpertLog(tmp_path / "log.csv", top_k=4)
    frames = _frames(np.random.default_rng(1), 2)
    log._send(frames[0][0])
    log._send(b"XXXX" + frames[1][0][4:])  # not a frame: the stream is out of step
    log._proc.wait(timeout=60)
    with pytest.raises(mlx_moe.expert_log.ExpertLogError, match="out of step.*15 complete rows"):
        log.raise_error()
    log.close()
    _, rows = read_log(tmp_path / "log.csv")
    assert rows == _expected_rows(frames[:1])


@pytest.fixture
def joined_on_device():
    """The CUDA backend's device-side join of the records (hooks.end_forward),
    its kernel run by the Metal emulation on the CPU."""
    from mlx_moe.hooks import HOOKS

    saved = HOOKS.join_flavor
    HOOKS.join_flavor = "emulated"
    try:
        yield
    finally:
        HOOKS.join_flavor = saved


def test_compiled_step_evaluates_the_join_with_its_output(tiny_model, tmp_path, joined_on_device):
    """In the compiled step nothing reads the joined records, so the step's output must
    depend on them: otherwise the join would run only when the host reads it, queued
    behind the next step (the host would wait a step per token).  The uncompiled
    forward makes the same edge in hooks.end_forward."""
    from mlx_moe.compiled import decoder_for
    from mlx_moe.hooks import HOOKS

    model, _ = tiny_model
    decoder = decoder_for(model)
    cache = decoder.make_cache(16)
    model(mx.array([[5, 6, 7]]), cache=cache)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    HOOKS.join_flavor = "mlx"  # MLX ops stand in for the kernel inside mx.compile
    with mlx_moe.routing_hook(lambda evs: None, per_forward=True):
        out = decoder.step(mx.array([8]), cache)
        joined = HOOKS._pending[-1].joined
        assert joined is not None
        nodes = _graph_nodes(tmp_path, out)
        mlx_moe.flush()
    assert "Depends" in nodes and "Concatenate" in nodes, nodes  # the join (MLX ops) is in the output's graph


def test_device_side_join_logs_the_same_from_one_array(tiny_model, tmp_path, joined_on_device):
    """Where the host reads device arrays one costly copy at a time (CUDA), a forward's
    records are joined by one kernel evaluated with the step: the host reads one
    packed array per forward pass, and the log is the same as from the
    per-layer arrays, uncompiled and compiled (the compiled step's wiring; the kernel
    itself: kernel_cases' routing_join case, on the emulation and on CUDA)."""
    from mlx_moe.hooks import HOOKS

    model, tok = tiny_model
    HOOKS.join_flavor = None
    per_layer = tmp_path / "per_layer.csv"
    mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=6, expert_log=per_layer, expert_log_weights=True)
    HOOKS.join_flavor = "emulated"
    host_arrays = []
    with mlx_moe.routing_hook(lambda evs: host_arrays.append(
            (evs.arrays._packed is not None or evs.arrays._host is not None, evs.arrays._ids)), per_forward=True):
        mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=3)
    # one packed array (or record chain: tests/test_record_chain.py) per forward, no per-layer ones
    assert host_arrays and set(host_arrays) == {(True, None)}
    for compile in (False, True):
        path = tmp_path / f"joined_{compile}.csv"
        # the emulation runs eagerly, not inside mx.compile: there MLX ops stand in for the kernel
        HOOKS.join_flavor = "mlx" if compile else "emulated"
        mlx_moe.generate(model, tok, [5, 6, 7, 8], max_tokens=6, expert_log=path, expert_log_weights=True,
                         compile=compile)
        assert read_log(path) == read_log(per_layer), compile
