"""``sdrt generate``: check the request, load the model, run it, write the PNGs.

In that order, so that a bad argument costs nothing: the request, the paths and the init
image are checked before torch is imported (``request.py`` and ``images.py`` do not import
it). Options that do nothing in a call (``--strength`` without ``--init-image``, ...) give one
warning line each. On CUDA a text-to-image request runs through a static plan (CUDA graphs),
built first and timed apart. Output files never replace an existing file unless
``--overwrite`` is given: an image takes the next free name instead.
"""
import argparse
import dataclasses
import functools
import itertools
import math
import os
import sys
import warnings

from . import cli_control
from .atomic import write_file
from .errors import SdrtError, check_file
from .infotext import (Infotext, lora_tag, lora_tags, model_identity, png_bytes, sampler_label,
                       sampler_setting_problem)
from .infotext import short_hash as file_hash
from .model_files import file_stem
from .cli import size_arg
from .request import (BETA_SHAPE, MAX_NOISE_MULTIPLIER, MAX_SEED, ZERO_SNR, GenerationRequest,
                      Limits, sampler_family)
from .sd_upscale import params as sd_upscale_params

# Request field → the option that sets it, so that a message names what the user typed.
OPTION_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--guidance",
                "num_images_per_prompt": "--batch", "negative_prompt": "--negative",
                "clip_skip": "--clip-skip", "height": "--height", "width": "--width",
                "strength": "--strength", "seed": "--seed", "sampler": "--sampler",
                "prompt": "prompt", "prompt_2": "--prompt-2", "negative_prompt_2": "--negative-2",
                "original_size": "--original-size", "target_size": "--target-size",
                "negative_original_size": "--negative-original-size",
                "negative_target_size": "--negative-target-size",
                "negative_crops_coords_top_left": "--negative-crop",
                "crops_coords_top_left": "--crop", "aesthetic_score": "--aesthetic-score",
                "negative_aesthetic_score": "--negative-aesthetic-score",
                "denoising_end": "--refiner-start", "subseed": "--subseed",
                "subseed_strength": "--subseed-strength", "pag_scale": "--pag-scale",
                "seed_resize_from": "--seed-resize-from",
                "initial_noise_multiplier": "--noise-multiplier",
                "guidance_rescale": "--guidance-rescale",
                "guidance_rescale_style": "--guidance-rescale-style"}


