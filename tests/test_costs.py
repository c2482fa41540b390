"""readlib.costs: saved-tensor bytes, parameter bytes, energy, FLOPs, latency and memory by phase, by hand."""

import socket
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


UUIDS = ["GPU-0a1b2c3d-0000-4000-8000-000000000000", "GPU-0a1b2c3d-1111-4000-8000-000000000000",
         "GPU-5e6f7a8b-2222-4000-8000-000000000000", "GPU-9c0d1e2f-3333-4000-8000-000000000000"]


class FakeNvml(types.ModuleType):
    """GPUs replaying a recorded utilisation trace. GPU i's energy counter (mJ) moves by (i + 1) * 0.1 Wh per
    read, so a reading says which GPUs were read; ``reads`` counts the counter reads per GPU."""

    def __init__(self, trace=(), uuids=UUIDS[:2], names=None):
        super().__init__("pynvml")
        self.trace, self.uuids, self.names = list(trace), uuids, names or ["NVIDIA H100"] * len(uuids)
        self.energy = [1_000_000 * (i + 1) for i in range(len(uuids))]
        self.reads = [0] * len(uuids)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h]

    def nvmlDeviceGetName(self, h):
        return self.names[h]

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.reads[h] += 1
        self.energy[h] += (h + 1) * 360_000
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
    assert result["nvml_counter"] == {"kwh": (1 + 2) * 360_000 / 3.6e9, "gpus": UUIDS[:2]}  # 0.1 Wh + 0.2 Wh
    n = result["paper_eq4"]["samples"]
    assert n == len(meter.samples) >= 2
    assert meter.samples == [100, 200, 100][:n] + [0] * (n - 3)  # summed over the two GPUs, in order
    assert result["paper_eq4"]["kwh"] == costs.paper_energy_kwh(meter.samples, 0.05, 0.3)
    assert result["rapl"] == {"kwh": 7_200_000_000 / 3.6e12, "host": socket.gethostname()}


# ---------------------------------------------------------------- energy of one process among several


@pytest.fixture
def no_cuda_env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nvml_indices_of_plain_devices(no_cuda_env):
    nvml = FakeNvml(uuids=UUIDS)
    assert costs.nvml_indices("cuda:2", nvml) == [2]
    assert costs.nvml_indices(torch.device("cuda", 3), nvml) == [3]
    assert costs.nvml_indices("cuda", nvml) == [0]  # no LOCAL_RANK, CUDA not started: GPU 0
    assert costs.nvml_indices("cpu", nvml) == costs.nvml_indices("meta", None) == []
    with pytest.raises(ValueError, match="only 4 are visible"):
        costs.nvml_indices("cuda:4", nvml)


def test_nvml_indices_under_cuda_visible_devices_and_local_rank(no_cuda_env):
    nvml = FakeNvml(uuids=UUIDS)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # CUDA sees two GPUs; NVML still numbers all four
    assert [costs.nvml_indices(f"cuda:{i}", nvml) for i in (0, 1)] == [[2], [3]]
    assert costs.nvml_indices("cuda", nvml) == [2]
    no_cuda_env.setenv("LOCAL_RANK", "1")  # torchrun's second process on this machine
    assert costs.nvml_indices("cuda", nvml) == [3]
    no_cuda_env.setattr(torch.cuda, "is_initialized", lambda: True)  # once CUDA runs, its current device decides
    no_cuda_env.setattr(torch.cuda, "current_device", lambda: 0)
    assert costs.nvml_indices("cuda", nvml) == [2]
    with pytest.raises(ValueError, match=r"cuda:2 is CUDA GPU 2, but only 2 are visible \(CUDA_VISIBLE_DEVICES='2,3'"):
        costs.nvml_indices("cuda:2", nvml)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1,7")
    with pytest.raises(ValueError, match="entry '7' is none of NVML's 4 GPUs"):
        costs.nvml_indices("cuda:1", nvml)


