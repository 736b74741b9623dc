"""The GPU cost model (pyalign/bench/gpu_cost.py) against numbers derived by hand from its
formulas in docs/gpu.md and the issue that asked for it, and docs/gpu.md's tables against the
model's output."""
import math
import pathlib

import pytest

from pyalign.bench import gpu_cost

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
ANCHOR_8K = gpu_cost.Shape(8192, 4096, 128256)


def test_doc_tables_are_the_models_output():
    text = DOC.read_text()
    assert gpu_cost.render(text) == text, "run: python -m pyalign.bench.gpu_cost --write docs/gpu.md"


def test_fused_backward_atomics_and_matmul_floor_at_8k():
    # 64 x 64 backward tiles: N*H*4*V/64 + V*H*4*N/64 bytes, each ~269 GB; 3 matmuls 25.8 TFLOP
    cost = gpu_cost.fused_tiles(ANCHOR_8K, backward_tile=(64, 64))
    assert cost.atomic_bytes_cold == pytest.approx(8192 * 4096 * 4 * math.ceil(128256 / 64))
    assert cost.atomic_bytes_hot == pytest.approx(128256 * 4096 * 4 * (8192 // 64))
    assert cost.atomic_bytes_cold / 1e9 == pytest.approx(269, abs=1)
    assert gpu_cost.three_matmul_loss(ANCHOR_8K).flops / 1e12 == pytest.approx(25.8, abs=0.05)
    assert cost.flops == pytest.approx(8 * 8192 * 4096 * 128256)


def test_fused_forward_fill_counts_idle_sms():
    small = gpu_cost.fused_tiles(gpu_cost.Shape(1024, 4096, 128256))
    assert small.serial_fill == pytest.approx(16 / 132)
    assert gpu_cost.fused_tiles(ANCHOR_8K).serial_fill == pytest.approx(128 / 132)


def test_slice_traffic_hides_under_the_flops_past_about_520_columns():
    # the chunked head walks the vocabulary in slices of all N tokens: per slice (3b + 8) N H
    # bytes of hidden reads and fp32 d_hidden read-modify-write against 8 N H W FLOPs, so it is
    # compute-bound once 8 W / (3 * 2 + 8) >= the H100 ridge point
    gpu = gpu_cost.H100
    ridge = gpu.bf16_flops / gpu.hbm_bytes_per_s
    assert 500 < ridge * 14 / 8 < 540
    shape = gpu_cost.Shape(16384, 4096, 128256)
    skinny = gpu_cost.chunked(shape, chunk_tokens=32)  # 250 columns a slice, 514 slices
    wide = gpu_cost.chunked(shape, chunk_tokens=4096)  # 32064 columns, 4 slices
    assert gpu_cost.vocabulary_slices(shape, 32) == 514
    assert gpu_cost.vocabulary_slices(shape, 4096) == 4
    for cost, memory_bound in ((skinny, True), (wide, False)):
        seconds_of_bytes = cost.matmul_bytes / gpu.hbm_bytes_per_s
        assert (seconds_of_bytes > cost.matmul_flops / gpu.bf16_flops) == memory_bound
    for assume in (gpu_cost.OPTIMISTIC, gpu_cost.PESSIMISTIC):
        assert skinny.seconds(gpu, assume) > 1.5 * wide.seconds(gpu, assume)


def test_chunked_traffic_at_8k_by_hand():
    # 8192 tokens, 4096 tokens' worth a slice: 2 slices of 64128 columns. W read 3 times, hidden
    # 3 times a slice, logits written twice and read twice, d_hidden written then read and
    # written once more, d_weight written once; kept logits: one block, 2 reads of each operand
    n, h, v, b = ANCHOR_8K
    recompute = gpu_cost.chunked(ANCHOR_8K)
    assert recompute.matmul_bytes == pytest.approx(
        3 * (v * h * b + 2 * n * h * b) + 4 * n * v * b + (4 + 8) * n * h + 4 * v * h)
    kept = gpu_cost.chunked(ANCHOR_8K, keep_logits=True)
    assert kept.matmul_bytes == pytest.approx(
        2 * (v * h * b + n * h * b) + 3 * n * v * b + 4 * n * h + 4 * v * h)
    assert kept.held_bytes == n * v * b and recompute.held_bytes == 4096 * v * b
    assert recompute.stream_bytes == kept.stream_bytes == 3 * n * v * b


@pytest.mark.parametrize("tokens", gpu_cost.ANCHOR_TOKENS)
def test_chunked_beats_both_fused_variants_at_the_anchor_shapes(tokens):
    # docs/gpu.md's stated expectation, under either set of assumptions
    shape = gpu_cost.Shape(tokens, gpu_cost.ANCHOR_HIDDEN, gpu_cost.ANCHOR_VOCAB)
    for gpu in gpu_cost.GPUS:
        chunked = gpu_cost.prediction(gpu_cost.chunked(shape), gpu)[1]  # pessimistic
        for grouped, tile in ((False, (64, 64)), (True, (128, 128))):
            fused = gpu_cost.prediction(gpu_cost.fused_tiles(
                shape, gpu, backward_tile=tile, grouped=grouped), gpu)[0]  # optimistic
            assert fused > chunked


def test_weight_update_bytes_per_parameter():
    cost = gpu_cost.weight_update(7_000_000_000, kind="bema")
    assert cost.stream_bytes == 7_000_000_000 * 5 * 2
    assert gpu_cost.weight_update(1000, kind="lerp").stream_bytes == 6000


def test_render_refuses_a_document_without_its_markers():
    with pytest.raises(ValueError, match="cost-model: predictions"):
        gpu_cost.render("# no tables here\n")
