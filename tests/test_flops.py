"""The analytic FLOP count (fedmask_jax/flops.py) against a count by hand, layer by layer, and
against XLA:CPU's cost analysis of the compiled forward pass and training step.

Conventions (flops.py's docstring): a multiply-add is 2 FLOPs; a 3x3 'same' conv over n
positions per dimension has 3n - 2 in-image (output, tap) pairs per dimension; bias add and
ReLU are 1 FLOP per output each; the input's normalisation is 4 per pixel; a 2x2 max-pool is
3 comparisons per window forward and 4 FLOPs per input element backward; the backward pass
has a weight gradient and an input gradient product per layer, each as big as the forward
product, but no input gradient for the first layer, and the ReLU + bias gradients (2 per
output). The mask (once per step, not per example) and the loss are not counted.
"""

import contextlib

import pytest

from fedmask_jax import flops, models

MLP = models.Architecture("mlp", 10, (28, 28, 1))
CONV4 = models.Architecture("conv4", 10, (28, 28, 1))
CONV6 = models.Architecture("conv6", 10, (32, 32, 3))
CONV10 = models.Architecture("conv10", 100, (32, 32, 3))


def test_in_image_taps():
    assert [flops.in_image_taps(n) for n in (1, 2, 7, 14, 28, 32)] == [1, 4, 19, 40, 82, 94]


def _mlp_by_hand():
    # MLP 784-300-100-10, one example.
    normalize = 4 * 784  # convert, / 255, - 0.5, / 0.5
    macs = [784 * 300, 300 * 100, 100 * 10]  # 235,200 + 30,000 + 1,000 = 266,200
    bias_relu = [2 * 300, 2 * 100, 1 * 10]  # the output layer has a bias and no ReLU
    forward = normalize + sum(2 * m for m in macs) + sum(bias_relu)
    # backward: weight gradients of all three layers, input gradients of layers 2 and 3 only
    backward = sum(2 * m for m in macs) + sum(2 * m for m in macs[1:]) + sum(bias_relu)
    return forward, forward + backward


def _conv4_by_hand():
    # Conv4 on 28x28x1, 10 classes. In-image taps per dimension: 3*28-2 = 82, 3*14-2 = 40.
    normalize = 4 * 28 * 28 * 1
    conv_macs = [82 * 82 * 1 * 64,      # conv1 28x28x1   -> 28x28x64     430,336
                 82 * 82 * 64 * 64,     # conv2 28x28x64  -> 28x28x64  27,541,504
                 40 * 40 * 64 * 128,    # conv3 14x14x64  -> 14x14x128 13,107,200
                 40 * 40 * 128 * 128]   # conv4 14x14x128 -> 14x14x128 26,214,400
    conv_outputs = [28 * 28 * 64, 28 * 28 * 64, 14 * 14 * 128, 14 * 14 * 128]
    pool_windows = [14 * 14 * 64, 7 * 7 * 128]  # after conv2 and conv4
    pool_inputs = [28 * 28 * 64, 14 * 14 * 128]
    dense_macs = [7 * 7 * 128 * 256, 256 * 256, 256 * 10]  # 6272 -> 256 -> 256 -> 10
    dense_bias_relu = [2 * 256, 2 * 256, 1 * 10]
    macs = conv_macs + dense_macs  # 68,967,168
    ew_forward = (normalize + sum(2 * n for n in conv_outputs) + sum(3 * w for w in pool_windows)
                  + sum(dense_bias_relu))
    forward = sum(2 * m for m in macs) + ew_forward
    ew_backward = (sum(2 * n for n in conv_outputs) + sum(4 * n for n in pool_inputs)
                   + sum(dense_bias_relu))
    backward = 2 * (2 * sum(macs)) - 2 * conv_macs[0] + ew_backward
    return forward, forward + backward


