"""``model.config`` / ``scheduler.config``: read-only mappings with attribute access, as diffusers users type them.

The class itself (``diffusion_core.configuration.FrozenConfig``), then every model class of both backends and
every scheduler: ``cfg.key`` is ``cfg["key"]``, unknown keys raise AttributeError naming the key, assignment
raises, and the config round-trips through JSON (and through ``from_config``) unchanged.
"""

import copy
import json
import pickle

import pytest

from diffusion_core import schedulers
from diffusion_core.configuration import FrozenConfig, config_to_json_string
from tests.pipelines import sd_tiny

UNET_2D = dict(
    sample_size=8,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
    attention_head_dim=4,
)
SMALL_TEXT = {**sd_tiny.SD_TEXT, "vocab_size": 600, "bos_token_id": 598, "eos_token_id": 599, "pad_token_id": 599}
# (class name, constructor config, an option to read, its value)
MODELS = [
    ("UNet2DModel", UNET_2D, "sample_size", 8),
    ("UNet2DConditionModel", {**sd_tiny.SD_UNET, "in_channels": 4}, "cross_attention_dim", 8),
    ("AutoencoderKL", sd_tiny.SD_VAE, "latent_channels", 4),
    ("ControlNetModel", sd_tiny.SD_CONTROLNET, "conditioning_embedding_out_channels", (16, 32)),
    ("CLIPTextModel", SMALL_TEXT, "hidden_size", 8),
    ("CLIPTextModelWithProjection", {**SMALL_TEXT, "projection_dim": 6}, "projection_dim", 6),
]


def _build(backend: str, name: str, config: dict):
    module = pytest.importorskip(f"diffusion_core.{backend}")
    cls = getattr(module, name)
    return cls(config) if name.startswith("CLIP") else cls(**config)


def _assert_read_only(cfg, key):
    with pytest.raises(AttributeError, match=f"cannot set config.{key}: a config is read-only"):
        setattr(cfg, key, 1)
    with pytest.raises(TypeError, match=r"cannot set config\['" + key + r"'\]: a config is read-only"):
        cfg[key] = 1
    with pytest.raises(TypeError, match="read-only"):
        del cfg[key]
    with pytest.raises(AttributeError, match="read-only"):
        del cfg._data


def test_attribute_and_item_access_read_the_same_value():
    cfg = FrozenConfig({"sample_size": 32, "block_out_channels": [4, 8], "_class_name": "UNet2DModel"})
    assert cfg.sample_size == cfg["sample_size"] == cfg.get("sample_size") == 32
    assert cfg.block_out_channels == [4, 8] and cfg._class_name == "UNet2DModel"
    assert cfg.get("missing", 7) == 7 and "sample_size" in cfg and len(cfg) == 3
    assert list(cfg) == ["sample_size", "block_out_channels", "_class_name"]  # insertion order kept
    assert "sample_size" in dir(cfg)


def test_unknown_attribute_names_the_key_and_lists_the_options():
    cfg = FrozenConfig({"sample_size": 32})
    with pytest.raises(AttributeError, match=r"config has no option 'sampel_size'; options: \['sample_size'\]"):
        cfg.sampel_size  # noqa: B018
    with pytest.raises(KeyError):
        cfg["sampel_size"]
    assert not hasattr(cfg, "__deepcopy__")  # dunder probes (copy, pickle) see a plain AttributeError


def test_read_only_and_unaffected_by_the_source_dict():
    source = {"sample_size": 32}
    cfg = FrozenConfig(source)
    _assert_read_only(cfg, "sample_size")
    source["sample_size"] = 64
    assert cfg.sample_size == 32


def test_behaves_like_a_dict_where_code_expects_one():
    cfg = FrozenConfig({"a": 1, "b": [1, 2]})
    assert cfg == {"a": 1, "b": [1, 2]} and {"a": 1, "b": [1, 2]} == cfg and cfg != {"a": 1}
    assert {**cfg, "a": 2} == {"a": 2, "b": [1, 2]} and type({**cfg}) is dict
    assert dict(cfg) == {"a": 1, "b": [1, 2]} and type(dict(cfg)) is dict
    assert copy.copy(cfg) == cfg and copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert type(copy.deepcopy(cfg)) is FrozenConfig and copy.deepcopy(cfg).b is not cfg.b
    assert hash(cfg) == hash(FrozenConfig({"b": [1, 2], "a": 1}))  # hashable: a static value under jax.jit
    assert repr(cfg) == "FrozenConfig({'a': 1, 'b': [1, 2]})"


def test_json_round_trip():
    cfg = FrozenConfig({"a": 1.5, "b": (1, 2), "c": None, "d": "x", "e": {"f": True}})
    back = json.loads(json.dumps(dict(cfg)))
    assert back == {"a": 1.5, "b": [1, 2], "c": None, "d": "x", "e": {"f": True}}
    assert json.loads(config_to_json_string(cfg)) == back


def test_rejects_a_non_mapping():
    with pytest.raises(ValueError, match="FrozenConfig: expected a mapping"):
        FrozenConfig([("a", 1)])


@pytest.mark.parametrize("backend", ["torch", "flax"])
@pytest.mark.parametrize("name, config, key, value", MODELS, ids=[m[0] for m in MODELS])
def test_model_config_is_frozen_with_attribute_access(backend, name, config, key, value, tmp_path):
    model = _build(backend, name, config)
    cfg = model.config
    assert isinstance(cfg, FrozenConfig)
    assert getattr(cfg, key) == cfg[key] == value
    with pytest.raises(AttributeError, match="config has no option 'no_such_option'"):
        cfg.no_such_option  # noqa: B018
    _assert_read_only(cfg, key)
    # JSON: what save_pretrained writes is the config, and the config rebuilds the same model config
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in cfg} == json.loads(json.dumps(dict(cfg)))
    rebuilt = type(model).from_config(json.loads(json.dumps(dict(cfg))))
    assert json.dumps(dict(rebuilt.config), sort_keys=True) == json.dumps(dict(cfg), sort_keys=True)


@pytest.mark.parametrize("cls", schedulers.all_scheduler_classes(), ids=lambda c: c.__name__)
def test_scheduler_config_is_frozen_with_attribute_access(cls, tmp_path):
    sched = cls(num_train_timesteps=500)
    cfg = sched.config
    assert isinstance(cfg, FrozenConfig) and isinstance(sched.options, FrozenConfig)
    assert cfg.num_train_timesteps == cfg["num_train_timesteps"] == 500
    with pytest.raises(AttributeError, match="config has no option 'no_such_option'"):
        cfg.no_such_option  # noqa: B018
    _assert_read_only(cfg, "num_train_timesteps")
    # JSON round trip (the in-memory default marker included) and the DESIGN.md swap idiom
    again = cls.from_config(json.loads(json.dumps(dict(cfg))))
    assert again.config == cfg
    assert schedulers.from_config({**cfg, "_class_name": cls.__name__}).config == cfg
    sched.save_config(tmp_path)  # the file leaves out the in-memory marker, as diffusers' does
    assert schedulers.from_config(tmp_path).to_dict() == sched.to_dict()
