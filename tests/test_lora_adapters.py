"""The adapter bookkeeping of ``diffusion_core.pipelines.lora`` on a numpy "backend": stacked packs, column scales,
fuse / unfuse deltas, delete and unload. The layer math is checked against diffusers in tests/pipelines."""

import numpy as np
import pytest

from diffusion_core.pipelines.lora import LoraLoaderMixin

Q, K = "attn.to_q", "attn.to_k"
SHAPES = {Q: (6, 4), K: (6, 4)}


class NumpyLayers(LoraLoaderMixin):
    """A pipeline with one "unet" of two linear layers; y = W x + sum_r up[:, r] * scales[r] * (down[r] @ x)."""

    _components = ("unet",)

    def __init__(self) -> None:
        self.unet = {p: np.random.default_rng(0).standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
        self.packs = {}

    def _lora_targets(self, component):
        return {p: w.shape for p, w in getattr(self, component).items()}

    def _lora_install(self, component, packs):
        self.packs = dict(packs)

    def _lora_set_scales(self, component, scales):
        for path, values in scales.items():
            assert values.shape == self.packs[path].scales.shape  # a set never changes shapes
            self.packs[path] = type(self.packs[path])(self.packs[path].down, self.packs[path].up, values)

    def _lora_add_weights(self, component, deltas):
        for path, delta in deltas.items():
            self.unet[path] = self.unet[path] + delta

    def effective(self, path):
        w = self.unet[path]
        pack = self.packs.get(path)
        return w if pack is None else w + pack.up @ (pack.scales[:, None] * pack.down)


def _lora(seed, rank, paths=(Q, K), alpha=None):
    rng = np.random.default_rng(seed)
    out = {}
    for path in paths:
        out[f"unet.{path}.lora_A.weight"] = rng.standard_normal((rank, 4)).astype(np.float32)
        out[f"unet.{path}.lora_B.weight"] = rng.standard_normal((6, rank)).astype(np.float32)
        if alpha is not None:
            out[f"unet.{path}.alpha"] = np.float32(alpha)
    return out


def _delta(state, path, scale=1.0):
    return scale * state[f"unet.{path}.lora_B.weight"] @ state[f"unet.{path}.lora_A.weight"]


def test_packs_stack_adapters_in_load_order_with_weighted_scales():
    pipe, a, b = NumpyLayers(), _lora(1, 2, alpha=1.0), _lora(2, 3, paths=(Q,))
    base = {p: w.copy() for p, w in pipe.unet.items()}
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    assert pipe.packs[Q].down.shape == (5, 4) and pipe.packs[K].down.shape == (2, 4)
    assert pipe.lora_structure() == (("unet", K, 2), ("unet", Q, 5))
    np.testing.assert_allclose(pipe.effective(Q), base[Q] + _delta(b, Q), rtol=1e-5)  # only "b" is active
    pipe.set_adapters(["a", "b"], [2.0, -1.0])
    want = base[Q] + 2.0 * _delta(a, Q, 0.5) - _delta(b, Q)
    np.testing.assert_allclose(pipe.effective(Q), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pipe.packs[Q].scales, [1.0, 1.0, -1.0, -1.0, -1.0])


def test_fuse_adds_the_weighted_deltas_and_unfuse_takes_them_off():
    pipe, a = NumpyLayers(), _lora(1, 2)
    base = {p: w.copy() for p, w in pipe.unet.items()}
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.set_adapters("a", 0.5)
    live = pipe.effective(Q)
    pipe.fuse_lora(lora_scale=2.0)
    np.testing.assert_allclose(pipe.unet[Q], base[Q] + _delta(a, Q), rtol=1e-5, atol=1e-6)
    assert not pipe.packs[Q].scales.any()  # the fused adapter no longer adds its term
    pipe.unfuse_lora()
    np.testing.assert_allclose(pipe.unet[Q], base[Q], atol=1e-6)
    np.testing.assert_allclose(pipe.effective(Q), live, atol=1e-6)


def test_delete_and_unload():
    pipe = NumpyLayers()
    pipe.load_lora_weights(_lora(1, 2), adapter_name="a")
    pipe.load_lora_weights(_lora(2, 1), adapter_name="b")
    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == {"unet": ["a"]} and pipe.get_active_adapters() == []
    assert pipe.packs[Q].down.shape == (2, 4)
    pipe.set_adapters("a")
    pipe.fuse_lora()
    fused = pipe.unet[Q].copy()
    with pytest.raises(ValueError, match="fused"):
        pipe.delete_adapters("a")
    pipe.unload_lora_weights()
    assert pipe.packs == {} and pipe.lora_structure() == ()
    np.testing.assert_array_equal(pipe.unet[Q], fused)  # fused weights stay, as in diffusers
    assert pipe.load_lora_weights(_lora(3, 1)) is None and pipe.get_active_adapters() == ["default_0"]
