"""benchmarks/gpu_check.sh: every part runs in its reduced --cpu-smoke form, so the GPU check cannot rot before a
GPU runs it; and the search for the largest micro-batch steps down past out-of-memory."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_largest_fitting_steps_down_until_one_fits():
    gpu_bench = load_gpu_bench()
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 48

    assert gpu_bench.largest_fitting(fits, [128, 96, 64, 48, 32]) == (48, ["128 oom", "96 oom", "64 oom", "48 ok"])
    assert tried == [128, 96, 64, 48]
    assert gpu_bench.largest_fitting(lambda m: False, [4, 2]) == (None, ["4 oom", "2 oom"])


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = (tmp_path / "cpu-smoke.md").read_text()
    first = report.splitlines()[0]
    assert re.fullmatch(r"gpu_check --cpu-smoke on cpu \(.*\): tests, throughput, largest, esd, run, memory, fsdp in "
                        r"[\d.]+ min \(tests \d+ s, throughput \d+ s, largest \d+ s, esd \d+ s, run \d+ s, "
                        r"memory \d+ s, fsdp \d+ s\); all checks passed", first), first
    assert report in done.stdout
    assert re.search(r"`pytest -m gpu tests/test_gpu.py tests/test_gpu_speed.py`: \d+ skipped", report)
    throughput = re.findall(r"^\| 1m \| 4 \| (eager|compiled) \| (full|chunked 48) \| ([\d,]+) \|", report, re.M)
    assert sorted((c, loss) for c, loss, _ in throughput) == [("compiled", "chunked 48"), ("compiled", "full"),
                                                              ("eager", "chunked 48"), ("eager", "full")]
    assert re.search(r"^\| full \| 8 \| 8 ok \| [\d,]+ \|", report, re.M)
    assert re.search(r"^\| 1m \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d\.\de-\d\d \|", report, re.M)
    farms = re.findall(r"^\| 1m \| (\d+)x(\d+) \| (\d+) \| (\d+) → (\d+) \|", report, re.M)  # 2 layers, 64|176
    assert farms == [("64", "64", "7", "1", "1"), ("176", "64", "4", "15", "15"), ("64", "176", "2", "15", "15")]
    assert re.search(r"^\| 1m \| tuned set \| 13 \| 97 → 97 \| [\d.]+ → [\d.]+ \(estimated\) \| \|", report, re.M)
    assert "Loss fell by more than 0: yes." in report
    assert re.search(r"^\| build llama_1m, bf16 on meta \| host peak \| .* \| random stream \(meta: no values\) "
                     r"identical: yes \|$", report, re.M)
    assert len(re.findall(r"^\| (resume llama_1m .* to cpu|DDP llama_1m, 2 micro-batch\(es\) of 2 x 32) \| "
                          r"[^|]+ \| [\d,]+ MiB[^|]* \| [\d,]+ MiB[^|]* \| [\d.]+ \| \|$", report, re.M)) == 3
    assert re.search(r"^\| fsdp \| 1 \| — \| [\d.]+ \| [\d,]+ \|$", report, re.M)
    assert re.search(r"max relative alpha difference from the whole weights \d\.\de[-+]\d\d\. DCP checkpoint: save", report)
