"""The CPU backward passes of cpu_layouts.py against plain autodiff, alone and inside MultiHeadAttention/MlpBlock,
and the property they exist for: no dot of the compiled gradient is left outside XLA:CPU's library fusions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.models import attention as attention_lib
from repeat_lm.models import cpu_layouts, layers

KEYS = jax.random.split(jax.random.key(0), 8)


def _grads(f, *args):
  """f's value and its gradients with respect to every argument, through a random linear read-out."""
  out = f(*args)
  probe = jax.random.normal(KEYS[7], out.shape, out.dtype)
  return out, jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=tuple(range(len(args))))(*args)


def _assert_close(got, want, rtol=2e-5, atol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_matmul_equals_autodiff_for_batched_inputs():
  x = jax.random.normal(KEYS[0], (3, 5, 16))
  kernel = jax.random.normal(KEYS[1], (16, 24))
  _assert_close(_grads(cpu_layouts.matmul, x, kernel), _grads(lambda a, b: a @ b, x, kernel))


def _plain_weights(q, k, bias, mask):
  logits = jnp.einsum("bhqe,bhke->bhqk", q, k)
  logits = logits if bias is None else logits + bias
  logits = logits if mask is None else logits + mask
  return jax.nn.softmax(logits, axis=-1)


@pytest.mark.parametrize("with_bias, with_mask", [(True, True), (False, True), (True, False), (False, False)])
def test_attention_weights_and_values_equal_autodiff(with_bias, with_mask):
  b, h, q_len, k_len, e = 2, 3, 7, 9, 8
  q = jax.random.normal(KEYS[0], (b, h, q_len, e))
  k = jax.random.normal(KEYS[1], (b, h, k_len, e))
  v = jax.random.normal(KEYS[2], (b, h, k_len, e))
  bias = jax.random.normal(KEYS[3], (1, h, q_len, k_len)) if with_bias else None
  valid = jax.random.bernoulli(KEYS[4], 0.7, (b, 1, q_len, k_len)).at[..., 0].set(True)
  mask = jnp.where(valid, 0.0, attention_lib.NEG_INF) if with_mask else None

  def ours(q, k, v, *bias):
    return cpu_layouts.attention_values(cpu_layouts.attention_weights(q, k, *(bias or (None,)), mask), v)

  def plain(q, k, v, *bias):
    return jnp.einsum("bhqk,bhke->bhqe", _plain_weights(q, k, *(bias or (None,)), mask), v)

  args = (q, k, v) + ((bias,) if with_bias else ())
  got, want = _grads(ours, *args), _grads(plain, *args)
  _assert_close(got, want)
  if with_bias:  # the bias gradient is the batch sum of the logits gradients
    assert got[1][3].shape == (1, h, q_len, k_len)


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_attention_layer_is_the_same_on_both_paths(monkeypatch, dropout_rate):
  """MultiHeadAttention with the CPU backward passes against autodiff's: output and every gradient, dropout too."""
  b, q_len, d = 2, 6, 32
  x = jax.random.normal(KEYS[0], (b, q_len, d))
  bias = jax.random.normal(KEYS[1], (1, 4, q_len, q_len))
  mask = attention_lib.make_attention_mask(jnp.ones((b, q_len), bool), jnp.arange(q_len)[None] < jnp.array([[6], [4]]))
  module = attention_lib.MultiHeadAttention(num_heads=4, head_dim=8, dropout_rate=dropout_rate)
  params = module.init(KEYS[2], x, x, bias, mask, True)
  rngs = {"dropout": KEYS[3]}
  run = lambda p, x, bias: module.apply(p, x, x, bias, mask, dropout_rate == 0.0, rngs=rngs)

  assert cpu_layouts.explicit_transposes()  # tests run on CPU
  ours = _grads(run, params, x, bias)
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  _assert_close(ours, _grads(run, params, x, bias))


def test_bfloat16_logits_take_the_plain_path_on_cpu_too(monkeypatch):
  """float32_logits=False rounds q.k to bfloat16 (T5X's option); the float32 CPU core must not quietly skip that."""
  b, q_len, d = 2, 6, 32
  x = jax.random.normal(KEYS[0], (b, q_len, d)).astype(jnp.bfloat16)
  bias = jax.random.normal(KEYS[1], (1, 4, q_len, q_len))
  module = attention_lib.MultiHeadAttention(num_heads=4, head_dim=8, dtype=jnp.bfloat16, float32_logits=False)
  params = module.init(KEYS[2], x, x, bias, None, True)
  run = jax.jit(lambda p: module.apply(p, x, x, bias, None, True).astype(jnp.float32))
  ours = run(params)
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  np.testing.assert_array_equal(ours, jax.jit(lambda p: module.apply(p, x, x, bias, None, True).astype(
      jnp.float32))(params))


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_attention_in_batch_slices_is_the_same_layer(monkeypatch, dropout_rate):
  """Two batch slices give the one-piece layer's output and gradients (the bias's is summed over both); with
  attention dropout the layer stays in one piece, so its mask is drawn as on every other path."""
  b, q_len, d, heads = 4, 6, 32, 4
  x = jax.random.normal(KEYS[0], (b, q_len, d))
  bias = jax.random.normal(KEYS[1], (1, heads, q_len, q_len))
  lengths = jnp.array([[6], [4], [5], [2]])
  mask = attention_lib.make_attention_mask(jnp.ones((b, q_len), bool), jnp.arange(q_len)[None] < lengths)
  module = attention_lib.MultiHeadAttention(num_heads=heads, head_dim=8, dropout_rate=dropout_rate)
  params = module.init(KEYS[2], x, x, bias, mask, True)
  run = lambda p, x, bias: module.apply(p, x, x, bias, mask, dropout_rate == 0.0, rngs={"dropout": KEYS[3]})
  logits_type = lambda rows: f"tensor<{rows}x{heads}x{q_len}x{q_len}xf32>"
  program = lambda: jax.jit(lambda *a: run(*a)).lower(params, x, bias).as_text()  # a new function: traced anew

  monkeypatch.setattr(cpu_layouts, "attention_batch_chunks", lambda *shape: 2)
  sliced = _grads(run, params, x, bias)
  assert (logits_type(b // 2) in program()) == (dropout_rate == 0.0)
  monkeypatch.setattr(cpu_layouts, "attention_batch_chunks", lambda *shape: 1)
  assert logits_type(b // 2) not in program()
  _assert_close(sliced, _grads(run, params, x, bias))


def test_batch_slice_gradients_are_joined_not_padded_and_added():
  x = jax.random.normal(KEYS[0], (8, 6, 4))
  weights = jax.random.normal(KEYS[1], (4, 6, 4))  # a different function of each slice
  plain_slices = lambda x: tuple(x[i:i + 2] for i in range(0, 8, 2))
  per_slice = lambda slices: jnp.concatenate([jnp.sin(s) * w for s, w in zip(slices, weights)])
  ours, plain = (lambda x: per_slice(cpu_layouts.batch_slices(x, 2))), (lambda x: per_slice(plain_slices(x)))
  assert [s.shape for s in cpu_layouts.batch_slices(x, 2)] == [(2, 6, 4)] * 4
  _assert_close(_grads(ours, x), _grads(plain, x), rtol=0, atol=0)
  assert " pad(" in _compiled_gradient(plain, x)  # autodiff: each slice's gradient zero-padded, then summed
  assert " pad(" not in _compiled_gradient(ours, x)


def test_attention_batch_slices_fit_half_the_last_level_cache(monkeypatch):
  monkeypatch.setattr(cpu_layouts, "last_level_cache_bytes", lambda: 32 * 2**20)
  chunks = cpu_layouts.attention_batch_chunks
  assert chunks(8, 6, 512, 512) == 4  # T5-small's encoder: 6 MB of logits per row, two rows per slice
  assert chunks(16, 6, 512, 512) == 8
  assert chunks(8, 6, 114, 512) == 1  # 11 MB in all: one piece
  assert chunks(4, 16, 512, 512) == 1  # a row alone fills the half: no slice of two rows fits
  assert chunks(7, 6, 512, 512) == 1  # no divisor of 7 fits
  # More than MAX_ATTENTION_CHUNKS slices: the whole batch (each slice is compiled on its own; batch 128 made 64)
  assert cpu_layouts.MAX_ATTENTION_CHUNKS == 8 and chunks(32, 6, 512, 512) == 1 and chunks(8192, 4, 512, 512) == 1
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    assert chunks(8, 6, 512, 512) == 4
  with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
    assert chunks(8, 6, 512, 512) == 1  # a sharded batch is left to the partitioner
  monkeypatch.setenv(cpu_layouts.ATTENTION_CHUNKS_ENV, "0")
  assert chunks(8, 6, 512, 512) == 1


def test_last_level_cache_is_the_largest_size_the_kernel_lists(tmp_path):
  def cache_dir(name, sizes):
    for index, size in enumerate(sizes):
      (tmp_path / name / f"index{index}").mkdir(parents=True)
      (tmp_path / name / f"index{index}" / "size").write_text(size + "\n")
    return str(tmp_path / name)

  zen = cache_dir("zen", ["48K", "32K", "1024K", "32768K", "unknown"])  # L1d, L1i, L2, L3, and an unreadable size
  assert cpu_layouts.last_level_cache_bytes(zen) == 32 * 2**20
  assert cpu_layouts.last_level_cache_bytes(cache_dir("mega", ["2M", "64M"])) == 64 * 2**20
  assert cpu_layouts.last_level_cache_bytes(str(tmp_path / "absent")) == cpu_layouts.DEFAULT_CACHE_BYTES
  assert cpu_layouts.listed_cache_bytes(zen) == [48 * 2**10, 32 * 2**10, 2**20, 32 * 2**20]
  assert cpu_layouts.listed_cache_bytes(str(tmp_path / "absent")) == []  # a report then names no cache size


def test_mlp_block_is_the_same_on_both_paths(monkeypatch):
  x = jax.random.normal(KEYS[0], (2, 5, 16))
  module = layers.MlpBlock(mlp_dim=24)
  params = module.init(KEYS[1], x, True)
  run = lambda p, x: module.apply(p, x, True)
  ours = _grads(run, params, x)
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  _assert_close(ours, _grads(run, params, x))


def test_rms_norm_is_the_same_on_both_paths(monkeypatch):
  x = jax.random.normal(KEYS[0], (2, 5, 16)) * 3.0
  norm = layers.RMSNorm()
  params = {"params": {"scale": jax.random.uniform(KEYS[1], (16,), minval=0.5, maxval=2.0)}}
  run = lambda p, x: norm.apply(p, x)
  ours = _grads(run, params, x)
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  _assert_close(ours, _grads(run, params, x))


def _full_size_arrays(program: str, shape: str) -> list[str]:
  """The top-level instructions of a compiled program that make an array of `shape` (parameters left out)."""
  entry = program[program.index("ENTRY"):].splitlines()[1:]
  return [line.split(" = ")[0].strip() for line in entry
          if " = " in line and line.split(" = ")[1].startswith(shape) and " parameter(" not in line]


def test_rms_norm_backward_materialises_only_the_input_gradient(monkeypatch):
  """The backward pass sums g * x by dots: no broadcast of the scale or the row statistic at x's shape is stored
  (autodiff's form stores three such arrays besides the input gradient)."""
  x = jax.random.normal(KEYS[0], (4, 64, 32))
  norm = layers.RMSNorm()
  params = norm.init(KEYS[1], x)
  program = lambda: jax.jit(jax.grad(lambda p, x: jnp.sum(norm.apply(p, x) ** 2), (0, 1))).lower(
      params, x).compile().as_text()
  assert len(_full_size_arrays(program(), "f32[4,64,32]")) == 1
  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  assert len(_full_size_arrays(program(), "f32[4,64,32]")) >= 3


def test_layers_share_one_joined_bias_and_mask():
  """Two layers with the same bias and mask add one stored [B, H, Q, K] array (their sum, computed once) to their
  logits, not the broadcast bias and the broadcast mask each."""
  b, h, q_len, e = 2, 4, 32, 16
  q, k = (jax.random.normal(key, (b, h, q_len, e)) for key in KEYS[:2])
  bias = jax.random.normal(KEYS[2], (1, h, q_len, q_len))
  mask = jnp.where(jax.random.bernoulli(KEYS[3], 0.8, (b, 1, q_len, q_len)), 0.0, attention_lib.NEG_INF)

  def two_layers(q, k, bias, mask):
    first = cpu_layouts.attention_weights(q, k, bias, mask)
    return cpu_layouts.attention_weights(first[..., :e] + q, k, bias, mask)

  entry = jax.jit(two_layers).lower(q, k, bias, mask).compile().as_text().split("ENTRY")[1].splitlines()[1:]
  name = lambda index: next(line.split(" = ")[0].strip() for line in entry if f" parameter({index})" in line)
  readers = lambda param: [line.split(" = ")[0] for line in entry
                           if re.search(re.escape(param) + r"[,)]", line) and " parameter(" not in line]
  assert readers(name(2)) == readers(name(3)) and len(readers(name(2))) == 1  # one join, which both layers read
  np.testing.assert_allclose(two_layers(q, k, bias, mask),
                             _plain_weights(_plain_weights(q, k, bias, mask)[..., :e] + q, k, bias, mask),
                             rtol=1e-6, atol=1e-6)


def _compiled_gradient(f, *args) -> str:
  """The compiled CPU program (HLO text) of the gradient of sum(f(*args)^2) with respect to every argument."""
  return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args))))).lower(
      *args).compile().as_text()