def generate(a):
    _built_in_defaults(a)
    # A workflow's model upscales: its hires fix's, as ComfyUI runs it, and its saved images'.
    a.hr_comfy_upscale = a.final_upscale = None
    if a.from_png is not None and a.workflow is not None:
        raise SdrtError("--from-png and --workflow both give the settings: pass one")
    png_model = _apply_png(a) if a.from_png is not None else None
    if a.workflow is not None:
        _apply_workflow(a)
    if a.prompt is None:
        raise SdrtError("a prompt is needed (or --from-png IMAGE.png to take it from a PNG)")
    if a.style:  # (before the LoRA tags are read: a style may carry some)
        _apply_styles(a)
    prompt, loras, recorded_prompt = _prompt_loras(a)
    if a.sd_upscale is not None:  # its tiles: --width × --height, A1111's 512x512 by default
        a.width = 512 if a.width is None else a.width
        a.height = 512 if a.height is None else a.height
    if not (math.isfinite(a.noise_multiplier) and
            0 <= a.noise_multiplier <= MAX_NOISE_MULTIPLIER):
        raise SdrtError(f"--noise-multiplier must be a number from 0 to "
                        f"{MAX_NOISE_MULTIPLIER:g}, got {a.noise_multiplier:g}")
    if a.strength is None:  # A1111's defaults: image to image 0.8, the hires fix 0.75
        a.strength = 0.75 if a.hr_scale is not None or a.hr_resize is not None else 0.8
    request = GenerationRequest(
        prompt=prompt, negative_prompt=a.negative, height=a.height, width=a.width,
        num_inference_steps=a.steps, guidance_scale=a.guidance, sampler=a.sampler, seed=a.seed,
        strength=a.strength, num_images_per_prompt=a.batch, clip_skip=a.clip_skip,
        output_type="pil", has_image=a.init_image is not None, prompt_syntax=a.prompt_syntax,
        subseed=a.subseed, subseed_strength=a.subseed_strength, pag_scale=a.pag_scale,
        seed_resize_from=a.seed_resize_from, guidance_rescale=a.guidance_rescale,
        initial_noise_multiplier=a.noise_multiplier if a.init_image is not None else 1.0,
        zero_out_negative=a.zero_out_negative,
        guidance_rescale_style=a.guidance_rescale_style,
        **_sdxl_fields(a),
    ).check(names=OPTION_NAMES, limits=Limits.from_env())
    sd = _sd_upscale(a)
    if sd is not None and request.subseed_strength:
        raise SdrtError("--subseed-strength cannot be combined with --sd-upscale yet (its tiles "
                        "draw their own seeds)")
    if sd is not None and request.seed_resize_from:
        raise SdrtError("--seed-resize-from cannot be combined with --sd-upscale yet (its tiles "
                        "draw their own seeds)")
    if sd is not None and a.tiling:
        raise SdrtError("--tiling cannot be combined with --sd-upscale yet (each of its tiles "
                        "would wrap around itself, not the picture)")
    hires = _hires(a, request)
    output = _output_path(a)
    _check_sources(a)
    init = mask = composite = canvas_mask = None
    if a.init_image is not None:
        from .images import read_image
        init = read_image(a.init_image, "init image")
        if a.workflow is not None:  # (as ComfyUI's LoadImage reads it)
            from .comfy import comfy_image
            init = comfy_image(init)
        if getattr(a, "outpaint", None) is not None:  # a workflow's ImagePadForOutpaint
            from .comfy import outpaint
            try:
                init, canvas_mask = outpaint(init, a.outpaint, Limits.from_env().max_side)
            except SdrtError as e:
                raise SdrtError(f"--workflow {a.workflow}: {e}") from None
    if sd is not None:  # no more tiles a call than there are
        request = dataclasses.replace(request, num_images_per_prompt=min(
            a.batch, _sd_upscale_tiles(a, init, sd[0])))
    if a.mask is not None or canvas_mask is not None:
        from .images import MAX_MASK_BLUR, blur_mask, mask_to_float, read_image
        if init is None:
            raise SdrtError("--mask needs --init-image, the image to inpaint")
        from .inpaint import MAX_PADDING
        if a.refiner is not None:
            raise SdrtError("--mask cannot be combined with --refiner (the refiner continues "
                            "a text-to-image run)")
        if a.resize_mode == "latent" and a.inpaint_area == "whole":
            raise SdrtError("--resize-mode latent (A1111's latent upscale) cannot inpaint the "
                            "whole picture: use resize, crop or fill, or --inpaint-area masked")
        for option, value, top in (("--mask-blur", a.mask_blur, MAX_MASK_BLUR),
                                   ("--masked-padding", a.masked_padding, MAX_PADDING)):
            if not 0 <= value <= top:
                raise SdrtError(f"{option} must be an integer from 0 to {top}, got {value}")
        mask = None if a.mask is None else read_image(a.mask, "mask")
        if getattr(a, "mask_channel", None) is None:
            mask = mask_to_float(mask)
        else:  # a workflow's: read and grown as ComfyUI does, at the init image's size
            from .comfy import workflow_masks
            read, mask = workflow_masks(canvas_mask if mask is None else mask, a.mask_channel,
                                        a.mask_ops, init.width, init.height, a.mask_grow)
            if a.mask_composite:  # (the results laid over the init image through it, ungrown)
                composite = (init, 1 - read if a.invert_mask else read)
        mask = blur_mask(1 - mask if a.invert_mask else mask, a.mask_blur)
    cli_control.check(a)
    hints = cli_control.read_images(a)
    references = _reference_images(a)
    _warn_unused_options(a)

    pipe = _pipeline(a)  # imports torch
    if a.zero_snr:
        pipe.set_scheduler_config(**ZERO_SNR)
    refiner = _refiner(a, pipe)
    if getattr(a, "refiner_steps", None) is not None:
        from .samplers import switch_after
        a.refiner_start = switch_after(pipe.scheduler_config, a.sampler, a.steps,
                                       a.refiner_steps)
    if a.vae is not None:  # (A1111 decodes with its SD VAE whichever model is loaded)
        for model in filter(None, (pipe, refiner)):
            model.load_vae(a.vae)
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    if a.vae_tiling:
        for model in filter(None, (pipe, refiner)):
            model.enable_vae_tiling()
    if a.tiling:
        for model in filter(None, (pipe, refiner)):
            model.enable_seamless_tiling()
    if a.freeu is not None:
        b1, b2, s1, s2 = a.freeu
        pipe.enable_freeu(s1, s2, b1, b2, a.freeu_style)
    tokens = [pipe.load_textual_inversion(path) for path in a.embedding]
    controls = cli_control.load(a, pipe)
    image_prompt = _load_ip_adapters(a, pipe, references)
    if init is None and hints and request.height is None and request.width is None:
        # As diffusers' ControlNet pipelines: the control image sets the size.
        f = pipe.vae_scale_factor
        request = dataclasses.replace(request, height=hints[0].height - hints[0].height % f,
                                      width=hints[0].width - hints[0].width % f)
    if init is None or sd is not None:
        # What depends on the model (sizes against the VAE, --clip-skip against the text
        # encoder, the request's memory against the device's), named as the options are.
        # An image-to-image request's size is the image's: the pipeline checks it (an SD
        # upscale's is its tiles').
        request = pipe.check(request, names=OPTION_NAMES)
        sampler = request.sampler
    else:
        from .samplers import default_sampler
        sampler = a.sampler or default_sampler(pipe.scheduler_config)
    inpaint, masked_content, grid = None, "original", None
    if init is not None:  # the size asked for, or the image's cut to the VAE's scale factor
        f = pipe.vae_scale_factor
        width = request.width or init.width - init.width % f
        height = request.height or init.height - init.height % f
        if min(width, height) < f:
            raise SdrtError(f"init image must be at least {f} pixels high and wide (the VAE's "
                            f"scale factor), got {init.width}x{init.height}")
    if mask is not None:  # A1111's framing: the overlay, and only the masked area if asked
        from .inpaint import MASKED_CONTENT, prepare
        fill, masked_content = MASKED_CONTENT[a.masked_content.replace("-", " ")]
        inpaint = prepare(init, mask, width, height, a.inpaint_area == "masked",
                          a.masked_padding, fill=fill, resize_mode=a.resize_mode)
        if not getattr(a, "inpaint_overlay", True):  # (a workflow's: decoded as it is)
            inpaint.overlay = None
        init, mask = inpaint.image, inpaint.mask
    elif sd is not None:  # the init image upscaled and cut into tiles of the size
        grid = _sd_upscale_grid(a, sd, init, pipe)
    elif init is not None:  # A1111's resize mode
        from .images import frame_init_image
        init = frame_init_image(init, width, height, a.resize_mode)
    plans = _static_plans(a, pipe, request, sampler, hires,
                          None if init is None else (width, height, mask is not None), controls,
                          image_prompt.get("ip_adapter"))
    left = len(grid.tiles()) % request.batch_size if grid is not None else 0
    if plans and left:  # the SD upscale's last call, of fewer tiles
        plans += _static_plans(a, pipe, dataclasses.replace(request, num_images_per_prompt=left),
                               sampler, image=(width, height, False))
    # The control images at the size drawn at: a hires fix's larger one (the first pass gets
    # them resized down), else the request's.
    drawn = ((width, height) if init is not None else
             hires.target(request.width, request.height, pipe.vae_scale_factor)[:2]
             if hires is not None else (request.width, request.height))
    control = cli_control.call(a, hints, controls, *drawn, first=(request.width, request.height)
                               if init is None else None, inpaint=inpaint)
    if a.final_upscale is not None:  # the saved size, checked before anything is drawn
        for option, side in zip(("width", "height"), a.final_upscale.scaling(*drawn)[1:3]):
            if not 1 <= side <= Limits.from_env().max_side:
                raise SdrtError(f"--workflow {a.workflow} upscales the saved images to a "
                                f"{option} of {side}; it must be from 1 to "
                                f"{Limits.from_env().max_side} (SDRT_MAX_SIDE)")
    # Image i of a batch is drawn from its own generator, seeded seed + i, as A1111 does: its
    # PNG records that seed, and --seed with it regenerates that image alone.
    seed = request.draw_seed()
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(1 if grid else a.batch)]
    import torch
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    # A1111's variation seed: image i's noise moves towards that of subseed + i.
    subseeds = ([(request.draw_subseed() + i) % (MAX_SEED + 1) for i in range(a.batch)]
                if request.subseed_strength else [None] * a.batch)
    variation = (dict(subseed=subseeds, subseed_strength=request.subseed_strength)
                 if request.subseed_strength else {})
    if request.seed_resize_from:
        variation["seed_resize_from"] = request.seed_resize_from
    # A callback would make a static plan run its denoising loop eagerly: no bar then.
    call = dict(negative_prompt=a.negative, num_inference_steps=a.steps,
                guidance_scale=a.guidance, generator=generators, clip_skip=a.clip_skip,
                prompt_syntax=a.prompt_syntax, num_images_per_prompt=a.batch,
                **_guidance(request), **_eta(a), **image_prompt)
    if request.initial_noise_multiplier != 1:  # (image to image: SD upscale's tiles too)
        call["initial_noise_multiplier"] = request.initial_noise_multiplier
    if request.zero_out_negative:
        call["zero_out_negative"] = True
    with _Progress() as progress:
        if hires is not None:
            from .hires import generate as hires_generate
            upscaler = None
            if a.hr_upscaler_path is not None:
                from .upscaler import load_upscaler
                upscaler = load_upscaler(a.hr_upscaler_path, pipe.device, pipe.dtype,
                                         name=hires.upscaler)
            images = hires_generate(pipe, hires, prompt, call.pop("negative_prompt"),
                                    request.height, request.width, call.pop("num_inference_steps"),
                                    sampler, call.pop("generator"), **_sdxl_fields(a), **call,
                                    **variation,
                                    **control, control_units=cli_control.hires_units(a),
                                    upscaler=upscaler,
                                    callback=None if plans else progress)
        elif grid is not None:  # A1111's SD upscale: one picture of --batch tiles a call
            from .sd_upscale import redraw, tile_seeds
            del call["generator"], call["num_images_per_prompt"]
            tiles = [s % (MAX_SEED + 1) for s in tile_seeds(seed, len(grid.tiles()), a.batch,
                                                            1)[0]]
            images = [redraw(pipe, grid, tiles, a.batch, prompt=prompt, sampler=sampler,
                             strength=a.strength, callback=None if plans else progress,
                             **_sdxl_fields(a), **call)]
        else:
            images = pipe(prompt, height=request.height, width=request.width, sampler=sampler,
                          image=init, mask_image=mask, strength=a.strength,
                          masked_content=masked_content,
                          latent_resize=init is not None and a.resize_mode == "latent",
                          callback=None if plans else progress,
                          output_type="latent" if refiner else "pil", **_sdxl_fields(a),
                          **control, **call, **variation)
    if refiner is not None:
        # The base's partly denoised latents, one row per image, finished by the refiner.
        with _Progress() as progress:
            images = refiner(prompt, image=images, denoising_start=a.refiner_start,
                             sampler=a.sampler, callback=progress,
                             aesthetic_score=a.aesthetic_score,
                             negative_aesthetic_score=a.negative_aesthetic_score,
                             original_size=a.original_size, crops_coords_top_left=a.crop,
                             **call)
        timings = {k: pipe.timings.get(k, 0) + refiner.timings.get(k, 0)
                   for k in ("text", "denoise", "decode", "unet_calls")}
        pipe.timings = timings
    # The size the model drew at (a hires fix's first pass, an SD upscale's tiles), which the
    # PNG records.
    width, height = (request.width, request.height) if hires or grid else images[0].size
    if inpaint is not None:
        images = [inpaint.finish(im) for im in images]
    if composite is not None:  # a workflow's ImageCompositeMasked
        from .comfy import composite as lay_over
        images = [lay_over(composite[0], im, composite[1]) for im in images]
    if a.final_upscale is not None:  # the workflow's upscale of its saved images
        from .upscaler import load_upscaler
        name = a.final_upscale.model
        from .cli_upscale import folder_models
        path = folder_models(a.upscaler_dir)[name]
        images = a.final_upscale.run(load_upscaler(path, pipe.device, pipe.dtype, name=name),
                                     images)
    if a.runtime == "onnx":  # networks in onnxruntime: named by the export, not hashed
        name, short_hash = os.path.basename(os.path.normpath(a.onnx_dir)), None
    else:
        name, short_hash, _ = model_identity(a.model, pipe)
    if png_model is not None and png_model[1] and short_hash and png_model[1] != short_hash:
        warnings.warn(f"--from-png {a.from_png} was made with model {png_model[0]} "
                      f"[{png_model[1]}], this is {name} [{short_hash}]: the image will differ")
    lora_hashes = tuple((file_stem(path), file_hash(path)) for path, _ in loras)
    units = cli_control.infotext(a, [(name, file_hash(path) if os.path.isfile(path) else None)
                                     for (path, _), name in zip(a.controlnet, controls)])
    ip_names = cli_control.ip_names(a)
    units += cli_control.ip_infotext(
        a, [(name, file_hash(path)) for (path, _), name in zip(a.ip_adapter, ip_names)],
        [pipe.image_encoder(n).config.hidden_size for n in ip_names], len(units))
    ti_hashes = tuple((token, file_hash(path)) for token, path in zip(tokens, a.embedding))
    vae = {}
    if a.vae is not None:
        vae = dict(zip(("vae_name", "vae_hash"), _vae_identity(a.vae)))
    refined = {}
    if refiner is not None:
        refiner_name, refiner_hash, _ = model_identity(a.refiner, refiner)
        refined = dict(refiner=f"{refiner_name} [{refiner_hash}]" if refiner_hash
                       else refiner_name, refiner_switch_at=a.refiner_start)
    script = tuple(sd_upscale_params(a.sd_upscale_overlap, sd[0]).items()) if grid else ()
    infos = [str(Infotext(prompt=recorded_prompt, negative_prompt=a.negative or "",
                          steps=a.steps, sampler=sampler, cfg_scale=a.guidance, seed=s,
                          width=width, height=height, model_name=name, model_hash=short_hash,
                          denoising_strength=(hires.strength if hires else a.strength
                                              if init is not None else None),
                          hires=tuple(hires.params().items()) if hires else (),
                          script=script,
                          clip_skip=a.clip_skip, lora_hashes=lora_hashes,
                          mask_blur=a.mask_blur if mask is not None else None,
                          noise_multiplier=request.initial_noise_multiplier,
                          masked_padding=(a.masked_padding if mask is not None
                                          and a.inpaint_area == "masked" else None),
                          masked_content=(a.masked_content.replace("-", " ")
                                          if mask is not None
                                          and a.masked_content != "original" else None),
                          ti_hashes=ti_hashes, controlnets=units, subseed=ss,
                          subseed_strength=request.subseed_strength,
                          seed_resize_from=request.seed_resize_from,
                          eta_ddim=(a.eta if a.eta and sampler_family(sampler) == "ddim"
                                    else None), tiling=a.tiling, **refined, **vae))
             for s, ss in zip(seeds, subseeds)]
    paths, taken = _save_pngs(images, output, infos, a.overwrite)
    print(_summary(pipe.timings, plans, seed, paths, taken))