def test_nvml_indices_of_uuids_and_their_prefixes(no_cuda_env):
    nvml = FakeNvml(uuids=UUIDS)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", f"{UUIDS[3]},GPU-5e6f,GPU-0a1b2c3d-1")  # full, prefix, prefix
    assert [costs.nvml_indices(f"cuda:{i}", nvml) for i in range(3)] == [[3], [2], [1]]
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "GPU-0a1b2c3d,GPU-ffff")  # the first two share this prefix
    with pytest.raises(ValueError, match="entry GPU-0a1b2c3d names 2 of NVML's GPUs"):
        costs.nvml_indices("cuda:0", nvml)
    with pytest.raises(ValueError, match="entry GPU-ffff names 0"):
        costs.nvml_indices("cuda:1", nvml)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f1c2d3e-aaaa-5000-9000-000000000000")
    with pytest.raises(ValueError, match="is MIG instance MIG-4f1c.*cover its whole GPU"):
        costs.nvml_indices("cuda:0", nvml)


def test_nvml_indices_refuse_mixed_models_in_fastest_first_order(no_cuda_env):
    nvml = FakeNvml(uuids=UUIDS[:2], names=["NVIDIA A100", "NVIDIA T4"])
    with pytest.raises(ValueError, match=r"GPU models mixed \(NVIDIA A100, NVIDIA T4\).*CUDA_DEVICE_ORDER"):
        costs.nvml_indices("cuda:1", nvml)
    assert costs.nvml_indices("cuda:0", FakeNvml(uuids=UUIDS[:2])) == [0]  # one model: both orders agree
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", UUIDS[1])  # named by UUID: no order involved
    assert costs.nvml_indices("cuda:0", nvml) == [1]
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    no_cuda_env.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA numbers as NVML does
    assert costs.nvml_indices("cuda:0", nvml) == [1]


def test_energy_meter_of_one_device_reads_only_its_gpu(no_cuda_env, tmp_path):
    fake = FakeNvml([30, 50, 70], uuids=UUIDS)
    no_cuda_env.setitem(sys.modules, "pynvml", fake)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with costs.EnergyMeter(interval_s=0.05, device="cuda:1", rapl_root=tmp_path / "none") as meter:
        time.sleep(0.18)
    result = meter.result()
    assert fake.reads == [0, 0, 0, 2]  # NVML GPU 3's counter, at the start and at the end
    assert result["nvml_counter"] == {"kwh": 4 * 360_000 / 3.6e9, "gpus": [UUIDS[3]]}  # 0.4 Wh: GPU 3's step
    n = result["paper_eq4"]["samples"]
    assert meter.samples == [30, 50, 70][:n] + [0] * (n - 3) and n >= 2  # one GPU: one sample per tick


def test_energy_meter_says_why_a_device_was_not_metered(no_cuda_env, tmp_path):
    no_cuda_env.setitem(sys.modules, "pynvml", None)  # a CPU run needs no NVML
    with costs.EnergyMeter(interval_s=60, device=torch.device("cpu"), rapl_root=tmp_path) as meter:
        pass
    assert meter.result()["nvml_counter"] == {"kwh": None, "reason": "no GPU metered: the run is on cpu"}
    no_cuda_env.setitem(sys.modules, "pynvml", FakeNvml())
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f1c2d3e-aaaa-5000-9000-000000000000")
    with costs.EnergyMeter(interval_s=60, device="cuda:0", rapl_root=tmp_path) as meter:
        pass
    result = meter.result()
    assert result["nvml_counter"] == result["paper_eq4"]
    assert result["nvml_counter"]["reason"].startswith("cuda:0 not metered: cuda:0 is MIG instance MIG-4f1c")
    with pytest.raises(ValueError, match="not both"):
        costs.EnergyMeter(gpus=[0], device="cuda:0")


def energy(kwh, gpus=(), host="node-a", seconds=10.0):
    """An EnergyMeter result with the given kWh per source (None: not measured, reason "no <source>")."""
    out = {"seconds": seconds, "interval_s": 60.0, "p0_kw": 0.25}
    for source, value in zip(("nvml_counter", "paper_eq4", "rapl"), kwh, strict=True):
        scope = {"host": host} if source == "rapl" else {"gpus": list(gpus)}
        out[source] = {"kwh": value} | scope if value is not None else {"kwh": None, "reason": f"no {source}"}
    return out


