"""amp=bf16 on a CPU without native bf16 warns with the measured cost and says so in the run's
config; the hardware answer is forced through $MSDN_CPU_BF16 (the real detection runs otherwise)."""
import json
import os
import subprocess

import pytest
import torch

from pipeline.precision import SlowPrecisionWarning, choose_amp, cpu_bf16
from tests.fixtures.caches import write_tiny_cache

CPU = torch.device("cpu")


def test_bf16_on_an_emulating_cpu_warns_with_the_measured_reason():
    with pytest.warns(SlowPrecisionWarning, match="6x slower than float32"):
        choice = choose_amp("bf16", CPU, force_cpu_bf16="emulated")
    assert choice.amp == "bf16" and "emulated" in choice.reason


def test_bf16_on_a_native_cpu_and_auto_do_not_warn(recwarn):
    assert choose_amp("bf16", CPU, force_cpu_bf16="native").amp == "bf16"
    auto = choose_amp("auto", CPU, force_cpu_bf16="emulated")
    assert auto.amp == "none" and "emulated" in auto.reason
    assert not [w for w in recwarn if issubclass(w.category, SlowPrecisionWarning)]


def test_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert cpu_bf16().native == native


def test_msdn_train_amp_bf16_on_a_forced_emulating_cpu_warns_and_records_it(tmp_path):
    cache = write_tiny_cache(tmp_path / "tiny.h5")
    done = subprocess.run(["msdn", "train", "--recipe", "demo", "--cache", str(cache), "--out", "run",
                           "--device", "cpu", "--set", "amp=bf16", "--set", "selection=fixed",
                           "--set", "iterations=2", "--set", "batch_size=8", "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "MSDN_CPU_BF16": "emulated"})
    assert done.returncode == 0, done.stderr
    assert "SlowPrecisionWarning" in done.stderr and "6x slower" in done.stderr
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert run["amp"] == "bf16" and "emulated" in run["amp_choice"]["reason"]


def test_a_bad_override_is_one_clear_line(tmp_path):
    cache = write_tiny_cache(tmp_path / "tiny.h5")
    done = subprocess.run(["msdn", "train", "--recipe", "demo", "--cache", str(cache), "--out", "run",
                           "--device", "cpu", "--set", "amp=bf16", "--quiet"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**os.environ, "MSDN_CPU_BF16": "maybe"})
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: $MSDN_CPU_BF16 must be 'native' or 'emulated', got 'maybe'"