def _reference_images(a):
    """The --ip-adapter-image files and --ip-adapter-mask files (float32 (H, W) in [0, 1], or
    None for 'none'), read and checked against --ip-adapter's count."""
    for option, given in (("--ip-adapter-image", a.ip_adapter_image),
                          ("--ip-adapter-mask", a.ip_adapter_mask)):
        if len(given) != len(a.ip_adapter) and (given or option == "--ip-adapter-image"):
            raise SdrtError(f"{option} must be given once per --ip-adapter (got "
                            f"{len(given)} for {len(a.ip_adapter)})")
    if a.image_encoder is not None and not a.ip_adapter:
        raise SdrtError("--image-encoder needs --ip-adapter (it is what IP-Adapters read)")
    for path in [p for p, _ in a.ip_adapter] + [a.image_encoder or "."]:
        if not os.path.exists(path):
            raise SdrtError(f"{'--image-encoder' if path == a.image_encoder else '--ip-adapter'} "
                            f"{path}: no such file or folder")
    per = lambda v: v if isinstance(v, list) else [v]  # noqa: E731 (a workflow's: per node)
    for start, end in zip(per(a.ip_adapter_start), per(a.ip_adapter_end)):
        if not 0 <= start < end <= 1:
            raise SdrtError(f"--ip-adapter-start and --ip-adapter-end must satisfy 0 <= start < "
                            f"end <= 1, got {start:g} and {end:g}")
    from .images import mask_to_float, read_image
    channels = getattr(a, "ip_adapter_mask_channels", None) or [None] * len(a.ip_adapter_mask)

    def read_mask(path, channel):  # (a workflow's: its channel, as ComfyUI reads a MASK)
        if channel is None:
            return mask_to_float(read_image(path, "ip-adapter mask"))
        from .comfy import comfy_mask
        return comfy_mask(read_image(path, "ip-adapter mask"), channel)
    masks = [None if path == "none" else read_mask(path, channel)
             for path, channel in zip(a.ip_adapter_mask, channels)]
    images = [read_image(path, "ip-adapter image") for path in a.ip_adapter_image]
    preps = getattr(a, "ip_adapter_prep", None)
    if preps is not None:  # a workflow's: each image as its IPAdapterAdvanced node prepares it
        from .clip_vision import encoder_config
        from .comfy import clip_vision_image
        size = encoder_config(a.image_encoder).image_size
        images = [clip_vision_image(im, size, prep) for im, prep in zip(images, preps)]
    return images, masks


def _load_ip_adapters(a, pipe, references):
    """Load each --ip-adapter (named by its file, numbered where two are the same); the
    pipeline arguments that run them, {} without."""
    if not a.ip_adapter:
        return {}
    names = cli_control.ip_names(a)
    for (path, _), name in zip(a.ip_adapter, names):
        pipe.load_ip_adapter(path, image_encoder=a.image_encoder, name=name)
    images, masks = references
    regions = ({"ip_adapter_mask": masks} if any(m is not None for m in masks) else {})
    if regions and getattr(a, "ip_adapter_prep", None) is not None:
        regions["ip_adapter_mask_style"] = "a1111"  # (a workflow's: soft, bilinear, as cubiq's)
    scales = [w for _, w in a.ip_adapter]
    types = getattr(a, "ip_adapter_weight_types", None)
    if types is not None:  # a workflow's: its nodes' weight types, per transformer block
        from .comfy import adapter_scale
        from .ip_adapter import file_config
        scales = [adapter_scale(t, w, pipe.unet, file_config(path))
                  for t, (path, w) in zip(types, a.ip_adapter)]
    return dict(ip_adapter=names, ip_adapter_image=images, **regions,
                ip_adapter_scale=scales,
                ip_adapter_guidance_start=a.ip_adapter_start,
                ip_adapter_guidance_end=a.ip_adapter_end)


