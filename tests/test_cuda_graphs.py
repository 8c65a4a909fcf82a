"""CUDA graphs for THE step (`sumtune.cuda_graphs`): when they apply, and (GPU) that a replayed step trains exactly
as the eager step does and draws fresh dropout on every replay."""

from __future__ import annotations

import pytest
import torch

from sumtune.batching import collate
from sumtune.cuda_graphs import batch_key, graph_blocker
from sumtune.data import tokenize_rows
from sumtune.demo_data import build_word_tokenizer, demo_records

CUDA = torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_only_where_a_capture_can_hold():
    assert "CUDA device" in graph_blocker(device=torch.device("cpu"), distributed=False, gradient_checkpointing=False)
    assert "data-parallel" in graph_blocker(device=CUDA, distributed=True, gradient_checkpointing=False)
    assert "checkpointing" in graph_blocker(device=CUDA, distributed=False, gradient_checkpointing=True)
    assert graph_blocker(device=CUDA, distributed=False, gradient_checkpointing=False) is None


def test_a_runs_graphs_follow_its_config_and_context():
    """What build_parts asks (the weight cache's room for a warm-up) and build_step acts on: one answer."""
    from sumtune.config import TrainConfig
    from sumtune.distributed import DistContext
    from sumtune.training import graph_blocker_for

    cfg = TrainConfig(model="tiny", cuda_graphs=True)
    assert graph_blocker_for(cfg, DistContext(device=CUDA)) is None
    assert "off" in graph_blocker_for(TrainConfig(model="tiny", cuda_graphs=False), DistContext(device=CUDA))
    assert "checkpointing" in graph_blocker_for(TrainConfig(model="tiny", gradient_checkpointing=True),
                                                DistContext(device=CUDA))
    assert "CUDA device" in graph_blocker_for(cfg, DistContext(device=torch.device("cpu")))
    assert "data-parallel" in graph_blocker_for(cfg, DistContext(world_size=2, device=CUDA))


def test_batches_of_one_shape_share_a_key():
    a = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    b = {"labels": torch.ones(2, 4, dtype=torch.long), "input_ids": torch.ones(2, 8, dtype=torch.long)}
    c = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}
    assert batch_key(a) == batch_key(b) != batch_key(c)


def test_a_new_shape_warms_up_on_one_row_and_leaves_the_gradients_as_they_were():
    """The warm-up before a capture runs the real forward and backward on the batch's first row only (a full-size
    eager pass beside the graphs' memory pool ran out of memory), and the step's gradients do not see it."""
    from sumtune.cuda_graphs import GraphedMicroSteps

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    params = list(layer.parameters())
    seen_rows = []

    def forward_backward(batch, accum):
        seen_rows.append(batch["x"].shape[0])
        loss = layer(batch["x"]).square().mean() / accum
        loss.backward()
        return loss.detach()

    micro = GraphedMicroSteps(forward_backward, params, torch.device("cpu"), notify=lambda _: None)
    micro.ensure_grads()
    forward_backward({"x": torch.randn(5, 6)}, 1)  # an earlier micro-batch of the step already added gradients
    before = [p.grad.clone() for p in params]
    grads = [p.grad for p in params]
    micro._warm_up({"x": torch.randn(8, 6), "labels": torch.zeros(8, 2)}, accum=2)
    assert seen_rows == [5, 1]
    assert all(p.grad is g for p, g in zip(params, grads))  # the very tensors a capture adds into
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert all(b.abs().sum() > 0 for b in before)  # so the equality above is not between zeros


def _oom_once_steps(fail_calls: set[int]):
    """A GraphedMicroSteps over one linear layer whose forward-backward adds to the gradients, then runs out of
    memory on the calls numbered in `fail_calls`; `release` records its calls instead of touching a GPU."""
    from sumtune.cuda_graphs import GraphedMicroSteps

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    params = list(layer.parameters())
    calls, said, released = [], [], []

    def forward_backward(batch, accum):
        calls.append(batch["x"].shape[0])
        loss = layer(batch["x"]).square().mean() / accum
        loss.backward()  # the gradients change before the failure: the warm-up must put them back
        if len(calls) in fail_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return loss.detach()

    micro = GraphedMicroSteps(forward_backward, params, torch.device("cpu"), notify=said.append)
    micro.release = lambda: (released.append(True), micro.graphs.clear(), setattr(micro, "pool", None))
    micro.ensure_grads()
    forward_backward({"x": torch.randn(5, 6)}, 1)  # an earlier micro-batch of the step
    return micro, params, calls, said, released


def test_a_warm_up_with_no_room_beside_the_pool_frees_the_graphs_and_warms_up_again():
    """2026-12-01, H200: under a 15.3 GiB cap the graphs' pool left no room for a new shape's one-row warm-up and
    the run died; now the graphs are freed (captured again later) and the warm-up runs again, said once."""
    micro, params, calls, said, released = _oom_once_steps(fail_calls={2})
    micro.pool = object()  # a pool holding earlier shapes' graphs
    before = [p.grad.clone() for p in params]
    micro._warm_up_beside_the_pool({"x": torch.randn(8, 6)}, accum=2)
    assert calls == [5, 1, 1] and released == [True] and micro.pool is None
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))  # neither warm-up left a trace
    assert len(said) == 1 and "freed" in said[0] and micro.pool_freed_for_warm_up == 1