def _top_level_dots(f, *args) -> int:
  """Dots of f's compiled CPU gradient that no library fusion took (XLA:CPU runs those with Eigen)."""
  hlo = _compiled_gradient(f, *args)
  return hlo[hlo.index("ENTRY"):].count(" dot(")


def test_every_backward_dot_is_in_a_library_fusion():
  x = jax.random.normal(KEYS[0], (4, 32, 64))
  kernel = jax.random.normal(KEYS[1], (64, 96))
  assert _top_level_dots(lambda a, b: a @ b, x, kernel) >= 1  # autodiff's weight gradient: x^T g
  assert _top_level_dots(cpu_layouts.matmul, x, kernel) == 0

  q, k, v = (jax.random.normal(key, (2, 4, 64, 16)) for key in KEYS[2:5])
  plain = lambda q, k, v: jnp.einsum("bhqk,bhke->bhqe", _plain_weights(q, k, None, None), v)
  ours = lambda q, k, v: cpu_layouts.attention_values(cpu_layouts.attention_weights(q, k, None, None), v)
  assert _top_level_dots(plain, q, k, v) >= 1  # p^T do and ds^T q
  assert _top_level_dots(ours, q, k, v) == 0


def test_attention_backward_transposes_no_weights_sized_array():
  """The key and value gradients transpose the [Q, E] and [E, K] sides, never a [Q, K] one (cpu_layouts.py)."""
  b, h, q_len, k_len, e = 2, 4, 48, 64, 16
  q = jax.random.normal(KEYS[0], (b, h, q_len, e))
  k, v = (jax.random.normal(key, (b, h, k_len, e)) for key in KEYS[1:3])
  transposed_weights = f"f32[{b},{h},{k_len},{q_len}]"  # what transposed(weights) or transposed(ds) would make
  old_form = lambda p, g: jnp.matmul(cpu_layouts.transposed(p), g)  # weights^T g through the big transpose
  assert transposed_weights in _compiled_gradient(old_form, jax.random.normal(KEYS[3], (b, h, q_len, k_len)), q)
  ours = lambda q, k, v: cpu_layouts.attention_values(cpu_layouts.attention_weights(q, k, None, None), v)
  assert transposed_weights not in _compiled_gradient(ours, q, k, v)