def _hires(a, request):
    """The hires fix asked for (--hr-scale or --hr-resize), checked; None without one."""
    if a.hr_scale is None and a.hr_resize is None:
        return None
    if {"hr_scale", "hr_resize"} <= a.given:
        raise SdrtError("--hr-scale and --hr-resize cannot both be given: the hires fix "
                        "scales by one or resizes to the other")
    from .hires import Hires
    for option, value in (("--init-image", a.init_image), ("--refiner", a.refiner)):
        if value is not None:
            raise SdrtError(f"--hr-scale/--hr-resize (the hires fix) redraws a text-to-image "
                            f"run; it cannot be combined with {option}")
    h, w = a.hr_resize or (0, 0)
    from .cli_upscale import folder_models, model_choice
    from .hires import UPSCALERS
    models = folder_models(a.upscaler_dir)
    # A file's model is named by its stem: the PNG records that name, as A1111's.
    name, a.hr_upscaler_path = model_choice(a.hr_upscaler, models, "--hr-upscaler", UPSCALERS)
    if a.hr_upscaler_path is not None:
        models[name] = a.hr_upscaler_path
    hires = Hires(scale=a.hr_scale if a.hr_scale is not None else 2.0,
                  upscaler=name, steps=a.hr_steps,
                  strength=a.strength, resize_x=w,
                  resize_y=h, sampler=a.hr_sampler, prompt=a.hr_prompt,
                  negative_prompt=a.hr_negative, comfy_upscale=a.hr_comfy_upscale)
    limits = Limits.from_env()
    names = {"scale": "--hr-scale", "upscaler": "--hr-upscaler", "steps": "--hr-steps",
             "strength": "--strength", "resize_x": "--hr-resize", "resize_y": "--hr-resize",
             "sampler": "--hr-sampler", "prompt": "--hr-prompt",
             "negative_prompt": "--hr-negative"}
    hires.check(names, limits.max_side, limits.max_steps, model_upscalers=tuple(models))
    width, height = request.width or 512, request.height or 512
    for option, side in zip(("width", "height"), hires.target(width, height)[:2]):
        if side > limits.max_side:
            raise SdrtError(f"the hires fix's {option} must be at most {limits.max_side} "
                            f"pixels (SDRT_MAX_SIDE), got {side}")
    return hires


def _sd_upscale(a):
    """--sd-upscale (A1111's SD upscale script) checked: (its upscaler's name, the model file
    or None); None without it. Its tiles are --width × --height, already filled in."""
    if a.sd_upscale is None:
        return None
    from .cli_upscale import folder_models, upscaler_option
    from .extras import MAX_SCALE
    from .sd_upscale import MAX_OVERLAP
    if not 1 <= a.sd_upscale <= MAX_SCALE:
        raise SdrtError(f"--sd-upscale must be a number from 1 to {MAX_SCALE:g}, got "
                        f"{a.sd_upscale:g}")
    if a.init_image is None:
        raise SdrtError("--sd-upscale upscales and redraws --init-image: pass it")
    for option, value in (("--mask", a.mask), ("--hr-scale", a.hr_scale),
                          ("--hr-resize", a.hr_resize), ("--refiner", a.refiner),
                          ("--workflow", a.workflow), ("--controlnet", a.controlnet),
                          ("--ip-adapter", a.ip_adapter)):
        if value is not None and value != []:
            raise SdrtError(f"--sd-upscale (A1111's SD upscale) redraws tiles of --init-image "
                            f"by plain image to image; it cannot be combined with {option}")
    top = min(MAX_OVERLAP, a.width - 1, a.height - 1)
    if not 0 <= a.sd_upscale_overlap <= top:
        raise SdrtError(f"--sd-upscale-overlap must be an integer from 0 to {top} (below the "
                        f"tiles' sides, {a.width}x{a.height}), got {a.sd_upscale_overlap}")
    return upscaler_option(a.sd_upscale_upscaler, folder_models(a.upscaler_dir),
                           "--sd-upscale-upscaler")


def _sd_upscale_tiles(a, init, upscaler):
    """How many tiles --sd-upscale cuts the ``init`` image into once ``upscaler`` upscales
    it; refused where that picture is smaller than a tile or past SDRT_MAX_SIDE."""
    from .extras import UPSCALER_NONE
    from .sd_upscale import tile_count, upscaled_size
    width, height = upscaled_size(init.width, init.height, a.sd_upscale, upscaler)
    where = (f"--init-image {a.init_image} ({init.width}x{init.height}) upscaled by "
             f"{a.sd_upscale:g} with {upscaler}" if upscaler != UPSCALER_NONE else
             f"--init-image {a.init_image} (--sd-upscale-upscaler None: not upscaled)")
    top = Limits.from_env().max_side
    if max(width, height) > top:
        raise SdrtError(f"{where} is {width}x{height}; each side must be at most {top} "
                        f"(SDRT_MAX_SIDE)")
    return tile_count(width, height, a.width, a.height, a.sd_upscale_overlap, where)


def _sd_upscale_grid(a, sd, init, pipe):
    """The --sd-upscale tiles (a ``sd_upscale.Grid``): the init image upscaled by its
    upscaler (a model loaded on the pipeline's device, in its dtype) and cut up."""
    from .sd_upscale import split, upscale
    name, path = sd
    model = None
    if path is not None:
        from .upscaler import load_upscaler
        model = load_upscaler(path, pipe.device, pipe.dtype, name=name)
    picture = upscale(init, a.sd_upscale, name, lambda _, field: model)
    return split(picture, a.width, a.height, a.sd_upscale_overlap)


# -- checks before torch is imported -----------------------------------------------------------

def _sdxl_fields(a):
    """The request fields of the SDXL options (None where not given: the model's default);
    with --refiner, the base stops at --refiner-start."""
    fields = dict(prompt_2=a.prompt_2, negative_prompt_2=a.negative_2,
                  original_size=a.original_size, target_size=a.target_size,
                  crops_coords_top_left=a.crop, negative_original_size=a.negative_original_size,
                  negative_target_size=a.negative_target_size,
                  negative_crops_coords_top_left=a.negative_crop)
    if a.refiner is not None:
        fields["denoising_end"] = a.refiner_start
    else:  # without a refiner these go to the model itself (an SDXL refiner given as --model)
        fields.update(aesthetic_score=a.aesthetic_score,
                      negative_aesthetic_score=a.negative_aesthetic_score)
    return fields


def _refiner(a, pipe):
    """The --refiner pipeline (None without one), on the base's device and dtype; it must be
    a model that continues the base's latents (an SDXL refiner for an SDXL base)."""
    if a.refiner is None:
        return None
    from .pipeline import refiner_for
    return refiner_for(pipe, a.refiner, a.vae_dtype, "--refiner", "--model")


def _prompt_loras(a):
    """A1111's ``<lora:NAME:SCALE>`` tags in the prompt → (the prompt without them, the LoRAs
    to apply as [(path, scale)], the prompt the PNG records). A tag names a --lora file by its
    name and sets its scale; a --lora file without a tag is applied at its own scale and its
    tag is added to the recorded prompt, as A1111 writes it."""
    try:
        prompt, tags = lora_tags(a.prompt)
    except ValueError as e:
        raise SdrtError(f"prompt: {e}") from None
    files = {file_stem(path): (path, scale) for path, scale in a.lora}
    for name, _ in tags:
        if name not in files:
            raise SdrtError(f"prompt names <lora:{name}>, but no --lora file is named "
                            f"{name}.safetensors; pass --lora PATH/{name}.safetensors")
    scales = dict(tags)
    loras = [(path, scales.get(file_stem(path), scale)) for path, scale in a.lora]
    recorded = " ".join([a.prompt] + [lora_tag(file_stem(path), scale) for path, scale in loras
                                      if file_stem(path) not in scales])
    return prompt, loras, recorded