def test_a_warm_up_that_fits_nowhere_is_the_runs_out_of_memory_error():
    micro, params, calls, said, released = _oom_once_steps(fail_calls={2})
    before = [p.grad.clone() for p in params]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no pool to free: the step itself does not fit
        micro._warm_up_beside_the_pool({"x": torch.randn(8, 6)}, accum=1)
    assert released == [] and said == []
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    micro, params, calls, said, released = _oom_once_steps(fail_calls={2, 3})
    micro.pool = object()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # freed the pool and still no room: the run's error
        micro._warm_up_beside_the_pool({"x": torch.randn(8, 6)}, accum=1)
    assert released == [True] and calls == [5, 1, 1]


def test_compiled_models_warm_up_on_the_full_batch():
    from sumtune.cuda_graphs import warm_up_rows_for

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert warm_up_rows_for(model) == 1
    model[1][0].compile()  # as sumtune.fast_t5.extras compiles the T5 blocks: in place
    assert warm_up_rows_for(model) is None


def _steps(dropout: float, graphs: bool, compile: bool = False, fused_lora: bool = False):
    from sumtune.config import TrainConfig
    from sumtune.train_step import BatchFlops, TrainStep
    from sumtune.training import build_model

    rows = demo_records(16)
    tokenizer = build_word_tokenizer([r["text"] + " " + r["summary"] for r in rows])
    cfg = TrainConfig(model="tiny", compute_dtype="bf16", device="cuda", lora_dropout=0.0, model_dropout=dropout,
                      max_source_tokens=32, max_target_tokens=8, lora_r=4, seed=5, optimizer="adamw",
                      lora_targets=["all-linear"], compile=compile, fused_lora=fused_lora)
    torch.manual_seed(5)
    model = build_model(cfg, tokenizer, CUDA).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    step = TrainStep(model, optimizer, device=CUDA, compute_dtype="bf16", max_grad_norm=1.0,
                     flops=BatchFlops(model.config, 0), cuda_graphs=graphs)
    examples = tokenize_rows(tokenizer, rows, prefix=cfg.source_prefix, max_source_tokens=32, max_target_tokens=8)
    batches = [collate(examples[i:i + 4], tokenizer.pad_token_id) for i in range(0, 16, 4)]
    return step, batches


@pytest.mark.gpu
@needs_gpu
def test_replayed_steps_train_as_the_eager_steps():
    from sumtune import train_step

    def stepped_key(batch):  # the key the step captures under: an unpadded batch's all-ones mask is left out
        return batch_key(train_step.without_full_source_mask(batch) if train_step.OMIT_FULL_SOURCE_MASK else batch)

    eager, batches = _steps(dropout=0.0, graphs=False)
    graphed, _ = _steps(dropout=0.0, graphs=True)
    shapes = {stepped_key(b) for b in batches}
    for index in range(6):  # every shape: one row warms up, then the micro-batch is captured at once and replayed
        micro = [batches[index % len(batches)]]
        one, two = eager(micro, lr=1e-3), graphed(micro, lr=1e-3)
        assert two.loss == pytest.approx(one.loss, rel=1e-3) and two.grad_norm == pytest.approx(one.grad_norm, rel=1e-2)
        assert (stepped_key(micro[0]), 1) in graphed.graphed.graphs, index
    assert graphed.graphed.failed is None and {key for key, _ in graphed.graphed.graphs} == shapes
    graphed.release_graphs()  # as before an evaluation: the next steps capture again and still train the same
    assert not graphed.graphed.graphs
    for index in range(6, 10):
        micro = [batches[index % len(batches)]]
        one, two = eager(micro, lr=1e-3), graphed(micro, lr=1e-3)
        assert two.loss == pytest.approx(one.loss, rel=1e-3)
    assert graphed.graphed.graphs
    for (name, p), q in zip(eager.model.named_parameters(), graphed.model.parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, rtol=1e-2, atol=1e-4), name


