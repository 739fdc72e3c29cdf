"""``--precision auto`` on the CPU (simclrv2.utils.precision_probe): flags, decision, cache, and no probe
where bf16 is not native. No test asserts a timing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from simclrv2.config import build_config
from simclrv2.training import runtime
from simclrv2.utils import precision_probe as pp

INTEL_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 avx avx2 fma sha_ni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 i8mm
"""


class Spy:
    """A stand-in for the timing: records each call and returns the given rates."""

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates, self.calls = rates, []

    def __call__(self, shape: pp.ProbeShape) -> tuple[dict[str, float], float]:
        self.calls.append(shape)
        return dict(self.rates), 0.25


SHAPE = pp.ProbeShape(image_size=32, batch_per_core=128, width=1, threads=2)


def test_cpu_flag_parser_reads_the_first_processor_of_sample_cpuinfo():
    intel = pp.parse_cpu_flags(INTEL_BF16)
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= intel and pp.has_native_bf16(intel)
    amd = pp.parse_cpu_flags(AMD_AVX2)
    assert "avx2" in amd and not pp.has_native_bf16(amd)
    assert "asimd" in pp.parse_cpu_flags(ARM) and not pp.has_native_bf16(pp.parse_cpu_flags(ARM))
    assert pp.parse_cpu_flags("") == frozenset() and not pp.has_native_bf16(frozenset())
    assert pp.cpu_model_name(INTEL_BF16).startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert pp.cpu_model_name(ARM) == "unknown"


def test_decision_from_given_rates_prefers_fp32_unless_bf16_is_clearly_faster():
    assert pp.decide({"bf16": 120.0, "fp32": 100.0}) == "bf16"
    assert pp.decide({"bf16": 105.0, "fp32": 100.0}) == "fp32"  # within the margin: fp32 is exact
    assert pp.decide({"bf16": 40.0, "fp32": 100.0}) == "fp32"  # the slow-bf16 host of issue 17
    assert pp.decide({"bf16": 105.0, "fp32": 100.0}, min_speedup=1.0) == "bf16"
    for broken in ({}, {"bf16": 100.0}, {"bf16": float("nan"), "fp32": 1.0}, {"bf16": 5.0, "fp32": 0.0}):
        assert pp.decide(broken) == "fp32"


def test_no_probe_and_no_cache_on_a_cpu_without_native_bf16(tmp_path):
    spy, cache = Spy({"bf16": 999.0, "fp32": 1.0}), tmp_path / "probe.json"
    choice = pp.choose_cpu_precision(SHAPE, cache=cache, cpuinfo=AMD_AVX2, measure=spy)
    assert (choice.precision, spy.calls, choice.probed) == ("fp32", [], False)
    assert not cache.exists()


def test_this_host_probes_only_when_its_real_flags_offer_native_bf16(tmp_path, monkeypatch, capsys):
    """On an AVX2-only host (like the development machine) nothing is measured; on a bf16 host, once."""
    native = pp.has_native_bf16(pp.cpu_flags())
    spy = Spy({"bf16": 300.0, "fp32": 100.0})
    choice = pp.choose_cpu_precision(SHAPE, cache=tmp_path / "probe.json", measure=spy)
    assert len(spy.calls) == (1 if native else 0)
    assert choice.precision == ("bf16" if native else "fp32")
    # the real runtime path, with the real probe where there is one, and its cache under XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = build_config("pretrain", flag_values={"device": "cpu", "image_size": 8, "batch_size": 4,
                                                "arch": "r18_0.25x_sk0"})
    rt = runtime.setup_runtime(cfg)
    printed = capsys.readouterr().out
    assert (tmp_path / "xdg" / "simclrv2" / "precision_probe.json").exists() == native
    assert ("precision auto:" in printed) == native
    if not native:
        assert rt.precision == "fp32"


def test_cache_round_trip_reuses_a_decision_for_the_same_host_torch_and_shape(tmp_path):
    cache = tmp_path / "sub" / "probe.json"
    spy = Spy({"bf16": 150.0, "fp32": 100.0})
    first = pp.choose_cpu_precision(SHAPE, cache=cache, cpuinfo=INTEL_BF16, measure=spy)
    assert (first.precision, first.reason, first.seconds) == ("bf16", "measured", 0.25)
    assert "bf16 150.0 img/s, fp32 100.0 img/s, bf16/fp32 1.50x" in first.describe()
    again = pp.choose_cpu_precision(SHAPE, cache=cache, cpuinfo=INTEL_BF16, measure=spy)
    assert (again.precision, again.images_per_s, len(spy.calls)) == ("bf16", first.images_per_s, 1)
    assert again.reason.startswith("cached")
    payload = json.loads(cache.read_text())
    key = pp.cache_key(SHAPE, INTEL_BF16)
    assert payload["version"] == pp.CACHE_VERSION and payload["entries"][key]["precision"] == "bf16"
    assert torch.__version__ in key and "Xeon" in key
    other = pp.ProbeShape(image_size=224, batch_per_core=64, width=2, threads=2)
    pp.choose_cpu_precision(other, cache=cache, cpuinfo=INTEL_BF16, measure=Spy({"bf16": 1.0, "fp32": 2.0}))
    entries = pp.load_cache(cache)
    assert entries[pp.cache_key(other, INTEL_BF16)]["precision"] == "fp32" and key in entries
    assert [p.name for p in cache.parent.iterdir()] == ["probe.json"]  # no temporary file left