def _built_in_defaults(a):
    """Without --model, the built-in demo model runs at the settings it was tuned for (its
    ``demo_defaults``: fewer steps and a lower guidance than diffusers' 50 and 7.5) where
    --steps, --guidance and --sampler are not given; --from-png's settings still win."""
    if a.model is not None or a.runtime != "torch":
        return
    from .demo.model import demo_config
    defaults = demo_config()["demo_defaults"]
    for attr, key in (("steps", "num_inference_steps"), ("guidance", "guidance_scale"),
                      ("sampler", "sampler")):
        if attr not in a.given:
            setattr(a, attr, defaults[key])


def _png_size(text):
    """A PNG info's ``WxH`` → (height, width); ValueError where it is not one."""
    try:
        return size_arg(text)
    except argparse.ArgumentTypeError:
        raise ValueError(text) from None


# PNG info key → (option, its attribute, how the value reads)
_PNG_SETTINGS = {  # a sampler reads with its schedule type (_SCHEDULE_TYPE_KEYS)
    "Steps": ("--steps", "steps", int),
    "Sampler": ("--sampler", "sampler", "sampler"),
    "CFG scale": ("--guidance", "guidance", float),
    "Seed": ("--seed", "seed", int),
    "Variation seed": ("--subseed", "subseed", int),
    "Variation seed strength": ("--subseed-strength", "subseed_strength", float),
    "Seed resize from": ("--seed-resize-from", "seed_resize_from", _png_size),
    "Clip skip": ("--clip-skip", "clip_skip", lambda v: int(v) - 1 if int(v) >= 1 else None),
    # (A1111 counts from 1)
    "Tiling": ("--tiling", "tiling", {"True": True, "False": False}.get),
    "Mask blur": ("--mask-blur", "mask_blur", int),
    "Inpaint area": ("--inpaint-area", "inpaint_area",
                     {"Only masked": "masked", "Whole picture": "whole"}.get),
    "Masked area padding": ("--masked-padding", "masked_padding", int),
    "Noise multiplier": ("--noise-multiplier", "noise_multiplier", float),
    "Masked content": ("--masked-content", "masked_content",
                       {"fill": "fill", "original": "original", "latent noise": "latent-noise",
                        "latent nothing": "latent-nothing"}.get),
    "Hires upscale": ("--hr-scale", "hr_scale", float),
    "Hires steps": ("--hr-steps", "hr_steps", int),
    "Hires upscaler": ("--hr-upscaler", "hr_upscaler", str),
    "Hires sampler": ("--hr-sampler", "hr_sampler", "sampler"),
    "Hires prompt": ("--hr-prompt", "hr_prompt", str),
    "Hires negative prompt": ("--hr-negative", "hr_negative", str),
    "SD upscale overlap": ("--sd-upscale-overlap", "sd_upscale_overlap", int),
    "SD upscale upscaler": ("--sd-upscale-upscaler", "sd_upscale_upscaler", str),
}

# A1111 1.9 on writes "Sampler: DPM++ 2M, Schedule type: Karras" (before: "DPM++ 2M Karras").
_SCHEDULE_TYPE_KEYS = {"Sampler": "Schedule type", "Hires sampler": "Hires schedule type"}


@functools.cache
def _vae_identity(path):
    """(name, hash) of a --vae file or folder as A1111 records it: the file's name and the
    first 10 hex digits of its sha256; hashed once."""
    return os.path.basename(os.path.normpath(path)), model_identity(path, None)[1]


def _float_or_none(text):
    try:
        return float(text)
    except ValueError:
        return None


def _apply_png(a):
    """--from-png: every setting the image's PNG info records, for each option not given on
    the command line. Returns the (name, hash) of the model it records."""
    from .images import read_image
    from .infotext import parse, sampler_id
    info = read_image(a.from_png, "--from-png image").info
    text = info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        comfy = "; it holds a ComfyUI workflow: pass it as --workflow" if "prompt" in info else ""
        raise SdrtError(f"--from-png {a.from_png} has no PNG info (no 'parameters' text)"
                        f"{comfy}")
    prompt, negative, pairs = parse(text)
    if a.prompt is None:
        a.prompt = prompt
    if "negative" not in a.given and negative:
        a.negative = negative
    for key, (option, attr, read) in _PNG_SETTINGS.items():
        if key not in pairs or attr in a.given:
            continue
        value, schedule_type = pairs[key], pairs.get(_SCHEDULE_TYPE_KEYS.get(key))
        try:
            value = sampler_id(value, schedule_type) if read == "sampler" else read(value)
        except ValueError:
            value = None
        if value is None:
            schedule = (f" with {_SCHEDULE_TYPE_KEYS[key]} {schedule_type!r}"
                        if read == "sampler" and schedule_type else "")
            raise SdrtError(f"--from-png {a.from_png}: {key} {pairs[key]!r}{schedule} is not a "
                            f"value {option} takes")
        setattr(a, attr, value)
    for key, value in zip(("Beta schedule alpha", "Beta schedule beta"), BETA_SHAPE):
        if key in pairs and _float_or_none(pairs[key]) != value:
            raise SdrtError(f"--from-png {a.from_png}: {key} {pairs[key]!r} is not sdrt's: its "
                            f"beta schedule is A1111's default, Beta{BETA_SHAPE}")
    if "Eta DDIM" in pairs and "eta" not in a.given and sampler_family(a.sampler) == "ddim":
        a.eta = _float_or_none(pairs["Eta DDIM"])  # (sdrt's DDIM takes A1111's eta)
        if a.eta is None:
            raise SdrtError(f"--from-png {a.from_png}: Eta DDIM {pairs['Eta DDIM']!r} is not "
                            f"a value --eta takes")
    for key in ("Eta", "Eta DDIM"):  # (A1111 writes them where they are not its defaults)
        problem = (sampler_setting_problem(a.sampler, eta=_float_or_none(pairs[key]))
                   if key in pairs and a.sampler and "sampler" not in a.given else None)
        if problem is not None:
            raise SdrtError(f"--from-png {a.from_png}: {key} {pairs[key]!r} is not sdrt's: it "
                            f"runs {sampler_label(a.sampler)} at A1111's default eta, "
                            f"{problem[1]:g}")
    if "Size" in pairs and not {"height", "width"} & a.given:
        w, _, h = pairs["Size"].partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise SdrtError(f"--from-png {a.from_png}: Size {pairs['Size']!r} is not WxH")
        a.width, a.height = int(w), int(h)
    given = {file_stem(path): path for path in [p for p, _ in a.lora] + a.embedding}
    for key, option in (("Lora hashes", "--lora"), ("TI hashes", "--embedding")):
        for entry in filter(None, (e.strip() for e in pairs.get(key, "").split(","))):
            name, _, recorded = (part.strip() for part in entry.partition(":"))
            if name not in given:
                warnings.warn(f"--from-png {a.from_png} used {name} [{recorded}]: pass "
                              f"{option} FILE for it, or the image will differ")
            elif os.path.isfile(given[name]) and recorded and \
                    file_hash(given[name]) != recorded:
                warnings.warn(f"--from-png {a.from_png} used {name} [{recorded}], but "
                              f"{given[name]} is [{file_hash(given[name])}]: the image will "
                              "differ")
    if "Hires resize" in pairs and "hr_resize" not in a.given:
        try:
            a.hr_resize = size_arg(pairs["Hires resize"])
        except argparse.ArgumentTypeError:
            raise SdrtError(f"--from-png {a.from_png}: Hires resize "
                            f"{pairs['Hires resize']!r} is not WxH") from None
    hires = any(k.startswith("Hires ") for k in pairs)
    sd_upscale = "SD upscale overlap" in pairs or "SD upscale upscaler" in pairs
    if sd_upscale and a.sd_upscale is None:
        warnings.warn(f"--from-png {a.from_png} was an SD upscale of an init image (SD upscale "
                      f"upscaler {pairs.get('SD upscale upscaler')}), whose scale A1111 does "
                      "not record: pass --init-image and --sd-upscale F, or this is not one")
    if (hires or sd_upscale or a.init_image is not None) and "Denoising strength" in pairs \
            and "strength" not in a.given:
        try:
            a.strength = float(pairs["Denoising strength"])
        except ValueError:
            raise SdrtError(f"--from-png {a.from_png}: Denoising strength "
                            f"{pairs['Denoising strength']!r} is not a number") from None
    if "Denoising strength" in pairs and a.init_image is None and not (hires or sd_upscale):
        warnings.warn(f"--from-png {a.from_png} was made from an init image (Denoising "
                      f"strength {pairs['Denoising strength']}); without --init-image this is "
                      "text-to-image")
    if "Mask blur" in pairs and a.mask is None:
        warnings.warn(f"--from-png {a.from_png} was inpainted (Mask blur "
                      f"{pairs['Mask blur']}); without --mask this is not")
    if "VAE" in pairs and a.vae is None:
        warnings.warn(f"--from-png {a.from_png} was decoded with VAE {pairs['VAE']}: pass --vae "
                      f"FILE for it, or the image will differ")
    elif "VAE hash" in pairs and a.vae is not None and os.path.isfile(a.vae) and \
            _vae_identity(a.vae)[1] != pairs["VAE hash"]:
        warnings.warn(f"--from-png {a.from_png} was decoded with VAE {pairs.get('VAE')} "
                      f"[{pairs['VAE hash']}], --vae {a.vae} is another: the image will differ")
    cli_control.from_png(a, pairs, f"--from-png {a.from_png}")
    return pairs.get("Model"), pairs.get("Model hash")