def _transposes_with_arithmetic(f, *args) -> int:
  """Fusions of f's compiled CPU gradient that transpose and also compute (multiply or add) on the way."""
  hlo = _compiled_gradient(f, *args)
  computations = hlo[:hlo.index("ENTRY")].split("\n\n")
  return sum(" transpose(" in c and (" multiply(" in c or " add(" in c) for c in computations)


def test_weight_gradient_transposes_a_materialised_input(monkeypatch):
  """A normalised input's transpose reads the stored values: XLA would otherwise redo the scaling inside it."""
  x = jax.random.normal(KEYS[0], (4, 64, 32))
  scale = jax.random.normal(KEYS[1], (32,))
  kernel = jax.random.normal(KEYS[2], (32, 48))

  def normed_projection(x, scale, kernel):
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale
    return cpu_layouts.matmul(normed, kernel)

  assert _transposes_with_arithmetic(normed_projection, x, scale, kernel) == 0
  ours = _grads(normed_projection, x, scale, kernel)
  monkeypatch.setattr(cpu_layouts, "materialised", lambda y: y)
  assert _transposes_with_arithmetic(normed_projection, x, scale, kernel) >= 1  # what the barrier prevents
  _assert_close(ours, _grads(normed_projection, x, scale, kernel))


@pytest.mark.parametrize("x_shape, kernel_shape", [((3, 40, 32), (32, 8)), ((3, 2, 20, 32), (3, 32, 8))])
def test_kernel_gradient_of_a_wide_input_transposes_the_gradient(x_shape, kernel_shape):
  """An input at least twice as wide as its gradient ([N, I] against [N, O]): (g^T x)^T, whose transposes move
  N x O + O x I values, not x^T g's N x I; the same values as autodiff, every dot still in a library fusion."""
  x, kernel = jax.random.normal(KEYS[0], x_shape), jax.random.normal(KEYS[1], kernel_shape)
  experts = len(kernel_shape) - 2
  plain = (lambda a, b: a @ b) if not experts else (lambda a, b: jnp.einsum("egci,eio->egco", a, b))
  _assert_close(_grads(cpu_layouts.matmul, x, kernel), _grads(plain, x, kernel), rtol=1e-4, atol=1e-4)
  assert _top_level_dots(cpu_layouts.matmul, x, kernel) == 0
  lead, n, (i, o) = x_shape[:experts], int(np.prod(x_shape[experts:-1])), kernel_shape[-2:]
  shape = lambda *dims: "f32[" + ",".join(map(str, (*lead, *dims))) + "]"
  program = _compiled_gradient(cpu_layouts.matmul, x, kernel)
  assert shape(i, n) not in program  # x^T: what the narrow form transposes
  assert shape(o, n) in program  # g^T
  narrow_form = lambda x, g: jnp.matmul(cpu_layouts.transposed(x.reshape(*lead, n, i)), g.reshape(*lead, n, o))
  assert shape(i, n) in _compiled_gradient(narrow_form, x, jax.random.normal(KEYS[2], (*x_shape[:-1], o)))