def test_sum_energy_sums_gpus_and_counts_each_machine_once():
    ranks = [energy((0.25, 0.5, 0.0625), ["GPU-a"], "node-a", 10.0),
             energy((0.125, 0.25, 0.125), ["GPU-b"], "node-a", 12.5),  # same machine: RAPL read the same packages
             energy((0.5, 0.125, 0.25), ["GPU-c"], "node-b", 11.0)]
    total = costs.sum_energy(ranks)
    assert (total["seconds"], total["interval_s"], total["p0_kw"]) == (12.5, 60.0, 0.25)
    assert total["nvml_counter"] == {"kwh": 0.875, "ranks": [r["nvml_counter"] for r in ranks]}
    assert total["paper_eq4"]["kwh"] == 0.875
    assert total["rapl"] == {"kwh": 0.125 + 0.25, "hosts": ["node-a", "node-b"], "ranks": [r["rapl"] for r in ranks]}
    assert costs.sum_energy(ranks[:1])["nvml_counter"] == {"kwh": 0.25, "ranks": [ranks[0]["nvml_counter"]]}


def test_sum_energy_gives_reasons_not_partial_sums():
    ranks = [energy((None, 0.5, None), ["GPU-a"]), energy((0.5, 0.5, None), ["GPU-b"]),
             energy((None, 0.25, 0.5), ["GPU-c"])]
    total = costs.sum_energy(ranks)
    assert total["nvml_counter"] == {"kwh": None, "reason": "ranks 0, 2: no nvml_counter",
                                     "ranks": [r["nvml_counter"] for r in ranks]}
    assert total["rapl"]["kwh"] is None and total["rapl"]["reason"] == "ranks 0, 1: no rapl"
    assert total["paper_eq4"]["kwh"] == 1.25
    every_gpu = [energy((0.5, 0.5, 0.5), ["GPU-a", "GPU-b"]), energy((0.5, 0.5, 0.5), ["GPU-a", "GPU-b"])]
    shared = costs.sum_energy(every_gpu)  # each process metered every GPU: a sum would count each twice
    assert shared["nvml_counter"]["kwh"] is None
    assert shared["paper_eq4"]["reason"] == "ranks 0 and 1 both metered GPU-a: a sum would count it twice"
    with pytest.raises(ValueError, match="different"):
        costs.sum_energy([energy((1.0, 1.0, 1.0)), energy((1.0, 1.0, 1.0)) | {"interval_s": 30.0}])
    with pytest.raises(ValueError, match="at least one"):
        costs.sum_energy([])


def test_sum_energy_of_two_metered_processes(no_cuda_env, tmp_path):
    fake = FakeNvml(uuids=UUIDS)
    no_cuda_env.setitem(sys.modules, "pynvml", fake)
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    results = []
    for rank in ("0", "1"):  # torchrun's two processes, metered one after the other
        no_cuda_env.setenv("LOCAL_RANK", rank)
        with costs.EnergyMeter(interval_s=60, device="cuda", rapl_root=tmp_path / "none") as meter:
            pass
        results.append(meter.result())
    total = costs.sum_energy(results)
    assert [r["nvml_counter"]["gpus"] for r in results] == [[UUIDS[1]], [UUIDS[2]]]
    assert [r["kwh"] for r in total["nvml_counter"]["ranks"]] == [2 * 360_000 / 3.6e9, 3 * 360_000 / 3.6e9]
    assert total["nvml_counter"]["kwh"] == pytest.approx(5 * 360_000 / 3.6e9, rel=1e-12)  # 0.5 Wh
    assert total["paper_eq4"]["kwh"] == 0.0  # no sampling tick in so short a run


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


def test_interleaved_latency_takes_turns():
    now, order = [0.0], []
    durations = {"A": [8, 8, 1, 5, 2], "B": [8, 8, 4, 4, 100], "C": [8, 8, 0.5, 0.25, 0.5]}  # 2 warm-up, 3 timed

    def call(name):
        def fn():
            order.append(name)
            now[0] += durations[name].pop(0)  # seconds on the fake clock

        return fn

    result = costs.interleaved_latency({n: call(n) for n in "ABC"}, warmup=2, repeats=3, clock=lambda: now[0])
    assert "".join(order) == "AABBCC" + "ABC" * 3  # each warmed up, then one call of each per round
    assert {n: r["times_s"] for n, r in result.items()} == {"A": [1, 5, 2], "B": [4, 4, 100], "C": [0.5, 0.25, 0.5]}
    assert {n: r["median_s"] for n, r in result.items()} == {"A": 2, "B": 4, "C": 0.5}
    times = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0, 6.0, 10.0])  # an even count: the mean of the middle two
    assert costs.interleaved_latency({"A": lambda: None}, 0, 4, clock=lambda: next(times))["A"]["median_s"] == 2.5


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
    assert out["peak_reserved"] is None and out["reserved_reason"] == "not measured: no caching allocator on cpu"