def _apply_workflow(a):
    """--workflow: a ComfyUI workflow's settings (``comfy.read``) for each option not given on
    the command line; the files it names (checkpoint, LoRAs, init image) must be given."""
    from . import comfy
    from .upscaler_config import file_config
    from .cli_upscale import folder_models
    models = folder_models(a.upscaler_dir)

    def upscaler_scale(name):
        if name not in models:
            raise SdrtError(f"pass --upscaler-dir DIR (the folder holding "
                            f"{name}.safetensors)")
        return file_config(models[name]).scale
    flow = comfy.read(comfy.load(a.workflow), upscaler_scale=upscaler_scale)
    where = f"--workflow {a.workflow}"
    a.final_upscale = flow.upscale
    if a.model is None:
        raise SdrtError(f"{where} loads checkpoint {flow.checkpoint!r}: pass --model PATH (that "
                        f"file, or its diffusers folder)")
    if flow.vae is not None and a.vae is None:
        raise SdrtError(f"{where} decodes with VAE {flow.vae!r}: pass --vae PATH (that file)")
    if flow.init_image is not None and a.init_image is None:
        raise SdrtError(f"{where} starts from image {flow.init_image!r} (image to image): pass "
                        f"--init-image PATH")
    if flow.mask is not None:  # (read as ComfyUI reads it, its result not pasted over)
        name, channel = flow.mask
        if name is None and a.mask is not None:
            raise SdrtError(f"{where} outpaints through its ImagePadForOutpaint's mask: --mask "
                            f"does not apply")
        if a.mask is None and name not in (None, flow.init_image):
            raise SdrtError(f"{where} inpaints through the {channel} of image {name!r}: pass "
                            f"--mask PATH")
        a.outpaint = flow.outpaint
        a.mask = a.mask or (a.init_image if name is not None else None)
        a.mask_channel, a.mask_grow, a.inpaint_overlay = channel, flow.grow_mask, False
        a.mask_composite, a.mask_ops = flow.composite, flow.mask_ops
        if "mask_blur" not in a.given:
            a.mask_blur = 0
    if a.prompt is None:
        a.prompt = flow.prompt
    if "prompt_syntax" not in a.given:  # (its prompts read as ComfyUI reads them)
        a.prompt_syntax = "comfy"
    if "negative" not in a.given and flow.negative:
        a.negative = flow.negative
    if flow.refiner is not None:
        if a.refiner is None:
            raise SdrtError(f"{where} refines with checkpoint {flow.refiner!r}: pass --refiner "
                            f"PATH (that file, or its diffusers folder)")
        if "refiner_start" not in a.given:  # (the base's steps: set once the model is loaded)
            a.refiner_steps = flow.refiner_steps
    if flow.freeu is not None and "freeu" not in a.given:
        *a.freeu, a.freeu_style = flow.freeu
    if flow.pag_scale and "pag_scale" not in a.given:
        a.pag_scale = flow.pag_scale
    if flow.zero_out_negative:
        a.zero_out_negative = True
    if flow.sampling is not None:
        kind, zsnr = flow.sampling
        if kind != "lcm" and "prediction_type" not in a.given:
            a.prediction_type = kind
        a.zero_snr = a.zero_snr or zsnr
    if flow.guidance_rescale and "guidance_rescale" not in a.given:
        a.guidance_rescale, a.guidance_rescale_style = flow.guidance_rescale, "comfy"
    if flow.negative_sizes is not None:
        for attr, value in zip(("negative_original_size", "negative_crop",
                                "negative_target_size"), flow.negative_sizes):
            if attr not in a.given:
                setattr(a, attr, value)
    for attr in ("seed", "steps", "guidance", "sampler", "clip_skip", "batch", "width",
                 "height", "strength", "prompt_2", "negative_2", "original_size", "crop",
                 "target_size", "aesthetic_score", "negative_aesthetic_score"):
        value = getattr(flow, attr)
        if value is not None and attr not in a.given:
            setattr(a, attr, value)
    given = {file_stem(path): i for i, (path, _) in enumerate(a.lora)}
    for name, strength in flow.loras:
        stem = file_stem(str(name))
        if stem not in given:
            raise SdrtError(f"{where} applies LoRA {name!r} ({lora_tag(stem, strength)}): pass "
                            f"--lora PATH/{stem}.safetensors")
        a.lora[given[stem]] = (a.lora[given[stem]][0], strength)
    if flow.controlnets:
        cli_control.from_workflow(a, flow.controlnets, where)
    if flow.ip_adapters:
        cli_control.ip_from_workflow(a, flow.ip_adapters, where)
    if flow.hires is not None and not {"hr_scale", "hr_resize"} & a.given:
        h = flow.hires
        if h.resize_x or h.resize_y:
            a.hr_resize = (h.resize_y, h.resize_x)
        else:
            a.hr_scale = h.scale
        for attr, value in (("hr_upscaler", h.upscaler), ("hr_steps", h.steps),
                            ("hr_sampler", h.sampler), ("strength", h.strength)):
            if attr not in a.given:
                setattr(a, attr, value)
        if "hr_upscaler" not in a.given:
            a.hr_comfy_upscale = h.comfy_upscale


