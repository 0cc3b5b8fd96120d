"""Per-family XLA compiler options (core.compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import LMConfig, TransformerConfig
from codex_jax.core import compile as comp
from codex_jax.core import scan
from codex_jax.models import registry, symbolic
from codex_jax.stages import lm


def test_the_symbolic_family_asks_for_the_legacy_emitters_the_transformer_for_nothing():
    assert symbolic.unigram_family(12).compile_options == comp.LEGACY_FUSION_EMITTERS
    assert dict(comp.family_options(symbolic.unigram_family(12))) == {"xla_cpu_use_fusion_emitters": False}
    tf = registry.transformer(64, TransformerConfig(layers=1, d_model=16, heads=2, context_len=16))
    assert tf.compile_options == () and comp.family_options(tf) == () and comp.family_options(None) == ()


def test_options_apply_on_the_cpu_backend_only(monkeypatch):
    monkeypatch.setattr(comp.jax, "default_backend", lambda: "gpu")
    assert comp.family_options(symbolic.unigram_family(12)) == ()


def test_jit_for_passes_the_options_to_jax_jit_and_reuses_one_jitted_object(monkeypatch):
    seen, real_jit = [], jax.jit

    def spy(fn, **kw):
        seen.append(kw.get("compiler_options"))
        return real_jit(fn, **kw)

    monkeypatch.setattr(comp.jax, "jit", spy)
    fam = symbolic.unigram_family(12)
    double = lambda x: 2 * x  # noqa: E731
    a = comp.jit_for(double, fam)
    assert comp.jit_for(double, fam) is a  # one jitted object: one in-memory cache
    b = comp.jit_for(double, fam._replace(compile_options=()))
    assert b is not a and seen == [{"xla_cpu_use_fusion_emitters": False}, None]
    np.testing.assert_array_equal(a(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # under a trace the program is nested: JAX takes options only on a top-level jit
    nested = jax.vmap(lambda x: comp.jit_for(double, fam, x)(x))(jnp.ones((2, 3)))
    np.testing.assert_array_equal(nested, 2 * np.ones((2, 3)))
    assert seen[-1] is None


def test_run_steps_compiles_with_the_state_familys_options_and_agrees_with_the_defaults_to_rounding():
    fam = symbolic.unigram_family(10)
    cfg = LMConfig(steps=4, batch_size=2, log_every=2)
    data = lm.make_data(jnp.arange(16, dtype=jnp.int32).reshape(4, 4) % 10, jnp.ones((4, 4)), 2, 0.0)
    kw = dict(step_fn=lm.step, select_fn=lm.select_batch, num_steps=3)
    state = lm.init(jax.random.key(0), cfg, fam)
    assert scan.steps_program(state) is comp.jit_for(scan.scan_steps, fam, static_argnames=scan.STATIC)
    out, metrics = scan.run_steps(state, data, jax.random.key(1), **kw)
    again, _ = scan.run_steps(lm.init(jax.random.key(0), cfg, fam), data, jax.random.key(1), **kw)
    np.testing.assert_array_equal(out.params["logits"], again.params["logits"])  # same options: same bits
    plain = lm.init(jax.random.key(0), cfg, fam._replace(compile_options=()))
    assert scan.steps_program(plain) is not scan.steps_program(state)
    ref, ref_metrics = scan.run_steps(plain, data, jax.random.key(1), **kw)
    np.testing.assert_allclose(out.params["logits"], ref.params["logits"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