@pytest.mark.parametrize("content", [b"\x00\xff not json {", b'["a list"]', b'{"version": 999, "entries": {}}',
                                     b'{"version": 1, "entries": {"k": {"precision": "fp64"}}}', b""])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, content):
    cache = tmp_path / "probe.json"
    cache.write_bytes(content)
    assert pp.load_cache(cache) == {}
    spy = Spy({"bf16": 50.0, "fp32": 100.0})
    choice = pp.choose_cpu_precision(SHAPE, cache=cache, cpuinfo=INTEL_BF16, measure=spy)
    assert (choice.precision, len(spy.calls)) == ("fp32", 1)
    assert pp.load_cache(cache)[pp.cache_key(SHAPE, INTEL_BF16)]["images_per_s"] == {"bf16": 50.0, "fp32": 100.0}


def test_an_unwritable_cache_keeps_the_decision(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "simclrv2" / "probe.json"
    assert pp.save_cache(cache, {}) is False
    choice = pp.choose_cpu_precision(SHAPE, cache=cache, cpuinfo=INTEL_BF16, measure=Spy({"bf16": 9.0, "fp32": 1.0}))
    assert choice.precision == "bf16"


def test_probe_shape_follows_the_stem_and_caps_the_batch():
    assert pp.ProbeShape(32, 8, threads=1).feature_side == 32
    assert pp.ProbeShape(224, 8, threads=1).feature_side == 56
    small = pp.ProbeShape(8, 3, threads=2)
    assert small.probe_batch == 6  # the run's batch per core x threads, under the FLOP cap
    big = pp.ProbeShape(224, 512, width=2, threads=2)
    assert 1 <= big.probe_batch < 512 * 2
    assert big.probe_batch * big.flops_per_image() <= pp.FLOP_CAP_PER_THREAD * 2


def test_runtime_shape_from_the_config():
    cfg = build_config("pretrain", flag_values={"device": "cpu", "image_size": 32, "batch_size": 512,
                                                "arch": "r50_2x_sk1"})
    shape = runtime.probe_shape(cfg, world_size=2)
    threads = torch.get_num_threads()
    assert (shape.image_size, shape.width, shape.threads) == (32, 2, threads)
    assert runtime.probe_shape(cfg.replace(arch="r18_0.25x_sk0")).width == 0.25
    assert shape.batch_per_core == max(1, 512 // 2 // threads)
    assert runtime.probe_shape(cfg.replace(image_size=None)) is None
    assert runtime.resolve_precision("fp32", torch.device("cpu"), shape) == "fp32"  # requested: no probe


def test_the_real_measurement_returns_both_rates_and_keeps_the_global_rng(one_torch_thread):
    state = torch.get_rng_state()
    rates, seconds = pp.measure_rates(pp.ProbeShape(image_size=8, batch_per_core=2, threads=1), budget_s=0.5)
    assert set(rates) == {"bf16", "fp32"} and all(rate > 0 for rate in rates.values()) and seconds > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert os.path.basename(str(pp.cache_file())) == "precision_probe.json"


def test_with_a_bf16_hosts_flags_the_real_probe_measures_decides_and_caches(tmp_path, one_torch_thread):
    """The whole bf16-host path with the real measurement (here bf16 may be emulated; only the flags are
    the sample's), then the cached answer without a second measurement."""
    shape = pp.ProbeShape(image_size=8, batch_per_core=2, threads=1)
    cache = tmp_path / "probe.json"
    first = pp.choose_cpu_precision(shape, cache=cache, cpuinfo=INTEL_BF16)
    assert first.reason == "measured" and first.precision == pp.decide(first.images_per_s)
    assert first.describe().startswith(first.precision + " (probe: bf16 ") and "measured in" in first.describe()
    second = pp.choose_cpu_precision(shape, cache=cache, cpuinfo=INTEL_BF16,
                                     measure=Spy({"bf16": 1.0, "fp32": 1.0}))
    assert (second.precision, second.images_per_s) == (first.precision, first.images_per_s)
    assert second.seconds is None and second.reason.startswith("cached")