MIB = 2**20


class FakeCudaAllocator:
    """torch.cuda's memory statistics of a caching allocator that reserves whole 2 MiB blocks and keeps them."""

    def __init__(self, allocated):
        self.allocated = self.peak = allocated
        self.reserved = self.peak_reserved = -(-allocated // (2 * MIB)) * 2 * MIB

    def malloc(self, n):
        self.allocated += n
        self.reserved = max(self.reserved, -(-self.allocated // (2 * MIB)) * 2 * MIB)
        self.peak, self.peak_reserved = max(self.peak, self.allocated), max(self.peak_reserved, self.reserved)

    def free(self, n):
        self.allocated -= n  # the block stays reserved, cached for the next allocation

    def reset_peak_memory_stats(self, device):
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def patch(self, monkeypatch):
        stats = {"memory_allocated": "allocated", "max_memory_allocated": "peak", "memory_reserved": "reserved",
                 "max_memory_reserved": "peak_reserved"}
        for function, attribute in stats.items():
            monkeypatch.setattr(torch.cuda, function, lambda device, a=attribute: getattr(self, a))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset_peak_memory_stats)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)


class OnCuda(nn.Module):
    """A model whose parameters report a GPU (phase_memory reads only their device)."""

    def parameters(self, recurse=True):
        yield types.SimpleNamespace(device=torch.device("cuda", 0))


def test_phase_memory_on_cuda_records_reserved_beside_allocated(monkeypatch):
    gpu = FakeCudaAllocator(1 * MIB)  # the weights
    gpu.patch(monkeypatch)

    def forward():  # 3 MiB of activations, kept for backward only when gradients are on
        gpu.malloc(3 * MIB)
        if not torch.is_grad_enabled():
            gpu.free(3 * MIB)
        return types.SimpleNamespace(backward=lambda: (gpu.free(3 * MIB), gpu.malloc(1 * MIB)))  # + gradients

    out = costs.phase_memory(OnCuda(), forward, types.SimpleNamespace(step=lambda: gpu.malloc(5 * MIB)))
    in_mib = {name: {p: v / MIB for p, v in out[name].items()} for name in ("peak", "after", "peak_reserved")}
    assert in_mib["peak"] == {"weights": 1, "forward_no_grad": 4, "forward": 4, "backward": 4, "optimizer": 7}
    assert in_mib["after"] == {"weights": 1, "forward_no_grad": 1, "forward": 4, "backward": 2, "optimizer": 7}
    # blocks of 2 MiB, never returned: backward holds 2 MiB of tensors in 4 MiB reserved; 7 MiB need 8
    assert in_mib["peak_reserved"] == {"weights": 2, "forward_no_grad": 4, "forward": 4, "backward": 4, "optimizer": 8}
    assert out["source"] == "torch.cuda.max_memory_allocated" and "reserved_reason" not in out


def test_training_memory_records_the_cuda_peaks(monkeypatch):
    layer = nn.Linear(4, 2)  # 10 parameters
    optimizer = torch.optim.AdamW(layer.parameters())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * MIB)
    out = costs.training_memory(layer, optimizer, 64, 2, torch.device("cuda", 0))
    assert (out["cuda_peak_bytes"], out["cuda_peak_reserved_bytes"]) == (3 * MIB, 4 * MIB)
    assert out["accounted_total"] == 40 + 64 + 40 + 0  # no AdamW state before its first step
    on_cpu = costs.training_memory(layer, optimizer, 64, 2, torch.device("cpu"))
    assert on_cpu["cuda_peak_bytes"] is None and on_cpu["cuda_peak_reserved_bytes"] is None
    assert on_cpu["cuda_reason"] == "not measured: the run was on cpu"