def test_kernel_gradient_of_an_input_less_than_twice_as_wide_transposes_the_input():
  """The query, key and value projections (512 -> 384) share one transposed input: they keep x^T g."""
  x, kernel = jax.random.normal(KEYS[0], (3, 40, 32)), jax.random.normal(KEYS[1], (32, 24))
  assert "f32[32,120]" in _compiled_gradient(cpu_layouts.matmul, x, kernel)


def test_kernel_gradient_of_a_wide_bfloat16_input_transposes_the_input():
  """bfloat16 operands keep x^T g (measured slower the other way, cpu_layouts._kernel_gradient)."""
  x = jax.random.normal(KEYS[0], (3, 40, 32), jnp.bfloat16)
  kernel = jax.random.normal(KEYS[1], (32, 8), jnp.bfloat16)
  program = _compiled_gradient(lambda a, b: cpu_layouts.matmul(a, b).astype(jnp.float32), x, kernel)
  assert "bf16[32,120]" in program


def test_opt_out_restores_autodiff(monkeypatch):
  assert cpu_layouts.explicit_transposes()
  monkeypatch.setenv(cpu_layouts.CPU_LAYOUTS_ENV, "0")
  assert not cpu_layouts.explicit_transposes()


def test_matmul_batched_over_experts_equals_autodiff():
  x = jax.random.normal(KEYS[0], (3, 2, 5, 16))
  kernel = jax.random.normal(KEYS[1], (3, 16, 24))
  plain = lambda a, b: jnp.einsum("egci,eio->egco", a, b)
  _assert_close(_grads(cpu_layouts.matmul, x, kernel), _grads(plain, x, kernel))
  assert _top_level_dots(plain, x, kernel) >= 1
  assert _top_level_dots(cpu_layouts.matmul, x, kernel) == 0


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in compiled HLO text, looked up in the computation that holds it."""
  found = []
  for computation in hlo.split("\n\n"):
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
    for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
      found.append((types.get(lhs, "?"), types.get(rhs, "?")))
  return found


def test_bfloat16_dots_keep_bfloat16_operands(monkeypatch):
  """Every dot of a bfloat16 projection's and attention core's gradient multiplies bfloat16 (float32 accumulation):
  XLA's operand upcaster turned a dot whose operand was a column-major transpose into a float32 one, at about half
  the speed on CPUs with bfloat16 dot instructions (cpu_layouts.transposed)."""
  x = jax.random.normal(KEYS[0], (4, 32, 64), jnp.bfloat16)
  kernel = jax.random.normal(KEYS[1], (64, 96), jnp.bfloat16)
  q, k, v = (jax.random.normal(key, (2, 4, 64, 16), jnp.bfloat16) for key in KEYS[2:5])
  core = lambda q, k, v: cpu_layouts.attention_values(
      cpu_layouts.attention_weights(q, k, None, None).astype(jnp.bfloat16), v)
  for f, args in ((cpu_layouts.matmul, (x, kernel)), (core, (q, k, v))):
    dots = _dot_operand_dtypes(_compiled_gradient(lambda *a, f=f: f(*a).astype(jnp.float32), *args))
    assert dots and set(dots) == {("bf16", "bf16")}, dots
  # The transpose without its unit axis (a column-major copy): the weight gradient's dot goes to float32.
  monkeypatch.setattr(cpu_layouts, "transposed",
                      lambda y: jax.lax.optimization_barrier(jnp.swapaxes(y, -1, -2)))
  dots = _dot_operand_dtypes(_compiled_gradient(lambda *a: cpu_layouts.matmul(*a).astype(jnp.float32), x, kernel))
  assert ("f32", "f32") in dots, dots


def test_swapped_heads_is_a_swap_both_ways():
  x = jax.random.normal(KEYS[0], (2, 5, 3, 4))  # [B, L, H, E]
  assert cpu_layouts.swapped_heads(x).shape == (2, 3, 5, 4)
  plain = lambda x: jnp.sin(jnp.swapaxes(x, 1, 2))
  _assert_close(_grads(lambda x: jnp.sin(cpu_layouts.swapped_heads(x)), x), _grads(plain, x), rtol=0, atol=0)


def test_bfloat16_attention_layer_dots_keep_bfloat16_operands(monkeypatch):
  """Inside MultiHeadAttention too: the core's heads-major operands, and the gradients that come back to it, are
  row-major copies (cpu_layouts.swapped_heads), so no dot of the layer's gradient is upcast to float32."""
  x = jax.random.normal(KEYS[0], (2, 64, 32), jnp.bfloat16)
  module = attention_lib.MultiHeadAttention(num_heads=4, head_dim=16, dtype=jnp.bfloat16)
  params = module.init(KEYS[2], x, x, None, None, True)
  run = lambda p, x: module.apply(p, x, x, None, None, True).astype(jnp.float32)
  operand_types = lambda: set(_dot_operand_dtypes(_compiled_gradient(run, params, x)))
  assert operand_types() == {("bf16", "bf16")}
  # A plain swap (a relabelling XLA lays out column-major) sends the core's dots to float32.
  monkeypatch.setattr(cpu_layouts, "swapped_heads", lambda y: jnp.swapaxes(y, 1, 2))
  assert ("f32", "f32") in operand_types()