def _output_path(a):
    """The path -o names (inside --outdir when given), checked: a .png whose folder can be
    written (--outdir: can be created)."""
    if not a.output.lower().endswith(".png"):
        raise SdrtError(f"-o {a.output} must end in .png")
    if a.outdir is None:
        path = a.output
        folder = os.path.dirname(os.path.abspath(path))
    else:
        if os.path.isabs(a.output):
            raise SdrtError(f"-o {a.output} is an absolute path: with --outdir, give a name "
                            "inside it")
        if os.path.exists(a.outdir) and not os.path.isdir(a.outdir):
            raise SdrtError(f"--outdir {a.outdir} is a file, not a folder")
        path = os.path.join(a.outdir, a.output)
        # The folder is created only when the images are written; its nearest existing
        # ancestor must take the new folder.
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SdrtError(f"cannot write to {folder}")
    return path


def _check_sources(a):
    """The model, config and ONNX folder named exist, and --runtime fits the other options."""
    for option, path in (("model path", a.model), ("--config", a.config),
                         ("--refiner", a.refiner), ("--vae", a.vae)):
        if path is not None and not os.path.exists(path):
            raise SdrtError(f"{option} {path} does not exist")
    if a.vae is not None and a.runtime == "onnx":
        raise SdrtError("--vae changes sdrt's own VAE; with --runtime onnx export the model "
                        "with that VAE instead")
    for option, path in [("--lora", p) for p, _ in a.lora] + [("--embedding", p)
                                                               for p in a.embedding]:
        check_file(path, option)
        if a.runtime == "onnx":
            raise SdrtError(f"{option} changes sdrt's own networks; with --runtime onnx "
                            f"export the model with {option} instead")
    if a.runtime == "onnx":
        if a.onnx_dir is None:
            raise SdrtError("--runtime onnx needs --onnx-dir")
        from .cli import check_export_folder
        check_export_folder(a.onnx_dir, "--onnx-dir")
        if a.dtype == "bf16":  # onnxruntime takes numpy arrays, and numpy has no bfloat16
            raise SdrtError("--runtime onnx runs in the export's dtype (fp32 or fp16), not "
                            "--dtype bf16")
        if a.vae_dtype != "auto":
            raise SdrtError("--runtime onnx runs the exported VAE in the export's dtype; "
                            "--vae-dtype applies to sdrt's own VAE")
    elif a.onnx_dir is not None:
        raise SdrtError("--onnx-dir is only used with --runtime onnx")


def _apply_styles(a):
    """--style NAME ...: A1111's styles of --styles-file applied to the prompt, the negative
    prompt and a hires fix's own (by default the first two as given, as A1111 styles all
    four); the PNG records the result."""
    from .styles import apply, read_styles
    if a.styles_file is None:
        raise SdrtError("--style needs --styles-file FILE (an A1111 styles.csv)")
    styles, most = read_styles(a.styles_file), Limits.from_env().max_prompt_chars
    prompt, negative = a.prompt, a.negative or ""
    a.prompt, a.negative = apply(styles, a.style, prompt, negative, "--style", most)
    if a.hr_prompt or a.hr_negative:  # (otherwise the second pass reads the first's)
        a.hr_prompt, a.hr_negative = apply(styles, a.style, a.hr_prompt or prompt,
                                           a.hr_negative or negative, "--style", most)
    a.negative = a.negative or None


def _warn_unused_options(a):
    """One warning per option given on the command line that does nothing in this call."""
    def unused(option, why):
        warnings.warn(f"{option} does nothing here: {why}")

    if "strength" in a.given and a.init_image is None and a.hr_scale is None and \
            a.hr_resize is None:
        unused("--strength", "it applies to --init-image and the hires fix")
    if a.hr_scale is None and a.hr_resize is None:
        for option in ("hr_upscaler", "hr_steps", "hr_sampler", "hr_prompt", "hr_negative"):
            if option in a.given:
                unused(f"--{option.replace('_', '-')}", "it applies to --hr-scale or "
                                                        "--hr-resize")
    if "resize_mode" in a.given:
        if a.init_image is None:
            unused("--resize-mode", "it applies to --init-image")
        elif a.sd_upscale is not None:
            unused("--resize-mode", "--sd-upscale cuts tiles of the size out of the upscaled "
                                    "image")
        elif a.mask is not None and a.inpaint_area == "masked":
            unused("--resize-mode", "with --inpaint-area masked the masked region is resized "
                                    "to the size (A1111's 'Only masked')")
    if a.noise_multiplier != 1 and a.init_image is None:
        unused("--noise-multiplier", "it applies to --init-image")
    if a.styles_file is not None and not a.style:
        unused("--styles-file", "it applies to --style")
    if not a.subseed_strength and "subseed" in a.given:
        unused("--subseed", "it applies to --subseed-strength above 0")
    if a.freeu is None and "freeu_style" in a.given:
        unused("--freeu-style", "it applies to --freeu")
    if a.eta and a.sampler and sampler_family(a.sampler) != "ddim":
        unused("--eta", "it applies to the ddim sampler")
    if not a.guidance_rescale and "guidance_rescale_style" in a.given:
        unused("--guidance-rescale-style", "it applies to --guidance-rescale above 0")
    if a.mask is None:
        if a.invert_mask:
            unused("--invert-mask", "it applies to --mask")
        for option in ("mask_blur", "inpaint_area", "masked_padding", "masked_content"):
            if option in a.given:
                unused(f"--{option.replace('_', '-')}", "it applies to --mask")
    elif "masked_padding" in a.given and a.inpaint_area != "masked":
        unused("--masked-padding", "it applies to --inpaint-area masked")
    if a.negative is not None and a.guidance <= 1:
        unused("--negative", f"--guidance {a.guidance:g} (1 or less) turns off the guidance "
                             "that uses it")
    if a.config is not None:
        if a.runtime == "onnx":
            unused("--config", "with --runtime onnx the configs come from --onnx-dir")
        elif a.model is None:
            unused("--config", "it applies to a single-file checkpoint, not the built-in model")
        elif os.path.isdir(a.model):
            unused("--config", f"it applies to a single-file checkpoint; {a.model} is a "
                               "diffusers folder with its own configs")
    if a.variant is not None:
        _warn_unused_variant(a, unused)
    if "refiner_start" in a.given and a.refiner is None:
        unused("--refiner-start", "it applies to --refiner")
    if a.sd_upscale is None:
        for option in ("sd_upscale_overlap", "sd_upscale_upscaler"):
            if option in a.given:
                unused(f"--{option.replace('_', '-')}", "it applies to --sd-upscale")
    if a.upscaler_dir is not None and a.hr_scale is None and a.hr_resize is None and \
            a.final_upscale is None and a.sd_upscale is None:
        unused("--upscaler-dir", "it applies to the hires fix, --sd-upscale and a workflow's "
                                 "upscale models")
    cli_control.warn_unused(a, unused)


def _warn_unused_variant(a, unused):
    if a.runtime == "onnx":
        unused("--variant", "with --runtime onnx the weights come from --onnx-dir")
    elif a.model is None:
        unused("--variant", "the built-in model has one set of weights")
    elif not os.path.isdir(a.model):
        unused("--variant", f"it applies to a diffusers folder; {a.model} is a single file")
    else:
        from .loading import WEIGHT_STEMS
        stems = {c: stem for c, stem in WEIGHT_STEMS.items()
                 if os.path.isdir(os.path.join(a.model, c))}  # the networks the model has
        without = [c for c, stem in sorted(stems.items())
                   if not any(os.path.isfile(os.path.join(a.model, c, f"{stem}.{a.variant}"
                                                                      f".safetensors{index}"))
                              for index in ("", ".index.json"))]
        if len(without) == len(stems):
            unused(f"--variant {a.variant}", f"{a.model} has no *.{a.variant}.safetensors "
                                             "files; the default weights are loaded")
        elif without:
            warnings.warn(f"--variant {a.variant}: {', '.join(without)} in {a.model} "
                          f"{'has' if len(without) == 1 else 'have'} no "
                          f"*.{a.variant}.safetensors file; the default weights are loaded "
                          "there")


