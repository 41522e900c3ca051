"""Recipe resolution: built-ins, recipe files (patterns, layer ranges, later rules win) and
their one-line errors."""

import json
from pathlib import Path

import pytest

from stream_run.convert.recipes import ROUTERS, Quant, layer_set, make_recipe
from stream_run.engine.errors import ConvertError

N_LAYERS = 6
Q, K, DOWN = "self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}.weight" for p in MLP]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


def block(i: int, rel: str) -> str:
    return f"model.layers.{i}.{rel}"


def resolve(recipe, name, shape=(128, 64)):
    return recipe.resolve(name, shape, N_LAYERS)


def write(tmp_path, data) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_uniform_quantizes_every_2d_weight_and_nothing_else():
    r = make_recipe("uniform", 3, 32)
    for name in ("model.embed_tokens.weight", "lm_head.weight", block(0, Q), block(5, DOWN)):
        assert resolve(r, name) == Quant(3, 32)
    for name, shape in (("model.norm.weight", (64,)), (block(2, "input_layernorm.weight"), (64,)),
                        (block(2, "self_attn.q_proj.bias"), (64,))):
        assert resolve(r, name, shape) is None


def test_mixed_puts_embeddings_and_head_at_8_bits():
    r = make_recipe("mixed", 4, 128)
    assert resolve(r, "model.embed_tokens.weight") == Quant(8, 128)
    assert resolve(r, "lm_head.weight") == Quant(8, 128)
    for rel in (Q, K, "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", DOWN):
        assert resolve(r, block(3, rel)) == Quant(4, 128)
    assert resolve(make_recipe("mixed", 3, 64), block(0, Q)) == Quant(3, 64)


def test_none_keeps_everything():
    r = make_recipe("none")
    assert resolve(r, "model.embed_tokens.weight") is None
    assert resolve(r, block(0, Q)) is None


@pytest.mark.parametrize("layers, want", [
    ([0, 1, -2, -1], {0, 1, 4, 5}),
    ("2:4", {2, 3}),
    (["-2:", 0], {0, 4, 5}),
    (":2", {0, 1}),
    ([7, -9], set()),  # out of range: matches nothing
])
def test_layer_sets(layers, want):
    assert layer_set(tuple(layers) if isinstance(layers, list) else (layers,), N_LAYERS) == want


def test_recipe_file_patterns_layer_ranges_and_later_rules_win(tmp_path):
    path = write(tmp_path, {"bits": 4, "group_size": 64, "rules": [
        {"pattern": "model.layers.*", "layers": [0, 1, -2, -1], "bits": 6},
        {"pattern": "*.mlp.down_proj", "group_size": 32},
        {"pattern": "*.self_attn.k_proj", "layers": "1:3", "bits": 8},
        {"pattern": "lm_head", "bits": None},
        {"pattern": "model.embed_tokens", "bits": 8, "group_size": 128},
    ]})
    r = make_recipe(path, bits=2, group_size=128)  # the file's bits/group win over the flags
    assert resolve(r, block(0, Q)) == Quant(6, 64)
    assert resolve(r, block(5, Q)) == Quant(6, 64)
    assert resolve(r, block(2, Q)) == Quant(4, 64)
    assert resolve(r, block(0, DOWN)) == Quant(6, 32)  # group from rule 2, bits from rule 1
    assert resolve(r, block(3, DOWN)) == Quant(4, 32)
    assert resolve(r, block(1, K)) == Quant(8, 64)  # rule 3 overrides rule 1
    assert resolve(r, block(3, K)) == Quant(4, 64)
    assert resolve(r, "lm_head.weight") is None
    assert resolve(r, "model.embed_tokens.weight") == Quant(8, 128)
    assert resolve(r, "model.norm.weight", (64,)) is None
    desc = r.describe()
    assert desc["name"] == path and desc["default"] == {"bits": 4, "group_size": 64}
    # after the built-in rules that keep MoE routers at full precision
    assert desc["rules"][len(ROUTERS) + 3] == {"pattern": "lm_head", "layers": None,
                                               "bits": None}


def test_recipe_file_defaults_come_from_the_flags_and_base(tmp_path):
    path = write(tmp_path, {"base": "mixed", "rules": [
        {"pattern": "*.mlp.*", "layers": [-1], "bits": 8}]})
    r = make_recipe(path, bits=3, group_size=32)
    assert resolve(r, block(0, DOWN)) == Quant(3, 32)
    assert resolve(r, block(5, DOWN)) == Quant(8, 32)
    assert resolve(r, "lm_head.weight") == Quant(8, 32)  # from base "mixed"


def test_recipe_file_with_null_bits_quantizes_only_what_rules_name(tmp_path):
    path = write(tmp_path, {"bits": None, "rules": [
        {"pattern": "*.mlp.*", "bits": 4}, {"pattern": "*.self_attn.*", "group_size": 32}]})
    r = make_recipe(path, bits=6, group_size=64)
    assert resolve(r, block(1, DOWN)) == Quant(4, 64)
    assert resolve(r, block(1, Q)) == Quant(6, 32)  # unset bits: the flag's
    assert resolve(r, "model.embed_tokens.weight") is None