@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_attention_core_is_close_to_float32(with_bias):
  """bfloat16 operands, float32 accumulation and softmax, bfloat16 weights and logits gradient: within bfloat16
  rounding of the float32 computation, the (float32) bias's batch-summed gradient included."""
  q, k, v = (jax.random.normal(key, (2, 4, 64, 16)) for key in KEYS[2:5])
  q = q / 4.0  # unit-variance logits, as T5's query initialisation gives (1/sqrt(head_dim))
  bias = (jax.random.normal(KEYS[5], (1, 4, 64, 64)),) if with_bias else ()
  valid = jax.random.bernoulli(KEYS[6], 0.8, (2, 1, 64, 64)).at[..., 0].set(True)
  mask = jnp.where(valid, 0.0, attention_lib.NEG_INF)
  core = lambda q, k, v, *bias: cpu_layouts.attention_values(
      cpu_layouts.attention_weights(q, k, *(bias or (None,)), mask).astype(v.dtype), v)
  want = _grads(core, q, k, v, *bias)
  got = _grads(core, *(a.astype(jnp.bfloat16) for a in (q, k, v)), *bias)
  assert got[0].dtype == jnp.float32  # the product comes back in float32; the layer rounds it once moved
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9): errors of a few roundings, relative to the scale.
    assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) < 0.02 * float(jnp.max(jnp.abs(w)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_attention_weights_are_kept_for_the_backward_pass_in_the_operands_dtype(dtype):
  """The [B, H, Q, K] weights come back, and are what the backward pass keeps, in q and k's dtype: half of float32's
  memory and traffic with bfloat16 activations. The float32 bias still gets a float32 gradient."""
  q, k = (jax.random.normal(key, (2, 4, 64, 16), dtype) for key in KEYS[2:4])
  bias = jax.random.normal(KEYS[5], (1, 4, 64, 64))
  weights, backward = jax.vjp(lambda q, k, bias: cpu_layouts.attention_weights(q, k, bias, None), q, k, bias)
  assert weights.dtype == dtype
  kept = [x for x in jax.tree.leaves(backward) if x.shape == weights.shape]
  assert kept and {x.dtype for x in kept} == {jnp.dtype(dtype)}
  assert [g.dtype for g in backward(jnp.ones_like(weights))] == [dtype, dtype, jnp.float32]


def test_rounded_matmul_is_the_rounded_product_with_a_float32_kernel_gradient(monkeypatch):
  """layers.DenseGeneral(operand_dtype=bfloat16): forward and input gradient are the products of bfloat16-rounded
  operands (the float32 gradient rounded once), accumulated in float32; the kernel gradient is not rounded after
  the product, so it matches the float64 sum of rounded products to float32 accuracy, where bfloat16 would be off by
  up to 2^-9. Autodiff's form (GPU, TPU) gives the same forward and input gradient."""
  x = jax.random.normal(KEYS[0], (3, 5, 16)).astype(jnp.bfloat16)
  kernel = jax.random.normal(KEYS[1], (16, 24))
  dense = layers.DenseGeneral(24, ("embed", "vocab"), dtype=jnp.float32, operand_dtype=jnp.bfloat16)
  run = lambda kernel, x: dense.apply({"params": {"kernel": kernel}}, x)
  out, (dkernel, dx) = _grads(run, kernel, x)
  probe = np.asarray(jax.random.normal(KEYS[7], out.shape), np.float64)  # _grads' read-out
  r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  assert out.dtype == dkernel.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, r(x) @ r(kernel), rtol=1e-5, atol=1e-5)
  want_dx = r(probe) @ r(kernel).T
  assert np.abs(np.asarray(dx, np.float64) - want_dx).max() <= 2**-8 * np.abs(want_dx).max()
  want_dkernel = np.einsum("btd,btv->dv", r(x), r(probe))
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-5, atol=1e-5)
  assert not np.allclose(r(want_dkernel), want_dkernel, rtol=1e-5, atol=1e-5)  # bfloat16 would not pass that
  dots = _dot_operand_dtypes(_compiled_gradient(run, kernel, x))
  assert dots and set(dots) == {("bf16", "bf16")}, dots

  monkeypatch.setattr(cpu_layouts, "explicit_transposes", lambda: False)
  plain_out, (plain_dkernel, plain_dx) = _grads(run, kernel, x)
  np.testing.assert_allclose(plain_out, out, rtol=1e-5, atol=1e-5)
  # Within a few bfloat16 roundings of the scale: autodiff may round the float32 gradient inside the dot, and it
  # rounds the kernel's gradient to bfloat16.
  for plain, ours in ((plain_dx, dx), (plain_dkernel, dkernel)):
    ours = np.asarray(ours, np.float32)
    assert np.abs(np.asarray(plain, np.float32) - ours).max() <= 2**-7 * np.abs(ours).max()


