"""bench.host_cpu and bench.device_fields: which processor a CPU benchmark ran on, read from /proc/cpuinfo."""

import jax

from repeat_lm import bench
from repeat_lm.models import cpu_layouts

# Two processors of a KVM guest, as Linux lists them (abridged); the first block names the machine.
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: Other
"""


def test_host_names_the_first_processors_model_family_and_the_cpus_this_process_may_use(tmp_path, monkeypatch):
  (tmp_path / "cpuinfo").write_text(CPUINFO)
  monkeypatch.setattr(cpu_layouts, "listed_cache_bytes", lambda: [48 * 2**10, 2**20, 32 * 2**20])
  monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1})
  assert bench.host_cpu(str(tmp_path / "cpuinfo")) == "AMD EPYC (family 25, model 17), 2 CPUs, 32 MiB last-level cache"


def test_host_without_cpuinfo_or_cache_sizes_falls_back_to_the_platform(tmp_path, monkeypatch):
  monkeypatch.setattr(cpu_layouts, "listed_cache_bytes", lambda: [])
  monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  monkeypatch.setattr(bench.platform, "processor", lambda: "arm")
  assert bench.host_cpu(str(tmp_path / "absent")) == "arm, 4 CPUs"
  (tmp_path / "bare").write_text("processor\t: 0\nmodel name\t: Neoverse\n")  # no family or model line
  assert bench.host_cpu(str(tmp_path / "bare")) == "Neoverse, 4 CPUs"


def test_device_fields_name_the_host_on_cpu_only():
  fields = bench.device_fields()
  assert fields == {"device": f"{jax.device_count()} x cpu", "host": bench.host_cpu()}
  assert bench.device_label(fields) == f"{jax.device_count()} x cpu ({fields['host']})"
  assert bench.device_label({"device": "8 x NVIDIA H100 80GB HBM3"}) == "8 x NVIDIA H100 80GB HBM3"
