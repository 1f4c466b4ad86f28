"""optimizer.config: recipes (TOML) applied to Options, and tolerances."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from kiln.optimizer.config import TOLERANCES, Options, load_recipe, validate
from kiln.optimizer.errors import InputError

KNOWN_TOP = "bench, compare, import, int_ranges, io_dtype, passes, precision, profile_from, profiles, quantize, shapes, target, tensorrt, verify"


def write(tmp_path, text: str, name: str = "recipe.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def recipe_error(path, options: Options | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        load_recipe(path, options or Options())
    assert info.value.exit_code == 2
    return info.value


def test_full_recipe(tmp_path):
    path = write(
        tmp_path,
        """
        # every section
        target = "cpu"
        precision = "fp16"

        [passes]
        disable = ["fuse-attention", "fold-constants"]

        [verify]
        enabled = false
        each = true
        seed = 7
        atol = 0.5
        rtol = 1

        [bench]
        runs = 3
        warmup = 0

        [tensorrt]
        opt_level = 5
        time_limit = 1200

        [shapes]
        batch = "1..8"
        "x:1" = "16..32..128"
        seq = 4
        """,
    )
    options = Options()
    load_recipe(path, options)
    assert options == Options(
        target="cpu",
        precision="fp16",
        precision_chosen=True,
        shapes=[("recipe recipe.toml", "batch=1..8"), ("recipe recipe.toml", "x:1=16..32..128"),
                ("recipe recipe.toml", "seq=4")],
        disable_passes=["fuse-attention", "fold-constants"],
        verify=False,
        verify_each=True,
        seed=7,
        atol=0.5,
        rtol=1,
        bench_runs=3,
        bench_warmup=0,
        trt_opt_level=5,
        trt_time_limit=1200,
    )  # fmt: skip
    assert options.tolerance() == {"atol": 0.5, "rtol": 1}


def test_empty_recipe_changes_nothing(tmp_path):
    options = Options()
    load_recipe(write(tmp_path, "# nothing\n"), options)
    assert options == Options()


def test_recipe_keeps_unset_fields_and_earlier_shapes(tmp_path):
    options = Options(seed=3, shapes=[("earlier", "batch=2")])
    load_recipe(write(tmp_path, '[shapes]\nseq = "1..4"\n[verify]\natol = 0.25\n'), options)
    assert options.seed == 3
    assert options.shapes == [("earlier", "batch=2"), ("recipe recipe.toml", "seq=1..4")]
    assert options.atol == 0.25 and options.rtol is None


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, 'target = "cpu"\nprecison = "fp16"\n')
    err = recipe_error(path)
    assert err.message == f"recipe {path}: unknown key 'precison'"
    assert err.hint == f"known keys: {KNOWN_TOP}"


def test_unknown_top_level_table(tmp_path):
    path = write(tmp_path, "[verfy]\nseed = 1\n")
    err = recipe_error(path)
    assert err.message == f"recipe {path}: unknown key 'verfy'"
    assert err.hint == f"known keys: {KNOWN_TOP}"


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, "[verify]\nseed = 1\ntolerance = 0.1\n")
    err = recipe_error(path)
    assert err.message == f"recipe {path}: unknown key 'verify.tolerance'"
    assert err.hint == "known keys here: atol, each, enabled, inputs, rel_l2, rtol, seed"


def test_unknown_nested_key_in_bench(tmp_path):
    path = write(tmp_path, "[bench]\niterations = 5\n")
    err = recipe_error(path)
    assert err.message == f"recipe {path}: unknown key 'bench.iterations'"
    assert err.hint == "known keys here: runs, warmup"


@pytest.mark.parametrize(
    ("text", "key", "type_name"),
    [
        ("target = 3", "target", "int"),
        ('precision = ["fp16"]', "precision", "list"),
        ('[verify]\nseed = "7"', "verify.seed", "str"),
        ("[verify]\nseed = true", "verify.seed", "bool"),  # bool is an int to Python, not to a recipe
        ("[verify]\nseed = 1.5", "verify.seed", "float"),
        ("[verify]\nenabled = 1", "verify.enabled", "int"),
        ('[verify]\nenabled = "yes"', "verify.enabled", "str"),
        ("[verify]\natol = true", "verify.atol", "bool"),
        ('[verify]\nrtol = "0.1"', "verify.rtol", "str"),
        ('[passes]\ndisable = "fold"', "passes.disable", "str"),
        ("[bench]\nruns = 2.0", "bench.runs", "float"),
    ],
)
def test_wrong_type(tmp_path, text, key, type_name):
    path = write(tmp_path, text + "\n")
    err = recipe_error(path)
    assert err.message == f"recipe {path}: {key} has the wrong type ({type_name})"


def test_disable_must_be_names(tmp_path):
    path = write(tmp_path, '[passes]\ndisable = ["fold", 3]\n')
    err = recipe_error(path)
    assert err.message == f"recipe {path}: passes.disable must be a list of names"


def test_section_must_be_table(tmp_path):
    path = write(tmp_path, "verify = true\n")
    err = recipe_error(path)
    assert err.message == f"recipe {path}: verify must be a table ([verify])"


def test_shapes_must_be_table(tmp_path):
    path = write(tmp_path, 'shapes = "batch=1..8"\n')
    err = recipe_error(path)
    assert err.message == f'recipe {path}: [shapes] must be a table of NAME = "MIN..MAX"'


@pytest.mark.parametrize("value", ["true", "1.5", "[1, 8]", "{ min = 1 }"])
def test_shapes_entry_wrong_type(tmp_path, value):
    path = write(tmp_path, f"[shapes]\nbatch = {value}\n")
    err = recipe_error(path)
    assert err.message == f'recipe {path}: shapes.batch must be a string like "1..8" or a size'


def test_invalid_toml(tmp_path):
    path = write(tmp_path, 'target = "cpu\n')
    err = recipe_error(path)
    assert err.message.startswith(f"recipe {path} is not valid TOML: ")
    assert "line 1" in err.message


def test_not_utf8(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_bytes(b'target = "\xff\xfe"\n')
    err = recipe_error(path)
    assert err.message.startswith(f"recipe {path} is not valid TOML: ")


def test_utf8_recipe(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_bytes('# \u00b5-batches \u2014 caf\u00e9\n[passes]\ndisable = ["caf\u00e9"]\n'.encode())
    options = Options()
    load_recipe(path, options)
    assert options.disable_passes == ["caf\u00e9"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    err = recipe_error(path)
    assert err.message == f"recipe {path}: no such file"
    assert err.hint == "check the --config path"


def test_directory_is_not_a_recipe(tmp_path):
    err = recipe_error(tmp_path)
    assert err.message == f"recipe {tmp_path}: no such file"


def test_unknown_precision(tmp_path):
    path = write(tmp_path, 'precision = "fp8"\n')
    err = recipe_error(path)
    assert err.message == "unknown precision 'fp8'"
    assert err.hint == "choose one of fp32, fp16, bf16"


def test_negative_bench_runs(tmp_path):
    err = recipe_error(write(tmp_path, "[bench]\nwarmup = -1\n"))
    assert err.message == "--bench-runs (10) and a recipe's [bench] warmup (-1) must be 0 or more"


def test_validate_defaults():
    validate(Options())  # no error


# Options.tolerance


@pytest.mark.parametrize(
    ("precision", "want"), [("fp32", {"atol": 1e-4, "rtol": 1e-3}), ("fp16", {"atol": 2e-2, "rtol": 2e-2})]
)
def test_tolerance_defaults(precision, want):
    assert Options(precision=precision).tolerance() == want
    assert TOLERANCES[precision] == want


def test_tolerance_overrides():
    assert Options(precision="fp16", atol=0.5).tolerance() == {"atol": 0.5, "rtol": 2e-2}
    assert Options(precision="fp32", rtol=0.25).tolerance() == {"atol": 1e-4, "rtol": 0.25}
    assert Options(precision="fp16", atol=0.1, rtol=0.2).tolerance() == {"atol": 0.1, "rtol": 0.2}


def test_tolerance_zero_override_is_kept():
    assert Options(precision="fp16", atol=0.0, rtol=0).tolerance() == {"atol": 0.0, "rtol": 0}


def test_tolerance_does_not_change_table():
    before = {k: dict(v) for k, v in TOLERANCES.items()}
    Options(precision="fp32", atol=1.0).tolerance()["rtol"] = 99.0
    assert TOLERANCES == before


def test_options_defaults():
    assert dataclasses.asdict(Options()) == {
        "target": "cpu",
        "precision": "fp32",
        "precision_chosen": False,
        "force_precision": False,
        "io_dtype": "float32",
        "shapes": [],
        "profile_from": None,
        "profiles": "auto",
        "int_ranges": [],
        "verify_inputs": [],
        "disable_passes": [],
        "verify": True,
        "verify_each": False,
        "seed": 0,
        "atol": None,
        "rtol": None,
        "bench_runs": 10,
        "bench_warmup": 2,
        "signature": "serving_default",
        "outputs": None,
        "opset": 17,
        "layout": "nhwc",
        "align": None,
        "import_timeout": 1800.0,
        "trust_pickle": False,
        "video_decoder": "clip",
        "quantize": None,
        "quant_backend": None,
        "calib": None,
        "calib_samples": None,
        "calib_method": None,
        "calib_percentile": 99.99,
        "smoothquant": None,
        "keep": [],
        "rel_l2": None,
        "quality": None,
        "trt_opt_level": None,
        "trt_time_limit": None,
        "cache": True,
    }


def test_int_ranges_and_verify_inputs_from_a_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    path = write(tmp_path / "recipes", """
        [int_ranges]
        class_labels = "0..999"
        [verify]
        inputs = ["sample.npz", "/data/other.npz"]
        """)
    options = Options(int_ranges=[("earlier", "t=1..2")])
    load_recipe(path, options)
    assert options.int_ranges == [("earlier", "t=1..2"), ("recipe recipe.toml", "class_labels=0..999")]
    assert options.verify_inputs == [str(tmp_path / "recipes" / "sample.npz"), "/data/other.npz"]  # relative to the recipe


def test_int_ranges_must_be_a_table_of_strings(tmp_path):
    err = recipe_error(write(tmp_path, "int_ranges = 3\n"))
    assert err.message.endswith('[int_ranges] must be a table of NAME = "LO..HI"')
    err = recipe_error(write(tmp_path, "[int_ranges]\nlabels = 7\n"))
    assert err.message.endswith('int_ranges.labels must be a string like "0..999"')


def test_unsupported_import_opset_names_the_option(tmp_path):
    """Found by the fuzzing harness: the message named neither --opset nor the recipe key."""
    err = recipe_error(write(tmp_path, "[import]\nopset = 5\n"))
    assert err.message == "--opset 5 (the opset of imported models) is unsupported"
    assert err.hint == "choose 16..18 (GridSample needs 16)"
