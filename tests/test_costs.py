"""readlib.costs: saved-tensor bytes, parameter bytes, energy, FLOPs, latency and memory by phase, by hand."""

import sys
import time
import types

import pytest
import torch
from helpers import F32, saved
from torch import nn

from readlib import costs, methods
from readlib.costs import SavedTensorMeter, parameter_bytes

# ---------------------------------------------------------------- hand-built graphs


def test_mul_saves_the_other_operand():
    # d(x*w)/dx = w: with only x requiring grad autograd keeps w, 3*4 floats = 48 bytes
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    assert saved(lambda: x * w) == 12 * F32 == 48
    # both require grad: it keeps w (for dx) and x (for dw) = 96 bytes
    w.requires_grad_()
    assert saved(lambda: x * w) == 2 * 12 * F32 == 96


def test_exp_saves_its_output():
    # d(exp x)/dx = exp x: the result is kept, 10 float64 = 80 bytes
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert saved(lambda: x.exp()) == 80


def test_no_grad_saves_nothing():
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        assert saved(lambda: x.exp() * x) == 0
    assert saved(lambda: torch.randn(10).exp()) == 0  # nothing requires grad


def test_same_tensor_saved_twice_counts_once():
    # x*x saves x as both operands: one 48-byte buffer
    x = torch.randn(3, 4, requires_grad=True)
    assert saved(lambda: x * x) == 48
    # exp keeps y (40 bytes); y*y keeps y twice more: still 40; sin keeps x: +40
    x = torch.randn(10, requires_grad=True)

    def graph():
        y = x.exp()
        return (y * y).sum() + x.sin().sum()

    assert saved(graph) == 80


def test_a_view_counts_its_whole_buffer():
    # sin keeps its input, a 5-element view of a 10-float buffer: the buffer (40 bytes) stays alive
    base = torch.randn(10, requires_grad=True)
    assert saved(lambda: base[:5].sin()) == 40


def test_linear_weight_is_not_an_activation():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    # x @ W^T + b keeps x (5*4 floats = 80 bytes, for dW) and W (3*4 floats = 48 bytes, for dx)
    assert saved(lambda: layer(x), model=None) == 80 + 48
    assert saved(lambda: layer(x), model=layer) == 80  # W is a parameter of the model: left out
    x.requires_grad_(False)
    assert saved(lambda: layer(x), model=layer) == 80  # dx not needed, W not kept at all


def test_meter_stops_counting_on_exit():
    x = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter:
        x.exp()
    x.sin()
    assert meter.bytes == 40


# ---------------------------------------------------------------- parameter bytes


def test_parameter_bytes_small():
    layer = nn.Linear(4, 3)  # 12 weights + 3 biases
    assert parameter_bytes(layer) == 15 * F32 == 60
    assert parameter_bytes(layer.double()) == 15 * 8
    layer.weight.requires_grad_(False)
    assert parameter_bytes(layer, trainable_only=True) == 3 * 8
    assert parameter_bytes(nn.Sequential(layer, layer)) == 120  # a shared layer counts once


def test_parameter_bytes_read_minilm(minilm):
    model = methods.build("read", minilm, 2)
    assert parameter_bytes(model, trainable_only=True) == 592_130 * F32
    assert parameter_bytes(model) == (592_130 + 22_565_376) * F32


# ---------------------------------------------------------------- energy (READ Section 3.4)


def test_paper_eq4_on_recorded_one_minute_traces():
    # eq. (4): E = U_bar * p0 / 6000 with U_bar the sum of per-minute utilisation samples (percent)
    assert costs.paper_energy_kwh([87, 92, 45, 0, 100], 60.0) == 0.0135  # U_bar = 324, p0 = 0.25 kW (V100)
    assert costs.paper_energy_kwh([100] * 60, 60.0) == 0.25  # one hour at full load = p0 * 1 h
    assert costs.paper_energy_kwh([100] * 30 + [50] * 60, 60.0, p0_kw=0.4) == 0.4  # 6000 percent-minutes
    assert costs.paper_energy_kwh([73] * 120, 30.0) == 73 * 120 * 0.25 / 12_000  # 30 s samples: half the weight
    assert costs.paper_energy_kwh([], 60.0) == 0.0


def test_rapl_counter_wraps():
    start, end, top = {"intel-rapl:0": 900, "intel-rapl:1": 10}, {"intel-rapl:0": 100, "intel-rapl:1": 3_600_010}, \
        {"intel-rapl:0": 1000, "intel-rapl:1": 2**32}
    assert costs.rapl_kwh(start, end, top) == (200 + 3_600_000) / 3.6e12