def test_tied_embedding_attend_gradient_compiles_in_bfloat16():
  """A bfloat16 model's tied logits (Embed.attend): its jitted gradient used to abort on one CPU device with
  "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32" (the table passed as its transpose, whose
  gradient's transpose XLA folded into the dot). The table's gradient is the float32 sum of bfloat16-rounded
  products."""
  x = jax.random.normal(KEYS[0], (3, 5, 16)).astype(jnp.bfloat16)
  table = jax.random.normal(KEYS[1], (24, 16))
  embed = layers.Embed(24, 16, jnp.bfloat16)
  run = lambda table, x: embed.apply({"params": {"embedding": table}}, x, method="attend")
  out, (dtable, dx) = jax.jit(lambda t, x: _grads(run, t, x))(table, x)
  probe = np.asarray(jax.random.normal(KEYS[7], out.shape), np.float64)  # _grads' read-out
  r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  assert out.dtype == dtable.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dtable.shape == table.shape
  np.testing.assert_allclose(out, r(x) @ r(table).T, rtol=1e-5, atol=1e-5)
  want_dx = r(probe) @ r(table)
  assert np.abs(np.asarray(dx, np.float64) - want_dx).max() <= 2**-8 * np.abs(want_dx).max()
  np.testing.assert_allclose(dtable, np.einsum("btv,btd->vd", r(probe), r(x)), rtol=1e-5, atol=1e-5)


def test_dense_general_operand_dtype_needs_a_float32_result():
  dense = layers.DenseGeneral(4, ("embed", "vocab"), dtype=jnp.bfloat16, operand_dtype=jnp.float16)
  with pytest.raises(ValueError, match="returns float32"):
    dense.init(KEYS[0], jnp.ones((2, 3)))