def _conv_by_hand(spatial, channels, classes):
    """Conv6 / Conv10 on 32x32x3, written out from the per-stage sizes below."""
    normalize = 4 * 32 * 32 * 3
    conv_macs, conv_outputs, pool_windows, pool_inputs = [], [], [], []
    c_in = 3
    for stage, (n, c) in enumerate(zip(spatial, channels)):
        taps = 3 * n - 2
        conv_macs += [taps * taps * c_in * c, taps * taps * c * c]  # two convs per stage
        conv_outputs += [n * n * c, n * n * c]
        pool_windows.append((n // 2) * (n // 2) * c)
        pool_inputs.append(n * n * c)
        c_in = c
    flat = (spatial[-1] // 2) ** 2 * channels[-1]
    dense_macs = [flat * 256, 256 * 256, 256 * classes]
    dense_bias_relu = [2 * 256, 2 * 256, classes]
    macs = conv_macs + dense_macs
    forward = (sum(2 * m for m in macs) + normalize + sum(2 * n for n in conv_outputs)
               + sum(3 * w for w in pool_windows) + sum(dense_bias_relu))
    backward = (4 * sum(macs) - 2 * conv_macs[0] + sum(2 * n for n in conv_outputs)
                + sum(4 * n for n in pool_inputs) + sum(dense_bias_relu))
    return forward, forward + backward


def _conv6_by_hand():
    # 32x32: 64, 64 | pool | 16x16: 128, 128 | pool | 8x8: 256, 256 | pool -> 4x4x256 = 4096
    # conv1 = 94*94*3*64 = 1,696,512; conv2 = 94*94*64*64 = 36,192,256; conv3 = 46*46*64*128
    # = 17,334,272; conv4 = 46*46*128*128 = 34,668,544; conv5 = 22*22*128*256 = 15,859,712;
    # conv6 = 22*22*256*256 = 31,719,424; dense 4096*256 + 256*256 + 256*10.
    return _conv_by_hand((32, 16, 8), (64, 128, 256), 10)


def _conv10_by_hand():
    # ... then 4x4: 512, 512 | pool | 2x2: 1024, 1024 | pool -> 1x1x1024; in-image taps
    # 3*4-2 = 10 and 3*2-2 = 4: conv7 = 10*10*256*512, conv8 = 10*10*512*512,
    # conv9 = 4*4*512*1024, conv10 = 4*4*1024*1024; dense 1024*256 + 256*256 + 256*100.
    return _conv_by_hand((32, 16, 8, 4, 2), (64, 128, 256, 512, 1024), 100)


HAND = {"mlp": (MLP, _mlp_by_hand), "conv4": (CONV4, _conv4_by_hand),
        "conv6": (CONV6, _conv6_by_hand), "conv10": (CONV10, _conv10_by_hand)}


@pytest.mark.parametrize("name", list(HAND))
def test_analytic_count_matches_hand_count(name):
    arch, by_hand = HAND[name]
    forward, train = by_hand()
    # Same convention, so they agree exactly (well within the 2% asked of them).
    assert flops.forward_flops_per_example(arch) == forward
    assert flops.train_flops_per_example(arch) == train
    assert sum(l.forward for l in flops.layers(arch)) == forward


def test_hand_counts_in_figures():
    """The figures docs/benchmarks.md quotes."""
    assert _mlp_by_hand() == (536_346, 1_131_556)
    assert _conv4_by_hand() == (138_296_010, 413_907_156)
    assert _conv6_by_hand() == (277_732_874, 829_607_956)
    assert _conv10_by_hand() == (405_239_396, 1_212_109_000)


def test_training_is_not_three_times_forward_for_the_mlp():
    # The MLP's first layer (88% of its multiply-adds) needs no input gradient; the conv
    # nets' first conv is small, so for them 3x the forward is within 0.5%.
    assert flops.train_flops_per_example(MLP) / flops.forward_flops_per_example(MLP) == pytest.approx(2.11, abs=0.005)
    for arch in (CONV4, CONV6, CONV10):
        ratio = flops.train_flops_per_example(arch) / flops.forward_flops_per_example(arch)
        assert ratio == pytest.approx(3.0, rel=0.005)


def test_width_multiplier_scales_every_hidden_layer():
    half = models.Architecture("conv4", 10, (28, 28, 1), width=0.5)
    convs = [l for l in flops.layers(half) if l.kind == "conv3x3"]
    assert [l.macs for l in convs] == [82 * 82 * 1 * 32, 82 * 82 * 32 * 32, 40 * 40 * 32 * 64, 40 * 40 * 64 * 64]
    dense = [l.macs for l in flops.layers(half) if l.kind == "dense"]
    assert dense == [7 * 7 * 64 * 128, 128 * 128, 128 * 10]  # the output layer keeps 10 classes
    mlp = models.Architecture("mlp", 10, (28, 28, 1), width=0.5)
    assert [l.macs for l in flops.layers(mlp) if l.kind == "dense"] == [784 * 150, 150 * 50, 50 * 10]


def test_table_total_row():
    table = flops.format_table(CONV4)
    assert "| conv2 | 28x28x64 -> 28x28x64 | 27,541,504 |" in table
    assert table.splitlines()[-1].endswith("| 138,296,010 | 275,611,146 | 413,907,156 |")


# XLA:CPU compiles each forward pass in about a second (conv10: about 2.5); the training
# step is checked for the MLP only (a conv net's gradient takes 10-30 s to compile here).
@pytest.mark.parametrize("name", ["mlp", "conv4", "conv6", "conv10"])
def test_forward_count_matches_xla_cpu(name):
    arch = HAND[name][0]
    xla = flops.xla_cpu_flops_per_example(arch)
    # In practice they agree to 1e-7 (XLA's float total); 0.1% is well within the 2% asked.
    assert flops.forward_flops_per_example(arch) == pytest.approx(xla, rel=1e-3)


def test_forward_count_matches_xla_cpu_at_half_width():
    arch = models.Architecture("conv4", 10, (28, 28, 1), width=0.5)
    assert flops.forward_flops_per_example(arch) == pytest.approx(flops.xla_cpu_flops_per_example(arch), rel=1e-3)


def test_training_count_matches_xla_cpu_for_the_mlp():
    xla = flops.xla_cpu_flops_per_example(MLP, train=True)
    assert flops.train_flops_per_example(MLP) == pytest.approx(xla, rel=0.02)
    assert 3 * flops.forward_flops_per_example(MLP) > 1.4 * xla  # what 3x the forward would claim


def test_xla_cross_check_refuses_custom_calls(monkeypatch):
    """A convolution XLA hands to a custom call (cuDNN on a GPU; fedmask_jax.conv's oneDNN
    kernel on the CPU when it is built) costs 0 FLOPs in cost analysis: the cross-check
    traces with XLA's own convolutions and refuses a program that still has a custom call."""
    conv = pytest.importorskip("fedmask_jax.conv")
    if not hasattr(conv, "cpu_kernel") or conv.cpu_kernel() != "onednn":
        pytest.skip("no custom-call convolution on this CPU")
    small = models.Architecture("conv4", 10, (8, 8, 1), width=0.25)
    assert flops.forward_flops_per_example(small) == pytest.approx(flops.xla_cpu_flops_per_example(small), rel=1e-3)
    assert conv.cpu_kernel() == "onednn"  # restored
    monkeypatch.setattr(flops, "_xla_convolutions", contextlib.nullcontext)
    with pytest.raises(RuntimeError, match="custom call"):
        flops.xla_cpu_flops_per_example(small)


def test_benchmark_gemm_peak_and_table_carry_the_precision(tmp_path):
    """experiments/benchmark.py's GEMM peak (sizes shrunk here) and the line above its table."""
    from experiments import benchmark_report as benchmark

    gpu = benchmark.gemm_peak(backend="gpu", size=64, chain=2, repeats=2)
    assert gpu["gemm_peak_precision"] == "f32 (TF32 on GPU)" and gpu["gemm_peak_chain"] == 2
    assert gpu["gemm_peak_gflops"] > 0 and len(gpu["gemm_peak_seconds"]) == 2
    cpu = benchmark.gemm_peak(size=64, repeats=1)
    assert (cpu["gemm_peak_precision"], cpu["gemm_peak_chain"]) == ("f32", 1)
    assert benchmark.gemm_peak(size=64, repeats=1, dtype="bfloat16")["gemm_peak_precision"] == "bf16"
    row = dict(case="conv4_w1_k100", strategy="scan", client_chunk_size=100, jax_rounds_per_s=3.626,
               torch_rounds_per_s=0.514, speedup=7.05, jax_examples_per_s=139_256.0,
               achieved_gflops=139_256 * flops.train_flops_per_example(CONV4) / 1e9, compile_time_s=31.1,
               peak_rss_mb=1.0, backend="gpu", device="NVIDIA H200", torch_device="cuda",
               compiler_options={}, **dict(gpu, gemm_peak_size=8192, gemm_peak_chain=8, gemm_peak_gflops=4e5))
    docs = tmp_path / "b.md"
    docs.write_text("# B\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    benchmark.write_docs([row], str(docs), "cmd")
    text = docs.read_text()
    assert "GEMM peak: 8192³ f32 (TF32 on GPU) matmul, 8 chained in one program" in text
    assert "| conv4_w1_k100 | scan/100 | 3.626 | 0.514 | 7.05 | 139256 | 57639.1 | 14 |" in text