@pytest.mark.gpu
@needs_gpu
def test_every_replay_draws_new_dropout():
    graphed, batches = _steps(dropout=0.1, graphs=True)
    micro = graphed.graphed
    micro.ensure_grads()
    losses = [float(micro(batches[0])) for _ in range(4)]  # eager, then captured + replayed three times
    assert micro.failed is None and micro.graphs
    assert len(set(losses[1:])) == 3  # a mask fixed at capture would repeat one loss


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("compile,fused_lora", [(True, False), (False, True), (True, True)])
def test_compiled_and_fused_steps_train_as_the_plain_eager_steps(compile, fused_lora):
    """Each speed option with graphs (compiled T5 blocks, the fused LoRA node) trains as the plain eager step does:
    the same losses and gradient norms step after step. All three together gave zero gradients on an H200
    (torch 2.11; results/logs/test_cuda_graphs_compile_fused_gpu2-2026-12-01-h200.log) while torch.compile traced
    the fused node; it now runs eagerly between the compiled regions (sumtune.fast_t5.lora4bit)."""
    eager, batches = _steps(dropout=0.0, graphs=False)
    fast, _ = _steps(dropout=0.0, graphs=True, compile=compile, fused_lora=fused_lora)
    first = None
    for index in range(8):
        micro = [batches[index % len(batches)]]
        one, two = eager(micro, lr=1e-3), fast(micro, lr=1e-3)
        first = first or one.loss
        assert two.grad_norm is not None and two.grad_norm == pytest.approx(one.grad_norm, rel=5e-2), index
        assert two.loss == pytest.approx(one.loss, rel=1e-2), index
    assert fast.graphed.failed is None and fast.graphed.graphs
    assert one.loss < first  # the steps trained, so the agreement above is not between two idle models


@pytest.mark.gpu
@needs_gpu
def test_a_shape_met_after_the_first_capture_needs_no_second_set_of_activations():
    """The graphs' pool holds the activations of the largest shape captured; a new shape met later must not run a
    full-size eager pass beside it (2026-12-01: the shipped config ran out of its 75 GiB cap that way). Same-size
    shapes one after the other: the memory reserved grows by far less than one set of activations."""
    graphed, _ = _steps(dropout=0.0, graphs=True)
    micro = graphed.graphed

    def batch(src_len):
        g = torch.Generator().manual_seed(src_len)
        return {"input_ids": torch.randint(3, 60, (256, src_len), generator=g),
                "attention_mask": torch.ones(256, src_len, dtype=torch.long),
                "labels": torch.randint(3, 60, (256, 32), generator=g)}

    graphed([batch(512)], lr=1e-3)
    graphed([batch(512)], lr=1e-3)  # replayed: the pool now holds this shape's activations
    torch.cuda.synchronize()
    pool_bytes = torch.cuda.memory_reserved()
    graphed([batch(480)], lr=1e-3)  # a new shape, nearly as large
    torch.cuda.synchronize()
    assert micro.failed is None and len(micro.graphs) == 2
    assert torch.cuda.memory_reserved() < 1.3 * pool_bytes


def _key(rows: int, source: int, target: int, accum: int = 2):
    return (batch_key({"input_ids": torch.zeros(rows, source), "labels": torch.zeros(rows, target)}), accum)


def test_a_warmed_shape_covers_only_no_larger_shapes_of_its_width_classes():
    from sumtune.cuda_graphs import warm_up_covers

    warmed = _key(4, 384, 64)
    assert warm_up_covers(warmed, _key(4, 384, 64)) and warm_up_covers(warmed, _key(4, 288, 64))
    assert warm_up_covers(warmed, _key(2, 320, 48))  # 48: above 32, so the same power-of-two class as 64
    assert not warm_up_covers(warmed, _key(4, 448, 64))  # same class, larger: its memory is not proven
    assert not warm_up_covers(warmed, _key(4, 640, 64))  # another class: the autotuner has not seen it
    assert not warm_up_covers(warmed, _key(4, 256, 64))  # 256 is the class below 384's
    assert not warm_up_covers(warmed, _key(1, 384, 64))  # one row: Triton specialises on it
    assert not warm_up_covers(warmed, _key(4, 376, 64))  # not divisible by 16: another specialisation
    assert not warm_up_covers(warmed, _key(4, 384, 64, accum=1))


@pytest.mark.parametrize("only_uncovered", [False, True])
def test_new_shapes_warm_up_unless_a_warmed_shape_covers_them(monkeypatch, only_uncovered):
    """With WARM_UP_ONLY_UNCOVERED_SHAPES a new shape inside a warmed shape's classes is captured at once (the
    capture itself is replaced here: this checks which shapes run the one-row warm-up); without it, every one."""
    from types import SimpleNamespace

    from sumtune import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "WARM_UP_ONLY_UNCOVERED_SHAPES", only_uncovered)
    warmed_widths = []
    micro = cuda_graphs.GraphedMicroSteps(lambda batch, accum: torch.zeros(()), [], torch.device("cpu"))
    micro._warm_up_beside_the_pool = lambda batch, accum: warmed_widths.append(batch["input_ids"].shape[1])

    def fake_capture(key, host_batch, started=None):
        captured = cuda_graphs.CapturedMicroStep(graph=SimpleNamespace(replay=lambda: None), inputs={},
                                                 loss=torch.zeros(()))
        micro.graphs[key] = captured
        return captured

    micro._capture = fake_capture
    for source in (384, 320, 640, 384, 448, 288):
        micro({"input_ids": torch.zeros(4, source, dtype=torch.long), "labels": torch.zeros(4, 64)}, 2)
    assert warmed_widths == ([384, 640, 448] if only_uncovered else [384, 320, 640, 448, 288])
