import pytest

from heads.config import HeadConfig
from pipeline.config import ConfigError, TrainConfig, apply_overrides, available_recipes, load_recipe


def test_every_shipped_recipe_loads():
    names = available_recipes()
    assert {"CUB", "SUN", "AWA2", "APY", "FLO", "CUB100", "demo"} <= set(names)
    for name in names:
        config = load_recipe(name)
        assert config.recipe == name and isinstance(config.head, HeadConfig)


def test_released_recipes_match_spec_table():
    cub, sun, awa2 = load_recipe("cub"), load_recipe("SUN"), load_recipe("AWA2")
    assert (cub.sampler, cub.batch_size, cub.iterations, cub.seed) == ("uniform", 50, 4234, 214)
    assert (cub.head.lambda_cal, cub.head.lambda_distill, cub.head.fusion) == (0.1, 0.001, (0.9, 0.1))
    assert (sun.sampler, sun.iterations, sun.seed, sun.head.fusion) == ("class_balanced", 14448, 2339, (0.7, 0.3))
    assert (sun.head.lambda_cal, sun.head.lambda_distill) == (1e-4, 0.01)
    assert (awa2.momentum, awa2.iterations, awa2.seed, awa2.head.fusion) == (0.0, 23527, 87778, (1.0, 0.0))
    assert awa2.head.normalize_v and awa2.head.clamp_att_negative and awa2.head.lambda_distill == 1e-7
    for c in (cub, sun, awa2):
        assert (c.lr, c.weight_decay, c.alpha, c.eps) == (1e-4, 1e-4, 0.99, 1e-8)


def test_overrides_are_typed_and_reach_head_fields():
    c = apply_overrides(load_recipe("CUB"), ["lambda_causal=0.3", "head.fusion=0.5,0.5", "iterations=10",
                                             "sampler=class_balanced", "select_iterations=false", "gamma=1"])
    assert c.head.lambda_causal == 0.3 and c.head.fusion == (0.5, 0.5)
    assert c.iterations == 10 and isinstance(c.iterations, int)
    assert c.sampler == "class_balanced" and c.select_iterations is False
    assert c.gamma == 1.0 and isinstance(c.gamma, float)
    assert load_recipe("CUB").head.lambda_causal == 0.0  # the recipe itself is untouched


@pytest.mark.parametrize("item, message", [
    ("lambda_causl=0.3", "unknown config key 'lambda_causl' (did you mean 'lambda_causal'?)"),
    ("head.iterations=3", "unknown config key 'head.iterations'"),
    ("iterations=abc", "iterations: expected an integer"),
    ("iterations=2.5", "iterations: expected an integer"),
    ("lr=true", "lr: expected a number"),
    ("sampler=foo", "sampler must be one of"),
    ("counterfactual=nope", "counterfactual must be one of"),
    ("fusion=1", "fusion: expected 2"),
    ("no_equals_sign", "expects key=value"),
    ("lr=inf", "lr must be a finite number > 0, got inf"),
    ("lr=nan", "lr must be a finite number > 0, got nan"),
    ("alpha=2", "alpha must be a finite number in [0, 1), got 2.0"),
    ("momentum=-1", "momentum must be a finite number in [0, 1), got -1.0"),
    ("weight_decay=-1", "weight_decay must be a finite number >= 0, got -1.0"),
    ("gamma=nan", "gamma must be a finite number, got nan"),
    ("seed=-1", "seed must be >= 0"),
    ("lambda_distill=inf", "must be finite numbers >= 0"),
    ("fusion=[nan,1]", "fusion weights must be finite numbers"),
    ("bias=-inf", "bias must be a finite number"),
])
def test_bad_overrides_fail_with_a_clear_message(item, message):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(TrainConfig(), [item])
    assert message in str(err.value)


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('recipe = "x"\nbatchsize = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key 'batchsize'"):
        load_recipe(bad)
    bad.write_text("recipe = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown recipe 'NOPE'"):
        load_recipe("NOPE")


def test_dict_round_trip():
    c = apply_overrides(load_recipe("SUN"), ["lambda_causal=0.2"])
    assert TrainConfig.from_dict(c.to_dict()) == c