def test_energy_meter_says_why_nothing_was_measured_here(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails like on a machine without the package
    with costs.EnergyMeter(interval_s=0.01, rapl_root=tmp_path / "powercap") as meter:
        time.sleep(0.02)
    result = meter.result()
    assert result["nvml_counter"]["kwh"] is None and "NVML unavailable" in result["nvml_counter"]["reason"]
    assert result["paper_eq4"]["kwh"] is None
    assert result["rapl"] == {"kwh": None, "reason": f"no {tmp_path / 'powercap'} on this machine"}


class FakeNvml(types.ModuleType):
    """Two GPUs replaying a recorded utilisation trace; energy counters in mJ."""

    def __init__(self, trace):
        super().__init__("pynvml")
        self.trace, self.energy = list(trace), [1_000_000, 5_000_000]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy[h] += 360_000  # 0.1 Wh per read
        return self.energy[h]

    def nvmlDeviceGetUtilizationRates(self, h):
        value = self.trace.pop(0) if self.trace else 0
        return types.SimpleNamespace(gpu=value)


def test_energy_meter_reads_nvml_and_rapl_side_by_side(monkeypatch, tmp_path):
    fake = FakeNvml([40, 60, 100, 100, 20, 80])  # per-GPU samples: two GPUs per sampling tick
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    package = tmp_path / "powercap" / "intel-rapl:0"
    package.mkdir(parents=True)
    (package / "energy_uj").write_text("1000")
    (package / "max_energy_range_uj").write_text("262143328850")
    (tmp_path / "powercap" / "intel-rapl:0:0").mkdir()  # a sub-domain (core): not counted again
    monkeypatch.setenv("READLIB_RAPL_ROOT", str(tmp_path / "powercap"))  # the environment variable
    with costs.EnergyMeter(interval_s=0.05, p0_kw=0.3) as meter:
        time.sleep(0.18)
        (package / "energy_uj").write_text(str(1000 + 7_200_000_000))  # 2 Wh
    result = meter.result()
    assert result["nvml_counter"] == {"kwh": 2 * 360_000 / 3.6e9}  # each GPU's counter moved by 0.1 Wh
    n = result["paper_eq4"]["samples"]
    assert n == len(meter.samples) >= 2
    assert meter.samples == [100, 200, 100][:n] + [0] * (n - 3)  # summed over the two GPUs, in order
    assert result["paper_eq4"]["kwh"] == costs.paper_energy_kwh(meter.samples, 0.05, 0.3)
    assert result["rapl"] == {"kwh": 7_200_000_000 / 3.6e12}


# ---------------------------------------------------------------- FLOPs and latency


def test_flops_of_a_linear_layer_by_hand():
    layer, x = nn.Linear(64, 32), torch.randn(8, 64, requires_grad=True)
    assert costs.count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32  # one multiply-add per weight and row
    # backward: grad of the input (8x32 @ 32x64) and of the weight (32x8 @ 8x64), each 2*8*32*64
    assert costs.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 64 * 32


def test_cpu_sdpa_flops_equal_eager_attention():
    q = torch.randn(2, 4, 16, 8)  # batch 2, 4 heads, 16 tokens, head dim 8
    eager = costs.count_flops(lambda: torch.softmax(q @ q.transpose(-1, -2) / 8**0.5, -1) @ q)
    sdpa = costs.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert eager == sdpa == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # Q K^T and P V, 2 FLOPs per multiply-add


def test_latency_is_the_median_of_timed_calls():
    calls = []
    result = costs.latency(lambda: calls.append(time.sleep(0.001)), warmup=3, repeats=5)
    assert len(calls) == 8 and len(result["times_s"]) == 5
    assert result["median_s"] == sorted(result["times_s"])[2] and result["median_s"] >= 0.001
    with pytest.raises(ValueError):
        costs.latency(lambda: None, repeats=0)


# ---------------------------------------------------------------- memory by phase (selective FT paper, Table 1)


def test_live_bytes_counts_storages_until_they_are_freed():
    x = torch.zeros(1000)
    with costs.LiveBytes([x, x[:10]]) as live:  # a view shares its base's storage: counted once
        assert live.current == 4000
        y = x + 1
        z = y.view(10, 100)  # a view: no new storage
        assert (live.current, live.peak) == (8000, 8000)
        del y, z
        w = torch.ones(10, dtype=torch.float64)
        assert (live.current, live.peak) == (4080, 8000)
    del w
    assert live.current == 4000


def _linear_step(device):
    torch.manual_seed(0)
    model = nn.Linear(8, 4, bias=False).to(device)
    x = torch.randn(16, 8).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    return costs.phase_memory(model, lambda: model(x).sum(), optimizer)


def test_phase_memory_of_a_linear_layer_by_hand():
    out = _linear_step("cpu")
    weights, output, scalar = 8 * 4 * 4, 16 * 4 * 4, 4
    assert out["peak"]["weights"] == out["after"]["weights"] == weights
    assert out["peak"]["forward_no_grad"] == weights + output + scalar  # y = x Wᵀ, then its sum
    assert out["after"]["forward_no_grad"] == weights
    assert out["after"]["forward"] == weights + scalar  # autograd keeps x and W (not new) and the loss
    assert out["after"]["backward"] == weights + weights  # the loss is gone, W.grad stays
    assert out["after"]["optimizer"] - out["after"]["backward"] == 2 * weights + 4  # AdamW moments and step
    assert list(out["cumulative"].values()) == sorted(out["cumulative"].values())
    assert out["cumulative"]["optimizer"] == max(out["peak"].values())
    assert _linear_step("meta")["peak"] == out["peak"]  # shapes alone decide it
