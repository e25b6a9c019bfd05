"""The pipeline's owner: loads the model, builds the planned static shapes, and runs one batch
of rows as one pipeline call (only ever from the scheduler's worker thread)."""
import logging
import os

from sdrt.engine.errors import SdrtError
from sdrt.engine.model_files import by_name
from sdrt.engine.infotext import model_identity

from .scheduler import BatchKey

log = logging.getLogger("sdrt.serve")
DEFAULT_STEPS = 20  # A1111's UI default, for a model given with --model


class Runner:
    """Loads the model (``load``, in a background thread at start-up) and runs batches."""

    def __init__(self, config, metrics):
        self.config, self.metrics = config, metrics
        self.pipe = self.refiner = None
        self.model_name = self.model_hash = self.model_sha256 = None
        # --refiner's identity (what A1111's refiner_checkpoint names)
        self.refiner_name = self.refiner_hash = self.refiner_sha256 = None
        self.planned = {}  # BatchKey without batch -> batch sizes with a static plan
        # A request's steps and guidance when it gives none; guidance None: the API's own
        # default (7.5 for OpenAI's, 7 for A1111's).
        self.default_steps = self.default_guidance = None
        self._plans_seen = set()
        self._lora_files = None  # LoRA name (file stem) → path, in --lora-dir
        self._hashes = {}  # path → A1111's short hash of the file (LoRAs, ControlNets, VAEs)
        self._vae = None  # the VAE file decoding now (None: the model's own)
        self._own_vae = None  # the model's own VAE weights, on the host, once another loads
        self._ip_encoders = {}  # loaded IP-Adapter name → the image encoder path it reads
        self._upscaler = None  # the upscale model loaded last (one at a time)

    def load(self):
        import torch

        from sdrt.engine.demo.model import demo_config, demo_pipeline
        from sdrt.engine.pipeline import Pipeline, resolve_device
        from sdrt.engine.samplers import default_sampler
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        device, dtype = resolve_device(self.config.device, self.config.dtype)
        if self.config.model is None:
            # The built-in model runs at the settings it was tuned for, as in `sdrt generate`.
            pipe = demo_pipeline(device, dtype, self.config.prediction_type,
                                 vae_dtype=self.config.vae_dtype)
            tuned = demo_config()["demo_defaults"]
            self.default_steps = tuned["num_inference_steps"]
            self.default_guidance = tuned["guidance_scale"]
        else:
            pipe = Pipeline.from_pretrained(self.config.model, device=device, dtype=dtype,
                                            vae_dtype=self.config.vae_dtype,
                                            prediction_type=self.config.prediction_type)
            self.default_steps, self.default_guidance = DEFAULT_STEPS, None
        if self.config.default_steps is not None:
            self.default_steps = self.config.default_steps
        self.model_name, self.model_hash, self.model_sha256 = model_identity(
            self.config.model, pipe)
        self.pipe = pipe
        if self.config.zero_snr:
            from sdrt.engine.request import ZERO_SNR
            pipe.set_scheduler_config(**ZERO_SNR)
        self.scheduler_config = pipe.scheduler_config  # the model's own (a batch may change it)
        if self.config.refiner is not None:
            from sdrt.engine.pipeline import refiner_for
            self.refiner = refiner_for(pipe, self.config.refiner, self.config.vae_dtype,
                                       "--refiner", "--model")
            self.refiner_name, self.refiner_hash, self.refiner_sha256 = model_identity(
                self.config.refiner, self.refiner)
        if self.config.vae_tiling:
            for model in filter(None, (pipe, self.refiner)):
                model.enable_vae_tiling()
        self.embeddings, self.skipped_embeddings = self._load_embeddings()
        self.default_sampler = default_sampler(pipe.scheduler_config)
        self._build_plans()

    def default_size(self):
        h, w = self.pipe.default_size()
        return w, h

    def _build_plans(self):
        """Static plans for each ``--compile`` size at the default steps and sampler, with
        guidance, for batch 1 and ``max_batch`` (what a busy server runs most)."""
        sizes = self.config.compile
        if not sizes:
            return
        batches = sorted({1, self.config.max_batch})
        for w, h in sizes:
            for b in batches:
                self.pipe.compile(height=h, width=w, batch_size=b,
                                  num_inference_steps=self.default_steps,
                                  sampler=self.default_sampler, guidance=True,
                                  max_shapes=len(sizes) * len(batches) + 4)
        self._count_plans()

    def _count_plans(self):
        runtime = self.pipe.runtime
        if runtime is None:
            return
        self.planned = {}
        for shape, plan in runtime.plans.items():
            if shape.controls:  # not a plan the scheduler cuts batches for
                continue
            key = (shape.height, shape.width, shape.num_inference_steps, shape.sampler,
                   shape.guidance, shape.num_chunks)
            self.planned.setdefault(key, set()).add(shape.batch_size)
            if id(plan) not in self._plans_seen:
                self._plans_seen.add(id(plan))
                self.metrics.plan_builds.inc()
                self.metrics.plan_build_seconds.observe(plan.build_seconds)

    def planned_sizes(self, key: BatchKey):
        """Batch sizes with a static plan for this key (static plans are text-to-image with
        the final text layer only)."""
        if key.strength is not None or key.clip_skip or key.controls:
            return ()
        return tuple(self.planned.get((key.height, key.width, key.steps, key.sampler,
                                       key.guidance, key.chunks), ()))

    # -- embeddings from --embedding-dir, loaded at start ------------------------------------

    def _load_embeddings(self):
        """Every embedding of --embedding-dir loaded under its file's stem, as A1111 loads its
        embeddings folder: ({name: (path, vectors)}, {name: why it was skipped}) (a pickle,
        one made for another model, a name that is a word of the vocabulary)."""
        from sdrt.engine.errors import PICKLE_SUFFIXES, SdrtError
        folder = self.config.embedding_dir
        skipped = {stem: f"{os.path.basename(path)} is a pickle, which sdrt does not load: "
                         f"convert it to .safetensors"
                   for stem, path in by_name(folder, suffixes=PICKLE_SUFFIXES).items()}
        loaded = {}
        for stem, path in by_name(folder).items():
            try:
                token = self.pipe.load_textual_inversion(path, token=stem)
            except SdrtError as e:
                skipped[stem] = " ".join(str(e).split())
                continue
            loaded[stem] = (path, self.pipe.embeddings[token])
        return loaded, skipped

    def embedding_hashes(self, texts):
        """((name, A1111 short hash), ...) of the loaded embeddings ``texts`` write (as whole
        words, in any case): the PNG info's ``TI hashes``."""
        import re
        words = {w.lower() for t in texts if t for w in re.findall(r"[\w.-]+", t)}
        return tuple((name, self._file_hash(path)) for name, (path, _) in
                     sorted(self.embeddings.items()) if name.lower() in words)

    # -- LoRAs from --lora-dir --------------------------------------------------------------

    def lora_names(self):
        """The LoRAs requests may name: the stems of --lora-dir's .safetensors files."""
        return sorted(self._lora_index())

    def lora_path(self, name):
        """LoRA ``name``'s file, or None; the folder is read again for a name it lacked."""
        path = self._lora_index().get(name)
        if path is None or not os.path.isfile(path):
            self._lora_files = None
            path = self._lora_index().get(name)
        return path

    def lora_hash(self, name):
        """A1111's short hash of LoRA ``name``'s file (its PNG info's ``Lora hashes``)."""
        return self._file_hash(self.lora_path(name))

    def _file_hash(self, path):
        """A1111's short hash of the file at ``path``, hashed once."""
        from sdrt.engine.infotext import short_hash
        if path not in self._hashes:
            self._hashes[path] = short_hash(path)
        return self._hashes[path]

    def _lora_index(self):
        if self._lora_files is None:
            self._lora_files = by_name(self.config.lora_dir)
        return self._lora_files

    # -- ControlNets from --controlnet-dir ---------------------------------------------------

    def controlnet_names(self):
        """The ControlNets requests may name: --controlnet-dir's .safetensors files (by
        stem) and diffusers folders (those with a config.json, by folder name)."""
        return sorted(self._controlnet_index())

    def controlnet_path(self, name):
        return self._controlnet_index().get(name)

    def controlnet_hash(self, name):
        """The first 8 hex digits of ControlNet ``name``'s file's sha256 (None for a
        folder), as A1111's ControlNet extension shows a model: "NAME [HASH]"."""
        path = self.controlnet_path(name)
        if path is None or os.path.isdir(path):
            return None
        return self._file_hash(path)[:8]

    def _controlnet_index(self):
        """Read afresh each time: a folder of a few files, and a file added while serving is
        found at once."""
        return by_name(self.config.controlnet_dir, model_folders=True)

    # -- IP-Adapters from --controlnet-dir, image encoders from --clip-vision-dir -------------

    def _clip_vision_index(self):
        """Read afresh each time, as ``_controlnet_index``."""
        return by_name(self.config.clip_vision_dir, model_folders=True)

    def clip_vision_names(self):
        """The image encoders of --clip-vision-dir: .safetensors files (by stem) and
        transformers folders (by name)."""
        return sorted(self._clip_vision_index())

    def clip_vision_path(self, name):
        """The --clip-vision-dir image encoder called ``name``, or None."""
        return self._clip_vision_index().get(name)

    def ip_encoder(self, adapter_path, prefer=None):
        """The --clip-vision-dir encoder that IP-Adapter ``adapter_path`` reads: the first whose
        output fits it, those named for ``prefer`` ("h": ViT-H, "g": ViT-bigG) first; None if
        none fits. ``SdrtError`` if the file is not an IP-Adapter sdrt runs. Read from the
        files' headers, nothing loaded."""
        from sdrt.engine.clip_vision import encoder_config
        from sdrt.engine.ip_adapter import encoder_fits, file_config
        cfg = file_config(adapter_path)
        marks = {"h": ("clip_h", "vit-h"), "g": ("clip_g", "bigg")}.get(prefer, ())
        paths = sorted(self._clip_vision_index().values(),
                       key=lambda p: not any(m in os.path.basename(p).lower() for m in marks))
        for path in paths:
            try:
                if encoder_fits(cfg, encoder_config(path)):
                    return path
            except SdrtError:  # not an image encoder: look further
                continue
        return None

    def _apply_ip_adapters(self, prompts):
        """Load the batch's IP-Adapters with their encoders (those loaded already stay),
        unload the others."""
        wanted = {p[0]: p[4] for p in prompts}
        loaded = self.pipe.ip_adapters
        for name in list(loaded):
            if wanted.get(name) != self._ip_encoders.get(name):
                self.pipe.unload_ip_adapter(name)
                self._ip_encoders.pop(name, None)
        for name, encoder in wanted.items():
            if name not in self.pipe.ip_adapters:
                path = self.controlnet_path(name)
                if path is None:
                    raise SdrtError(f"the request names IP-Adapter {name!r}, which "
                                    f"--controlnet-dir no longer has")
                self.pipe.load_ip_adapter(path, image_encoder=encoder, name=name)
                self._ip_encoders[name] = encoder

    def _image_prompt(self, key, rows):
        """The pipeline arguments of the batch's IP-Adapters ({} without)."""
        self._apply_ip_adapters(key.image_prompts)
        if not key.image_prompts:
            return {}
        images, one = list(rows[0].ip_images), len(key.image_prompts) == 1
        masks = _region_masks(key.image_prompts)
        regions = {} if masks is None else dict(ip_adapter_mask=masks,
                                                ip_adapter_mask_style="a1111")
        return dict(ip_adapter_image=images[0] if one else images,
                    ip_adapter=[p[0] for p in key.image_prompts],
                    ip_adapter_scale=[getattr(p[1], "value", p[1]) for p in key.image_prompts],
                    ip_adapter_guidance_start=[p[2] for p in key.image_prompts],
                    ip_adapter_guidance_end=[p[3] for p in key.image_prompts], **regions)

    # -- upscale models from --upscaler-dir ------------------------------------------------

    def upscaler_names(self):
        """The upscale models requests may name: --upscaler-dir's .safetensors files by stem,
        Real-ESRGAN's released files also by A1111's names (``upscaler_files``)."""
        return sorted(self._upscaler_index())

    def upscaler_path(self, name):
        return self._upscaler_index().get(name) if isinstance(name, str) else None

    def _upscaler_index(self):
        """Read afresh each time, as --controlnet-dir is."""
        from sdrt.engine.upscaler_config import upscaler_files
        return upscaler_files(self.config.upscaler_dir)

    def upscaler(self, name):
        """Upscale model ``name``, loaded on the pipeline's device (in the worker thread; the
        last one stays loaded)."""
        if self._upscaler is not None and self._upscaler.name == name:
            return self._upscaler
        path = self.upscaler_path(name)
        if path is None:
            raise SdrtError(f"the request names upscaler {name!r}, which --upscaler-dir no "
                            f"longer has")
        from sdrt.engine.upscaler import load_upscaler
        self._upscaler = None  # the old one freed before the new one loads
        self._upscaler = load_upscaler(path, self.pipe.device, self.pipe.dtype, name=name)
        return self._upscaler

    # -- VAEs from --vae-dir ---------------------------------------------------------------

    def vae_names(self):
        """The VAEs requests may name (A1111's ``sd_vae``): --vae-dir's .safetensors files,
        by file name as A1111 names them, and diffusers VAE folders, by folder name."""
        return sorted(self._vae_index())

    def vae_path(self, name):
        return self._vae_index().get(name) if isinstance(name, str) else None

    def vae_hash(self, name):
        """A1111's "VAE hash" of VAE ``name``: the first 10 hex digits of its file's sha256
        (None for a folder); hashed when the worker first loads it."""
        path = self.vae_path(name)
        return None if path is None or os.path.isdir(path) else self._file_hash(path)[:10]

    def _vae_index(self):
        """Read afresh each time, as --controlnet-dir is."""
        return {os.path.basename(path): path
                for path in by_name(self.config.vae_dir, model_folders=True).values()}

    def _apply_vae(self, name):
        """Decode the batch with VAE ``name``, None: the model's own, whose weights are kept
        on the host the first time another replaces them (``Pipeline.load_vae`` copies in
        place, so static plans stay valid)."""
        if name == self._vae:
            return
        if self._own_vae is None:
            self._own_vae = {k: v.detach().to("cpu", copy=True)
                             for k, v in self.pipe.vae.state_dict().items()}
        if name is None:
            self.pipe.load_vae(self._own_vae)
        else:
            path = self.vae_path(name)
            if path is None:
                raise SdrtError(f"the request names VAE {name!r}, which --vae-dir no longer "
                                f"has")
            self.pipe.load_vae(path)
            self.vae_hash(name)  # hashed here, off the event loop, for the PNG info
        self._vae = name

    def _apply_controlnets(self, controls):
        """Load the batch's ControlNets (those loaded already stay), unload the others."""
        wanted = [c[0] for c in controls]
        for name in list(self.pipe.controlnets):
            if name not in wanted:
                self.pipe.unload_controlnet(name)
        for name in wanted:
            if name not in self.pipe.controlnets:
                path = self.controlnet_path(name)
                if path is None:
                    raise SdrtError(f"the request names ControlNet {name!r}, which "
                                    f"--controlnet-dir no longer has")
                self.pipe.load_controlnet(path, name=name)

    def _apply_loras(self, loras):
        """Patch the batch's LoRAs in (``Pipeline.load_lora``), unloading those it lacks: a
        LoRA kept loaded only changes scale; one loaded again is read from its file. A new
        LoRA takes the place of one the batch lacks in one pass (``replace``: the weights
        either patches are recomputed once, their originals not restored first), which is
        what switching LoRAs between requests costs least."""
        wanted = dict(loras)
        stale = [name for name in self.pipe.loras if name not in wanted]
        for name, scale in wanted.items():
            if name not in self.pipe.loras:
                path = self.lora_path(name)
                if path is None:
                    raise SdrtError(f"prompt names LoRA {name!r}, which --lora-dir no longer "
                                    f"has")
                self.pipe.load_lora(path, scale=scale, name=name,
                                    replace=stale.pop() if stale else None)
                self.lora_hash(name)  # hashed here, off the event loop, for the PNG info
            elif self.pipe.loras[name] != scale:
                self.pipe.set_lora_scale(name, scale)
        for name in stale:
            self.pipe.unload_lora(name)

    def run(self, key: BatchKey, rows):
        """One pipeline call for ``rows`` -> one PIL image per row. Each row has its own CPU
        generator, seeded with its seed, and its own guidance scale."""
        import torch
        one = len(rows) == 1
        if one and key.hires is None and key.refiner is None:
            seeds = dict(seed=rows[0].seed)
        else:  # (a hires fix's second pass goes on drawing from the first pass's generators)
            seeds = dict(generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows])
        # A1111's variation seed and seed resize (the first pass's noise only: hires.generate
        # drops them), image to image's noise multiplier, a workflow's zeroed negative
        variation = (dict(subseed=[r.subseed for r in rows],
                          subseed_strength=key.subseed_strength)
                     if key.subseed_strength else {})
        if key.seed_resize_from:  # (the first pass's noise too)
            variation["seed_resize_from"] = key.seed_resize_from
        if key.noise_multiplier != 1:  # (image to image's: A1111's initial_noise_multiplier)
            variation["initial_noise_multiplier"] = key.noise_multiplier
        if key.zero_out_negative:  # (a workflow's ConditioningZeroOut: each pass's negative)
            variation["zero_out_negative"] = True
        guidance = [r.guidance_scale for r in rows]
        guidance = guidance[0] if len(set(guidance)) == 1 else guidance
        negatives = [r.negative_prompt for r in rows]
        images = [r.init_image for r in rows] if key.strength is not None else None
        masks = [r.mask for r in rows] if key.inpaint else None
        negative = (negatives[0] if one else negatives) if key.guidance else None
        self._apply_loras(key.loras)
        self._apply_vae(key.vae)
        self.pipe.scheduler_config = self.scheduler_config
        if key.scheduler:  # (a workflow's ModelSamplingDiscrete)
            self.pipe.set_scheduler_config(**dict(key.scheduler))
        for model in filter(None, (self.pipe, self.refiner)):
            if key.tiling:
                model.enable_seamless_tiling()
            else:
                model.disable_seamless_tiling()
        if key.freeu is None:
            self.pipe.disable_freeu()
        else:
            b1, b2, s1, s2, style = key.freeu
            self.pipe.enable_freeu(s1, s2, b1, b2, style)
        self._apply_controlnets(key.controls)
        control = self._image_prompt(key, rows)
        if key.controls:  # per ControlNet, one control image per row
            images_per_net = [[r.control_images[k] for r in rows]
                              for k in range(len(key.controls))]
            control.update(
                control_image=images_per_net if len(key.controls) > 1 else images_per_net[0],
                controlnet=[c[0] for c in key.controls],
                controlnet_conditioning_scale=[c[1] for c in key.controls],
                control_guidance_start=[c[2] for c in key.controls],
                control_guidance_end=[c[3] for c in key.controls],
                control_mode=[c[4] for c in key.controls])
            masks = _region_masks(key.controls)
            if masks is not None:
                control["control_mask"] = masks
        if key.hires is not None:
            from sdrt.engine.hires import UPSCALERS, generate
            second = None
            if key.controls and rows[0].hires_control_images:
                second = [[r.hires_control_images[k] for r in rows]
                          for k in range(len(key.controls))]
                second = second if len(key.controls) > 1 else second[0]
            model = key.hires.upscaler if key.hires.upscaler not in UPSCALERS else None
            out = generate(self.pipe, key.hires, [r.prompt for r in rows], negative,
                           key.height, key.width, key.steps, key.sampler, seeds["generator"],
                           guidance_scale=guidance, clip_skip=key.clip_skip,
                           prompt_syntax=key.prompt_syntax, pag_scale=key.pag_scale,
                           eta=key.eta, **_rescale(key), control_units=[c[5] for c in key.controls],
                           hires_control_image=second,
                           upscaler=self.upscaler(model) if model else None, **control,
                           **variation)
        else:
            sdxl = dict(zip(("original_size", "crops_coords_top_left", "target_size",
                             "negative_original_size", "negative_crops_coords_top_left",
                             "negative_target_size"), key.micro))
            for name, values in (("prompt_2", [r.prompt_2 for r in rows]),
                                 ("negative_prompt_2", [r.negative_prompt_2 for r in rows])):
                if any(v is not None for v in values) and (name == "prompt_2" or key.guidance):
                    # (a row without one: its first prompt, as the pipeline's default)
                    first = [r.prompt if name == "prompt_2" else r.negative_prompt for r in rows]
                    values = [v if v is not None else f for v, f in zip(values, first)]
                    sdxl[name] = values[0] if one else values
            out = self.pipe(
                [r.prompt for r in rows], negative_prompt=negative,
                height=key.height, width=key.width, num_inference_steps=key.steps,
                guidance_scale=guidance, sampler=key.sampler,
                image=(images[0] if one else images) if images else None,
                mask_image=(masks[0] if one else masks) if masks else None,
                masked_content=key.masked_content,
                latent_resize=key.latent_resize_from is not None,
                strength=key.strength if key.strength is not None else 0.8,
                clip_skip=key.clip_skip, prompt_syntax=key.prompt_syntax,
                output_type="pil" if key.refiner is None else "latent",
                denoising_end=None if key.refiner is None else key.refiner[0],
                pag_scale=key.pag_scale, eta=key.eta, **_rescale(key), **seeds, **control,
                **variation,
                **{k: v for k, v in sdxl.items() if v is not None})
        timings = self.pipe.timings
        if key.refiner is not None:  # the base's latents finished by --refiner
            switch, score, negative_score = key.refiner
            out = self.refiner(
                [r.prompt for r in rows], negative_prompt=negative, image=out,
                denoising_start=switch, num_inference_steps=key.steps,
                guidance_scale=guidance, sampler=key.sampler, clip_skip=key.clip_skip,
                prompt_syntax=key.prompt_syntax, pag_scale=key.pag_scale, eta=key.eta,
                **_rescale(key), generator=seeds["generator"], aesthetic_score=score,
                negative_aesthetic_score=negative_score,
                original_size=sdxl["original_size"],
                crops_coords_top_left=sdxl["crops_coords_top_left"])
            timings = {k: v + self.refiner.timings.get(k, 0) for k, v in timings.items()
                       if k in ("text", "denoise", "decode")}
        for stage in ("text", "denoise", "decode"):
            if stage in timings:
                self.metrics.stage_seconds.labels(stage).observe(timings[stage])
        self.metrics.images.inc(len(out))
        self._count_plans()
        return out

    def refiner_title(self):
        """--refiner as A1111 names a checkpoint: "NAME [short hash]"."""
        return f"{self.refiner_name} [{self.refiner_hash}]"

    def checkpoint_names(self):
        """The model's name, then --refiner's (the checkpoints requests may name)."""
        return [self.model_name] + ([self.refiner_name] if self.refiner is not None else [])

    def check(self, request, names):
        """The model's checks of a request (sizes, clip skip, memory); ``SdrtError`` if not."""
        if self.pipe is None:
            raise SdrtError("the model is still loading")
        return self.pipe.check(request, names=names)


def _region_masks(entries):
    """The effective_region_masks of a key's units (``BatchKey.controls`` or
    ``image_prompts``, each ending in its ``RegionMask`` or None) as a pipeline argument: one
    array, or one (or None) per unit; None where no unit has one."""
    masks = [None if e[6] is None else e[6].array for e in entries]
    if all(m is None for m in masks):
        return None
    return masks if len(masks) > 1 else masks[0]


def _rescale(key):
    """The pipeline's guidance_rescale arguments of a batch's key (none without a rescale)."""
    return dict(zip(("guidance_rescale", "guidance_rescale_style"), key.rescale))