def test_layer_rules_never_match_embedding_or_head(tmp_path):
    path = write(tmp_path, {"rules": [{"pattern": "*", "layers": "0:", "bits": 8}]})
    r = make_recipe(path)
    assert resolve(r, "model.embed_tokens.weight") == Quant(4, 64)
    assert resolve(r, block(4, Q)) == Quant(8, 64)


@pytest.mark.parametrize("data, match", [
    ({"bits": 7}, r"bits=7 is not supported"),
    ({"group_size": 48}, r"group_size=48 is not supported"),
    ({"base": "fancy"}, r"'base' must be one of uniform, mixed, none, got 'fancy'"),
    ({"rule": []}, r"unknown recipe key\(s\) \['rule'\]"),
    ({"rules": {}}, r"'rules' must be a list"),
    ({"rules": [{"pattern": "*", "bits": 9}]}, r"rule 0: bits=9 is not supported"),
    ({"rules": [{"pattern": "*", "group_size": 100}]}, r"rule 0: group_size=100"),
    ({"rules": [{"bits": 4}]}, r"rule 0: 'pattern' must be a non-empty string"),
    ({"rules": [{"pattern": "*", "bits": 4}, {"pattern": "*"}]},
     r"rule 1: sets neither 'bits' nor 'group_size'"),
    ({"rules": [{"pattern": "*", "bits": 4, "layer": 1}]}, r"rule 0: unknown rule key"),
    ({"rules": [{"pattern": "*", "bits": 4, "layers": "first"}]},
     r"rule 0: 'layers' item 'first' is not a block index"),
    ({"rules": [{"pattern": "*", "bits": 4, "layers": [1.5]}]}, r"'layers' item 1.5"),
    ({"rules": ["*"]}, r"rule 0: expected an object"),
])
def test_bad_recipe_files(tmp_path, data, match):
    with pytest.raises(ConvertError, match=match) as info:
        make_recipe(write(tmp_path, data))
    assert "recipe.json" in str(info.value) and "\n" not in str(info.value)


def test_bad_recipe_names_and_flags(tmp_path):
    with pytest.raises(ConvertError, match=r"recipe 'fancy': not one of uniform, mixed, none"):
        make_recipe("fancy")
    with pytest.raises(ConvertError, match=r"bits=1 is not supported"):
        make_recipe("uniform", bits=1)
    with pytest.raises(ConvertError, match=r"group_size=16 is not supported"):
        make_recipe("uniform", group_size=16)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConvertError, match=r"bad.json: cannot read recipe"):
        make_recipe(str(tmp_path / "bad.json"))


def test_example_mixed_sensitive_recipe_keeps_the_sensitive_linears_at_group_32():
    # Chosen for SmolLM2-135M (30 blocks) on held-out text: embedding, q_proj and the MLP of
    # blocks 5-9 go to group 64, everything else stays group 32 (a lossless copy of Q4_1).
    r = make_recipe(str(EXAMPLES / "mixed-sensitive.json"), bits=2, group_size=128)
    n_layers = 30
    assert r.resolve("model.embed_tokens.weight", (49152, 576), n_layers) == Quant(8, 64)
    assert r.resolve("model.norm.weight", (576,), n_layers) is None
    g64 = set()
    for i in range(n_layers):
        for rel in LINEARS:
            quant = r.resolve(block(i, rel), (576, 576), n_layers)
            assert quant is not None and quant.bits == 4 and quant.group_size in (32, 64)
            if quant.group_size == 64:
                g64.add((i, rel.split(".")[1]))
    want = {(i, "q_proj") for i in range(n_layers)}
    want |= {(i, p) for i in range(5, 10) for p in MLP}
    assert g64 == want


def test_builtin_recipes_keep_moe_routers_at_full_precision(tmp_path):
    """A router at 4 bits picks other experts for the same input (tests/convert/
    test_convert_moe.py); a rule can still quantize it."""
    routers = [block(2, f"{m}.weight") for m in ("mlp.gate", "mlp.shared_expert_gate",
                                                  "block_sparse_moe.gate", "mlp.router")]
    for name in ("uniform", "mixed"):
        r = make_recipe(name, 4, 32)
        for router in routers:
            assert resolve(r, router, (64, 128)) is None, (name, router)
        assert resolve(r, block(2, "mlp.gate_proj.weight")) == Quant(4, 32)
        assert resolve(r, block(2, "mlp.experts.3.up_proj.weight")) == Quant(4, 32)
    r = make_recipe(write(tmp_path, {"rules": [{"pattern": "*.mlp.gate", "bits": 8}]}), 4, 32)
    assert resolve(r, routers[0], (64, 128)) == Quant(8, 32)
