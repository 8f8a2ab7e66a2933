"""Process settings: XLA flags defer to the user's, and the host allocator is only set for CPU-only glibc runs."""

import ast
import importlib
import os
import pathlib
import platform
import subprocess
import sys

import jax  # noqa: F401  (the re-exec test needs JAX imported: no re-exec may happen then)
import pytest

from repeat_lm import runtime


def test_xla_flags_appended_but_user_value_wins():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  runtime.configure_xla_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *runtime.CPU_FLAGS]
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  runtime.configure_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_host_malloc_only_for_cpu_runs_without_user_settings(monkeypatch):
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(runtime, "accelerator_plugin_installed", lambda: False)
  assert runtime.wants_host_malloc({})
  assert runtime.wants_host_malloc({"JAX_PLATFORMS": "cpu"})
  assert not runtime.wants_host_malloc({"JAX_PLATFORMS": "cuda"})
  assert not runtime.wants_host_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})  # the user's own
  assert not runtime.wants_host_malloc({runtime.HOST_MALLOC_ENV: "0"})  # the opt-out
  monkeypatch.setattr(runtime, "accelerator_plugin_installed", lambda: True)
  assert not runtime.wants_host_malloc({})  # a GPU/TPU plugin: the step does not run on the host
  assert runtime.wants_host_malloc({"JAX_PLATFORMS": "cpu"})


def test_reexecutes_the_same_command_with_tunables_before_jax_only(monkeypatch):
  calls = []
  monkeypatch.setattr(runtime.os, "execve", lambda *a: calls.append(a))
  monkeypatch.setattr(runtime, "wants_host_malloc", lambda env: True)
  runtime.configure_host_allocator()
  assert calls == []  # JAX is imported in this process already: replacing it now would lose its state
  monkeypatch.delitem(sys.modules, "jax")
  runtime.configure_host_allocator()
  (executable, argv, env), = calls
  assert executable == sys.executable and argv == list(sys.orig_argv)
  assert env["GLIBC_TUNABLES"] == runtime.HOST_MALLOC_TUNABLES
  assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == dict(os.environ)


# Prints the VmFlags of the mapping that holds a fresh 64 MB buffer (a bytearray, not numpy, which asks for huge pages
# itself). "hg" there is madvise(MADV_HUGEPAGE), which glibc's hugetlb=1 asks for.
_BUFFER_VMFLAGS = """
import ctypes, re
a = bytearray(b'1') * (64 << 20)
addr = ctypes.addressof((ctypes.c_char * len(a)).from_buffer(a))
inside = False
for line in open('/proc/self/smaps'):
  head = line.split()[0]
  if re.fullmatch('[0-9a-f]+-[0-9a-f]+', head):
    lo, hi = (int(x, 16) for x in head.split('-'))
    inside = lo <= addr < hi
  elif inside and head == 'VmFlags:':
    print(line.split()[1:])
"""


def test_the_tunables_ask_for_huge_pages_for_the_heap():
  """glibc takes the hugetlb=1 of HOST_MALLOC_TUNABLES (it would ignore a misspelt name silently): a child process
  started with them has its heap advised for transparent huge pages, one started without them does not. The advice,
  not the huge pages themselves, is checked: how many the kernel grants depends on how fragmented the machine's
  memory is (22 of 64 MB on one busy CI machine, all 64 on an idle one)."""
  thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  libc, version = platform.libc_ver()
  if not thp.exists() or "[madvise]" not in thp.read_text():
    # In "always" mode glibc does not advise (the kernel already backs the heap with huge pages), in "never" no one can.
    pytest.skip(f"glibc asks for huge pages only when the kernel's mode is madvise, here: {thp.read_text().strip()}")
  if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
    pytest.skip(f"glibc.malloc.hugetlb needs glibc >= 2.35, this is {libc} {version}")

  def vmflags(tunables):
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    out = subprocess.run([sys.executable, "-c", _BUFFER_VMFLAGS], env=env, capture_output=True,
                         text=True, check=True).stdout
    return ast.literal_eval(out)

  assert "hg" in vmflags(runtime.HOST_MALLOC_TUNABLES)
  assert "hg" not in vmflags(runtime.HOST_MALLOC_TUNABLES.replace(":glibc.malloc.hugetlb=1", ""))


def test_python_m_train_gets_the_host_allocator_like_the_command_line():
  # README: `python -m repeat_lm.train ...` is the same command as `repeat-lm train ...`.
  code = ("import runpy, sys; from repeat_lm import runtime; "
          "runtime.configure_host_allocator = lambda: print('HOST_ALLOCATOR'); "
          "sys.argv = ['repeat_lm.train', '--help']; runpy.run_module('repeat_lm.train', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "HOST_ALLOCATOR" in out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_host_malloc_needs_glibc(monkeypatch):
  # GLIBC_TUNABLES is glibc's: under musl (Alpine) the re-execution would only cost a second start-up.
  monkeypatch.setattr(runtime, "accelerator_plugin_installed", lambda: False)
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
  assert not runtime.wants_host_malloc({"JAX_PLATFORMS": "cpu"})


def test_accelerator_plugins_are_found_as_jax_finds_them(tmp_path, monkeypatch):
  """GPU plugins are modules of the jax_plugins namespace package (jax[cuda12] installs jax_plugins/xla_cuda12), TPUs
  have the libtpu module; an empty namespace is no plugin."""
  for name in ("jax_plugins", "libtpu"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  monkeypatch.setattr(sys, "path", [str(tmp_path)])
  (tmp_path / "jax_plugins").mkdir()
  importlib.invalidate_caches()
  assert not runtime.accelerator_plugin_installed()
  (tmp_path / "jax_plugins" / "xla_cuda12").mkdir()
  (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
  importlib.invalidate_caches()
  assert runtime.accelerator_plugin_installed()
  (tmp_path / "tpu").mkdir()
  (tmp_path / "tpu" / "libtpu").mkdir()
  (tmp_path / "tpu" / "libtpu" / "__init__.py").write_text("")
  monkeypatch.setattr(sys, "path", [str(tmp_path / "tpu")])
  importlib.invalidate_caches()
  assert runtime.accelerator_plugin_installed()


def test_child_commands_run_the_installed_repeat_lm_not_one_in_the_working_directory(tmp_path):
  # `python -m` puts the working directory first on the module path: launch-local, the local sweep and bench report
  # started from a folder holding another `repeat_lm/` (an old clone) ran its code in their children.
  (tmp_path / "repeat_lm").mkdir()
  (tmp_path / "repeat_lm" / "__init__.py").write_text("")
  (tmp_path / "repeat_lm" / "cli.py").write_text("import sys; print('SHADOW'); sys.exit(3)")
  out = subprocess.run(runtime.cli_command("--help"), cwd=tmp_path, env=runtime.child_env(), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and "SHADOW" not in out.stdout and "usage: repeat-lm" in out.stdout
  # The parent's own repeat_lm, where that is a checkout: with -P alone, a checkout run with a bare python3 (no
  # install) left its children without any.
  root = str(pathlib.Path(runtime.__file__).resolve().parents[1])
  assert runtime.child_env({"PYTHONPATH": "/x"})["PYTHONPATH"] == os.pathsep.join([root, "/x"])
