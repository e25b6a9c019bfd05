"""``GenerationRequest.check`` and ``Limits``: every model-free check, without torch."""
import math
import subprocess
import sys

import pytest

from sdrt.engine.errors import SdrtError
from sdrt.engine.request import SAMPLER_NAMES, GenerationRequest, Limits


def _refused(match, names=None, limits=None, **fields):
    """Check a request that must be refused; returns the message."""
    request = GenerationRequest(**{"prompt": "a fox", **fields})
    with pytest.raises(SdrtError, match=match) as err:
        request.check(names=names, limits=limits or Limits())
    assert isinstance(err.value, ValueError), "SdrtError must be a ValueError"
    assert "\n" not in str(err.value)
    return str(err.value)


def test_import_needs_neither_torch_nor_numpy():
    # The CLI checks its arguments before paying for torch (about 1.5 s).
    code = ("import sys, sdrt.engine.request, sdrt.engine.errors; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_sampler_names_are_the_samplers():
    from sdrt.engine.schedules import SAMPLERS
    assert SAMPLER_NAMES == SAMPLERS


# Each row: a field, a bad value, and what the message must say after "<field> must be".
BAD = [
    ("prompt", 5, "a string or a non-empty list of strings, got 5"),
    ("prompt", [], "a string or a non-empty list of strings, got \\[\\]"),
    ("prompt", ["a", 3], "a string or a non-empty list of strings"),
    ("prompt", b"a fox", "a string or a non-empty list of strings, got b'a fox'"),
    ("negative_prompt", 3, "a string or a non-empty list of strings, got 3"),
    ("height", "512", "an integer from 1 to 4096, got '512'"),     # strings are not numbers
    ("height", 512.0, "an integer from 1 to 4096, got 512.0"),      # nor floats integers
    ("height", True, "an integer from 1 to 4096, got True"),        # bool is not a count
    ("width", 0, "an integer from 1 to 4096, got 0"),
    ("width", -8, "an integer from 1 to 4096, got -8"),
    ("width", 4097, "an integer from 1 to 4096, got 4097"),
    ("num_inference_steps", "5", "an integer from 1 to 1000, got '5'"),
    ("num_inference_steps", 5.0, "an integer from 1 to 1000, got 5.0"),
    ("num_inference_steps", 0, "an integer from 1 to 1000, got 0"),
    ("num_inference_steps", 10 ** 9, "an integer from 1 to 1000, got 1000000000"),
    ("guidance_scale", "7", "a finite number from 0 to 100, got '7'"),
    ("guidance_scale", math.nan, "a finite number from 0 to 100, got nan"),
    ("guidance_scale", math.inf, "a finite number from 0 to 100, got inf"),
    ("guidance_scale", 1e308, "a finite number from 0 to 100, got 1e\\+308"),
    ("guidance_scale", -1.0, "a finite number from 0 to 100, got -1.0"),
    ("guidance_scale", None, "a finite number from 0 to 100, got None"),
    ("strength", 0, "a number in \\(0, 1\\], got 0"),
    ("strength", 1.5, "a number in \\(0, 1\\], got 1.5"),
    ("strength", math.nan, "a number in \\(0, 1\\], got nan"),
    ("num_images_per_prompt", 10000, "an integer from 1 to 64 .*got 10000"),
    ("num_images_per_prompt", 0, "an integer from 1 to 64 .*got 0"),
    ("num_images_per_prompt", 2.0, "an integer from 1 to 64 .*got 2.0"),
    ("clip_skip", -1, "an integer of 0 or more, got -1"),
    ("clip_skip", True, "an integer of 0 or more, got True"),
    ("seed", -5, "-1 \\(random\\) or an integer from 0 to 2\\*\\*64 - 1, got -5"),
    ("seed", 2 ** 64, "-1 \\(random\\) or an integer .*, got 18446744073709551616"),
    ("seed", "42", "-1 \\(random\\) or an integer .*, got '42'"),
    ("seed", -1.0, "-1 \\(random\\) or an integer .*, got -1.0"),
    ("seed", math.nan, "-1 \\(random\\) or an integer .*, got nan"),
    ("sampler", "dpm_adaptive", "one of ddim, pndm, euler, euler_karras, euler_a, euler_a_karras, "
                            "heun, heun_karras, "
                       "dpm2, dpm2_karras, dpm2_a, dpm2_a_karras, dpmpp_2s_a, dpmpp_2s_a_karras, "
                       "dpmpp_sde, dpmpp_sde_karras, "
                       "dpmpp_2m, dpmpp_2m_karras, "
                       "dpmpp_2m_sde, dpmpp_2m_sde_karras, dpmpp_2m_sde_exponential, "
                       "dpmpp_2m_sde_heun, dpmpp_2m_sde_heun_karras, "
                       "dpmpp_2m_sde_heun_exponential, dpmpp_3m_sde, dpmpp_3m_sde_karras, "
                       "dpmpp_3m_sde_exponential, "
                       "lms, lms_karras, unipc, unipc_karras, "
                       "deis, deis_karras, lcm, restart, restart_karras, uni_pc, uni_pc_karras, "
                       "uni_pc_bh2, uni_pc_bh2_karras, ipndm, ipndm_karras, ipndm_v, "
                       "ipndm_v_karras, gradient_estimation, gradient_estimation_karras, "
                       "comfy_deis, comfy_deis_karras, res_multistep, res_multistep_karras, "
                       "res_multistep_a, res_multistep_a_karras, ddpm, ddpm_karras, er_sde, "
                       "er_sde_karras, cfgpp_euler, cfgpp_euler_karras, cfgpp_euler_a, "
                       "cfgpp_euler_a_karras, cfgpp_dpmpp_2m, cfgpp_dpmpp_2m_karras, "
                       "cfgpp_res_multistep, cfgpp_res_multistep_karras, cfgpp_res_multistep_a, "
                       "cfgpp_res_multistep_a_karras, cfgpp_gradient_estimation, "
                       "cfgpp_gradient_estimation_karras, dpm_fast, dpm_fast_karras, "
                       "dpm_fast_a, dpm_fast_a_karras, heunpp2, heunpp2_karras, "
                       "cfgpp_dpmpp_2s_a, cfgpp_dpmpp_2s_a_karras, cfgpp_ddim, seeds_2, "
                       "seeds_2_karras, seeds_3, seeds_3_karras, sa_solver, sa_solver_karras, "
                       "sa_solver_pece, sa_solver_pece_karras, or X_S for X one "
                       "of euler, .* and S one "
                       "of exponential, .*, got 'dpm_adaptive'"),
    ("sampler", 3, "one of ddim, .*, got 3"),
    ("output_type", "tensor", "one of pil, np, pt, latent, got 'tensor'"),
    ("original_size", (0, 3),
     "a pair \\(height, width\\) of integers from 1 to 65536, got \\(0, 3\\)"),
    ("target_size", (512, 2 ** 17), "a pair \\(height, width\\) of integers from 1 to 65536"),
    ("negative_original_size", (512,), "a pair \\(height, width\\) of integers"),
    ("original_size", (512.0, 512), "a pair \\(height, width\\) of integers"),
    ("original_size", "512x512", "a pair \\(height, width\\) of integers"),
    ("crops_coords_top_left", (-1, 0), "a pair \\(top, left\\) of integers from 0 to 65536"),
    ("aesthetic_score", math.nan, "a finite number from -1000 to 1000, got nan"),
    ("negative_aesthetic_score", 1e6, "a finite number from -1000 to 1000"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_is_refused_naming_field_value_and_range(field, value, message):
    _refused(f"^{field} must be {message}", **{field: value})


def test_names_are_the_callers():
    names = {"guidance_scale": "--guidance", "num_images_per_prompt": "--batch",
             "num_inference_steps": "--steps"}
    _refused(r"^--guidance must be a finite number from 0 to 100, got nan$", names,
             guidance_scale=math.nan)
    _refused(r"^--batch must be an integer from 1 to 64 .*, got 65$", names,
             num_images_per_prompt=65)
    _refused(r"^--steps must be an integer", names, num_inference_steps="5")


@pytest.mark.parametrize("prompt,where,position", [
    ("a fox\udcff in snow", "prompt", 5),          # invalid UTF-8 from argv (surrogateescape)
    (["ok", "\ud83d"], "prompt\\[1\\]", 0),          # half of a surrogate pair, second prompt
])
def test_lone_surrogate_names_its_position(prompt, where, position):
    _refused(rf"^{where} must be valid Unicode text, got '\\ud[8-9a-f]..' at position "
             rf"{position} ", prompt=prompt)
    _refused(rf"^negative_prompt must be valid Unicode text", negative_prompt="\udcff")


def test_counts_across_prompts_and_negatives():
    _refused(r"^negative_prompt must be one string or a list of 2 \(one per prompt\), got a "
             r"list of 3$", prompt=["a", "b"], negative_prompt=["x", "y", "z"])
    # 64 images per call: 8 prompts may have 8 images each, not 9.
    GenerationRequest(prompt=["p"] * 8, num_images_per_prompt=8).check(limits=Limits())
    _refused(r"^num_images_per_prompt must be an integer from 1 to 8 \(64 images per call, "
             r"SDRT_MAX_IMAGES, for 8 prompts\), got 9$", prompt=["p"] * 8,
             num_images_per_prompt=9)
    _refused(r"^prompt must be at most 64 prompts", prompt=["p"] * 65)
    _refused(r"^prompt must be at most 20000 characters", prompt="x" * 20001)


def test_a_good_request_comes_back_normalised():
    np = pytest.importorskip("numpy")
    checked = GenerationRequest(prompt="a fox", negative_prompt="blur", height=np.int64(64),
                                width=64, num_inference_steps=np.int32(3),
                                guidance_scale=np.float32(6.5), seed=7).check(limits=Limits())
    assert (checked.prompt, checked.negative_prompt) == (["a fox"], ["blur"])
    assert type(checked.height) is int and type(checked.num_inference_steps) is int
    assert type(checked.guidance_scale) is float and checked.guidance_scale == 6.5
    assert checked.texts() == ["blur", "a fox"] and checked.batch_size == 1
    assert checked.draw_seed() == 7
    unguided = GenerationRequest(prompt=["a", "b"], negative_prompt="x",
                                 guidance_scale=1.0).check(limits=Limits())
    assert unguided.texts() == ["a", "b"], "negatives are encoded only with guidance"


def test_seed_minus_one_draws_a_random_seed():
    request = GenerationRequest(prompt="a", seed=-1).check(limits=Limits())
    seeds = {request.draw_seed() for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2 ** 64 for s in seeds)


def test_limits_from_env_raise_each_limit():
    env = {"SDRT_MAX_SIDE": "8192", "SDRT_MAX_IMAGES": "128", "SDRT_MAX_STEPS": "2000",
           "SDRT_MAX_GUIDANCE": "1000", "SDRT_MAX_PROMPT_CHARS": "1e6",
           "SDRT_MAX_PARAMETERS": "5e10", "SDRT_MEMORY_FRACTION": "0.5",
           "SDRT_MEMORY_BYTES": "1073741824"}
    limits = Limits.from_env(env)
    assert limits == Limits(max_side=8192, max_images=128, max_steps=2000, max_guidance=1000.0,
                            max_prompt_chars=10 ** 6, max_parameters=5 * 10 ** 10,
                            memory_fraction=0.5, memory_bytes=2 ** 30)
    GenerationRequest(prompt="a", height=8192, num_images_per_prompt=128,
                      num_inference_steps=2000, guidance_scale=500).check(limits=limits)
    assert Limits.from_env({}) == Limits()


@pytest.mark.parametrize("var,value,message", [
    ("SDRT_MAX_IMAGES", "many", "SDRT_MAX_IMAGES must be a number, got 'many'"),
    ("SDRT_MAX_SIDE", "1.5", "SDRT_MAX_SIDE must be a whole number, got '1.5'"),
    ("SDRT_MAX_STEPS", "-3", "Limits.max_steps must be a positive number, got -3"),
    ("SDRT_MEMORY_FRACTION", "2", "Limits.memory_fraction must be at most 1"),
    ("SDRT_MEMORY_FRACTION", "nan", "Limits.memory_fraction must be a positive number"),
])
def test_bad_limit_variables_are_named(var, value, message):
    with pytest.raises(SdrtError, match=message):
        Limits.from_env({var: value})