# -- the model and the run ---------------------------------------------------------------------

def _pipeline(a):
    from .pipeline import Pipeline, resolve_device
    if a.runtime == "onnx":
        return _onnx_pipeline(a)
    device, dtype = resolve_device(a.device, a.dtype)
    if a.model is not None:
        return Pipeline.from_pretrained(a.model, device, dtype, variant=a.variant,
                                        config=a.config, prediction_type=a.prediction_type,
                                        vae_dtype=a.vae_dtype)
    from .demo.model import demo_pipeline
    return demo_pipeline(device, dtype, a.prediction_type, a.vae_dtype)


def _onnx_pipeline(a):
    """A Pipeline whose networks are the ONNX files of --onnx-dir, run by onnxruntime."""
    from sdrt.export.onnx_manifest import read_manifest
    from sdrt.export.onnx_runtime import onnx_components

    from .pipeline import Pipeline, resolve_device
    device, dtype = resolve_device(a.device, a.dtype or read_manifest(a.onnx_dir)["dtype"])
    c = onnx_components(a.onnx_dir, a.model, device)
    if a.prediction_type is not None:
        c.scheduler_config = {**c.scheduler_config, "prediction_type": a.prediction_type}
    return Pipeline(c, device, dtype)


def _static_plans(a, pipe, request, sampler, hires=None, image=None, controls=(),
                  ip_adapters=None):
    """The static plans of a checked ``request`` run with ``sampler`` and of its hires fix's
    second pass, built on CUDA unless --no-compile; [] where the request runs eagerly.
    ``image``: an image-to-image request's (width, height, masked), the framed init image's
    size and whether it inpaints; its plan runs at --strength. ``controls``: the names of
    the ControlNets loaded for it, ``ip_adapters`` of its IP-Adapters (one image each). Static plans run with the final text layer, in sdrt's own
    networks, the whole schedule (no refiner's hand-off)."""
    static = (request.clip_skip == 0 and a.runtime == "torch"
              and request.denoising_end is None and pipe.device.type == "cuda")
    if a.no_compile:
        if not static:
            warnings.warn("--no-compile does nothing here: only CUDA runs a static plan, and "
                          "not with --clip-skip, --refiner or --runtime onnx")
        return []
    if not static:
        return []
    chunks = pipe.text_inputs(request.texts(), request.prompt_syntax,
                              request.texts_2()).num_chunks
    width, height, masked = image or (request.width, request.height, False)
    control = dict(controlnet=controls or None, guess_mode=a.guess_mode and bool(controls),
                   ip_adapter=ip_adapters)
    if ip_adapters and any(p != "none" for p in a.ip_adapter_mask):
        control["ip_adapter_masks"] = [p != "none" for p in a.ip_adapter_mask]
    if controls and any(p != "none" for p in a.control_mask):
        control["control_masks"] = [p != "none" for p in a.control_mask]
    plans = [pipe.compile(height, width, request.batch_size, request.num_inference_steps,
                          sampler, guidance=request.guidance, num_chunks=chunks,
                          strength=None if image is None else request.strength,
                          masked=masked, prompt_syntax=request.prompt_syntax,
                          **_guidance(request), **control)]
    if hires is not None:  # the second pass: one prompt per image, at the upscaled size
        width, height, _, _ = hires.target(request.width, request.height, pipe.vae_scale_factor)
        steps, _ = hires.schedule_steps(request.num_inference_steps)
        second = dataclasses.replace(
            request, prompt=[hires.prompt] if hires.prompt else request.prompt,
            negative_prompt=([hires.negative_prompt] if hires.negative_prompt
                             else request.negative_prompt))
        chunks = pipe.text_inputs(second.texts(), request.prompt_syntax,
                                  second.texts_2()).num_chunks
        plans.append(pipe.compile(height, width, request.batch_size, steps,
                                  hires.sampler or request.sampler, guidance=request.guidance,
                                  num_chunks=chunks, strength=hires.strength,
                                  prompt_syntax=request.prompt_syntax,
                                  **_guidance(request), **control))
    return plans


def _guidance(request):
    """The checked request's arguments that change how guidance combines the UNet's passes,
    for the pipeline's calls and plans."""
    return dict(pag_scale=request.pag_scale, guidance_rescale=request.guidance_rescale,
                guidance_rescale_style=request.guidance_rescale_style)


def _eta(a):
    """--eta, checked: DDIM's share of fresh noise (the pipeline's ``eta``)."""
    if not 0 <= a.eta <= 1:
        raise SdrtError(f"--eta must be a number from 0 to 1, got {a.eta:g}")
    return {"eta": a.eta} if a.eta else {}


class _Progress:
    """The denoising bar on stderr, as a ``callback_on_step_end``; drawn at the first step, so
    a request refused up front prints no bar. Leaving the ``with`` block closes it: cleared
    after a finished run; kept, and ended with a newline, after Ctrl-C, so that "sdrt:
    interrupted" gets a line of its own."""

    def __init__(self):
        self.bar = None

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=pipe.num_timesteps, desc="denoising", unit="step",
                            file=sys.stderr, leave=False)
        elif step_index == 0:  # a second pass (the hires fix) starts its own count
            self.bar.reset(total=pipe.num_timesteps)
        self.bar.update(1)
        return None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.bar is not None:
            self.bar.leave = exc_type is KeyboardInterrupt
            self.bar.close()


# -- the output --------------------------------------------------------------------------------

def _candidates(path, n_images):
    """Names for the images, in order of preference: OUT.png, OUT-1.png, OUT-2.png, ... for
    one image; OUT-0.png, OUT-1.png, ... for several."""
    stem, ext = os.path.splitext(path)
    if n_images == 1:
        yield path
    for i in itertools.count(0 if n_images > 1 else 1):
        yield f"{stem}-{i}{ext}"


def _save_pngs(images, path, infotexts, overwrite):
    """Each image as a PNG with its PNG info, written by ``write_pngs``."""
    return write_pngs([png_bytes(image, infotext) for image, infotext in zip(images, infotexts)],
                      path, overwrite)


def write_pngs(blobs, path, overwrite):
    """Write each PNG's bytes atomically under its name (``_candidates``); without
    ``overwrite``, under the next name that is free (also against a file that appears
    meanwhile). Returns (the paths written, the names skipped because they were taken)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)  # --outdir
    names = _candidates(path, len(blobs))
    written, taken = [], []
    for data in blobs:
        for name in names:
            try:
                write_file(name, lambda fh: fh.write(data), overwrite)
            except FileExistsError:
                taken.append(name)
                continue
            except OSError as e:
                raise SdrtError(f"cannot write {name}: {e.strerror}") from None
            written.append(name)
            break
    return written, taken


def _summary(t, plans, seed, paths, taken):
    """One line: what the builds and each stage of the request took, the seed, the files."""
    built = sum(plan.build_seconds for plan in plans)
    parts = [f"build {built:.2f} s (static plan{'s' if len(plans) > 1 else ''})"] \
        if plans else []
    parts += [f"text {t['text']:.2f} s",
              f"denoise {t['denoise']:.2f} s "
              f"({t['unet_calls'] / max(t['denoise'], 1e-9):.1f} UNet calls/s)",
              f"decode {t['decode']:.2f} s", f"seed {seed}"]
    line = f"{' · '.join(parts)} → {', '.join(map(_shown, paths))}"
    if taken:
        line += (f" ({', '.join(map(_shown, taken))} {'exists' if len(taken) == 1 else 'exist'}; "
                 "--overwrite replaces)")
    return line


def _shown(path):
    """A path as it can be printed: bytes that are not UTF-8 (kept by Python as surrogates,
    which stdout cannot encode) as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
