"""run_layers with a probe layer: what each application of a layer draws and initialises, and the summed routing
statistics, in every layout (unrolled or scanned, shared or not, MoE blocks)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repeat_lm.models import moe as moe_lib
from repeat_lm.models import stack

LAYERS = 4


@dataclasses.dataclass(frozen=True)
class Cfg:  # the T5Config fields run_layers reads
  scan_layers: bool = False
  param_share: str | int = "none"
  remat_policy: str = "none"
  moe: moe_lib.MoeConfig | None = None


class Probe(nn.Module):
  """Shifts a record [L, 2] down one row and writes (its parameter, a 'dropout' draw) on top; a sparse layer reports
  one 'count'. After the L layers row i holds layer L - 1 - i's values."""
  config: Cfg
  sparse: bool = False

  @nn.compact
  def __call__(self, record):
    w = self.param("w", nn.initializers.normal(1.0), (1,))
    draw = jax.random.uniform(self.make_rng("dropout"), (1,))
    record = jnp.roll(record, 1, axis=0).at[0].set(jnp.concatenate([w, draw]))
    return record, ({"count": jnp.ones(())} if self.sparse else None)


class Stack(nn.Module):
  config: Cfg
  sparse: tuple[bool, ...] = (False,) * LAYERS

  @nn.compact
  def __call__(self, record):
    return stack.run_layers(Probe, self.config, len(self.sparse), record, sparse=self.sparse)


def run(cfg, sparse=(False,) * LAYERS):
  module, record = Stack(cfg, tuple(sparse)), jnp.zeros((len(sparse), 2))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = module.init(rngs, record)
  out, stats = module.apply(variables, record, rngs={"dropout": jax.random.key(2)})
  return np.asarray(out), stats


@pytest.mark.parametrize("scan", [False, True])
def test_every_layer_draws_its_own_dropout_and_unshared_layers_their_own_init(scan):
  # A scan that did not split the 'dropout' (or 'params') rng per step would give every layer the same draw (init).
  out, _ = run(Cfg(scan_layers=scan))
  params, draws = out[:, 0], out[:, 1]
  assert len(set(draws.tolist())) == LAYERS and len(set(params.tolist())) == LAYERS


@pytest.mark.parametrize("scan", [False, True])
def test_shared_layers_share_the_parameter_but_not_the_dropout_draw(scan):
  # stack.py: a shared group keeps one copy of the parameters and draws its dropout separately per application.
  out, _ = run(Cfg(scan_layers=scan, param_share=2))
  params, draws = out[:, 0], out[:, 1]
  assert params[0] == params[1] and params[2] == params[3] and params[0] != params[2]
  assert len(set(draws.tolist())) == LAYERS


@pytest.mark.parametrize("scan, share, first", [(False, "none", False), (True, "none", True), (False, 4, False),
                                               (True, 4, True)])
def test_routing_statistics_sum_over_every_sparse_layer(scan, share, first):
  # One sparse FFN in every 2 (the first or the last of each pair): 4 of 8 layers report a count of 1 each, whether
  # they run as scanned blocks or as 2 shared groups of 2 blocks.
  cfg = Cfg(scan_layers=scan, param_share=share, moe=moe_lib.MoeConfig(sparse_every=2, sparse_first=first))
  _, stats = run(cfg, moe_lib.sparse_layer_flags(8, cfg.moe))
  assert float(stats["count"]) == 4.0
