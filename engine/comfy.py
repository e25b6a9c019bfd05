"""ComfyUI workflows in API format, read into the settings ``sdrt generate`` runs.

ComfyUI's "Save (API Format)" writes, and every PNG it saves embeds (its "prompt" text
chunk), a graph ``{node_id: {"class_type": ..., "inputs": {...}}}`` in which an input that
comes from another node is a link ``[node_id, output_slot]``. sdrt runs the graph of a
plain text-to-image or image-to-image workflow: the one SaveImage/PreviewImage node is
followed back through VAEDecode to one KSampler (or a KSamplerAdvanced that adds noise and
runs its schedule to the end: from step 0 on an empty latent, from ``start_at_step`` on an
image, sdrt's image to image keeping those steps; or a SamplerCustom(Advanced) of a
KSamplerSelect and a scheduler node, read as a KSampler: ``_custom_samplers``; or SDXL's
base KSamplerAdvanced and a refiner's after it, sdrt's --refiner: ``_refined``), whose model,
prompts and latent come from

- (ComfyUI's hires fix) a LatentUpscale or LatentUpscaleBy of another such sampler's latents,
  or its picture decoded, scaled by ImageScale(By) and encoded again, sampled again on the
  same model, prompts and cfg: sdrt's hires fix (``_hires``), the picture perhaps upscaled
  by a model first (below);
- CheckpointLoaderSimple (the model; its VAE decodes, or a VAELoader's: ``sdrt generate
  --vae``), through any LoraLoader nodes (strength_model for the UNet, strength_clip for the
  text encoders) and LoraLoaderModelOnly nodes (the UNet's alone), and cubiq's
  IPAdapterAdvanced and IPAdapter nodes (``ImagePrompt``: its IPAdapterModelLoader's adapter
  and CLIPVisionLoader's encoder, or those an
  IPAdapterUnifiedLoader's preset finds (``preset_files``), and LoadImage's reference,
  perhaps through PrepImageForClipVision, prepared as ``clip_vision_image`` says; the weight
  spread over the transformer blocks as its ``weight_type`` says, ``block_scales``; an
  ``attn_mask`` read as ComfyUI reads a MASK, ``comfy_mask``; settings
  beyond diffusers' IP-Adapter, ``IPADAPTER_PLAIN``, refused; ``start_at``/``end_at`` counted
  in steps), and one of each of the model patches ``MODEL_PATCHES`` (FreeU or FreeU_V2,
  PerturbedAttentionGuidance, RescaleCFG, ModelSamplingDiscrete);
- CLIPTextEncode nodes (the prompt and negative prompt, read as ComfyUI reads them: sdrt's
  ``prompt_syntax="comfy"``, ``engine.comfy_prompt``), or SDXL's CLIPTextEncodeSDXL (text_l
  the prompt, text_g the prompt_2, its sizes and crop the micro-conditioning; both prompts'
  the same), their CLIP through
  CLIPSetLastLayer (``stop_at_clip_layer`` -N is sdrt's clip skip N - 1) and the same LoRAs;
- EmptyLatentImage (size and batch), or VAEEncode of a LoadImage (image to image at the
  KSampler's ``denoise``), or ComfyUI's inpainting (``INPAINT_LATENTS``): VAEEncodeForInpaint
  (at denoise 1), SetLatentNoiseMask on a VAEEncode, or InpaintModelConditioning between the
  prompts and the sampler, the mask a LoadImageMask's or a LoadImage's MASK (its alpha):
  sdrt's inpainting of the whole picture through the mask as ComfyUI reads and grows it
  (``inpaint_mask``), its result decoded as it is, not pasted over the picture as A1111's;
- between the prompts and the KSampler, any ControlNetApplyAdvanced nodes (each conditioning
  both prompts, as sdrt applies a ControlNet: its ControlNetLoader's ``control_net_name``,
  a LoadImage's image, ``strength``, ``start_percent`` and ``end_percent``; sdrt counts the
  percentages in steps where ComfyUI counts them in the noise schedule), the image perhaps
  through one preprocessor node (``PREPROCESSOR_NODES``: comfyui_controlnet_aux's
  CannyEdgePreprocessor, ComfyUI's ImageInvert), run as ``engine.preprocess`` runs it.
- on the negative prompt's path, one ConditioningZeroOut (``ZERO_OUT``): the negative
  conditioning zeros (the pipeline's ``zero_out_negative``);

Between the VAEDecode and the save node, or the first VAEDecode and the VAEEncode of a hires
fix in pixels, may stand ComfyUI's model upscale: an ImageUpscaleWithModel of an
UpscaleModelLoader's model (one pass of the model, at its own scale), perhaps followed by an
ImageScale or ImageScaleBy (``ModelUpscale``). sdrt runs it as ComfyUI does
(``Upscaler.one_pass``, ``engine.upscaler.comfy_scale``): the hires fix's second pass at the
size ComfyUI's VAEEncode gives, the saved images at the size the nodes give. The model is
named by its file's stem, and its scale (which sets those sizes) comes from the caller of
``read`` (``upscaler_scale``: ``sdrt generate --upscaler-dir``, the server's).

Any other node on that path is refused by name, never skipped: a workflow that upscales,
masks or chains samplers another way would otherwise give another picture than it asks for.
ComfyUI's sampler and scheduler pairs map onto sdrt's samplers (``SAMPLERS``); the settings are the
same, the pixels are not (ComfyUI samples on k-diffusion's sigma tables and draws a batch's
noise from one generator, sdrt follows the model's diffusers scheduler and seeds image i with
seed + i).
"""
import json
import math
from dataclasses import dataclass, field

from .errors import PICKLE_SUFFIXES, SdrtError
from .hires import Hires
from .request import SAMPLER_NAMES, SIGMA_SAMPLERS, short_repr

# (ComfyUI sampler_name, scheduler) → sdrt's sampler. "karras" is the sampler's Karras variant,
# "exponential" (the SDE DPM-Solvers') its exponential one; ComfyUI's other schedulers are
# sdrt's sigma schedules ("X_S"), beta and kl_optimal as ComfyUI computes them (comfy_beta,
# comfy_kl_optimal). ComfyUI's ddim is Euler along the scheduler's sigmas: sdrt's euler there.
# lcm, which steps along its own alpha-bar grid, is sdrt's lcm on "normal", "simple" and
# "sgm_uniform" alike. The _gpu SDE samplers differ
# from the others only in where ComfyUI draws their noise; uni_pc and uni_pc_bh2 are sdrt's
# (UniPC of order 3 to sigma 0.001, as ComfyUI runs it), deis sdrt's comfy_deis (not
# diffusers' DEIS, sdrt's deis), and ComfyUI's samplers no diffusers class has are sdrt's
# own of those names (engine.comfy_samplers).
_EVEN = ("normal", "simple", "sgm_uniform")
_SAMPLER_NAMES = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun",
                  "dpm_2": "dpm2", "dpm_2_ancestral": "dpm2_a",
                  "dpmpp_2s_ancestral": "dpmpp_2s_a", "dpmpp_sde": "dpmpp_sde",
                  "dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m": "dpmpp_2m",
                  "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
                  "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
                  "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
                  "dpmpp_3m_sde": "dpmpp_3m_sde", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
                  "lms": "lms", "uni_pc": "uni_pc", "uni_pc_bh2": "uni_pc_bh2",
                  "deis": "comfy_deis", "ddim": "euler", "ipndm": "ipndm", "ipndm_v": "ipndm_v",
                  "gradient_estimation": "gradient_estimation",
                  "res_multistep": "res_multistep", "res_multistep_ancestral": "res_multistep_a",
                  "ddpm": "ddpm", "er_sde": "er_sde", "euler_cfg_pp": "cfgpp_euler",
                  "euler_ancestral_cfg_pp": "cfgpp_euler_a", "dpmpp_2m_cfg_pp": "cfgpp_dpmpp_2m",
                  "res_multistep_cfg_pp": "cfgpp_res_multistep",
                  "res_multistep_ancestral_cfg_pp": "cfgpp_res_multistep_a",
                  "gradient_estimation_cfg_pp": "cfgpp_gradient_estimation", "lcm": "lcm",
                  "dpm_fast": "dpm_fast", "heunpp2": "heunpp2",
                  "dpmpp_2s_ancestral_cfg_pp": "cfgpp_dpmpp_2s_a", "seeds_2": "seeds_2",
                  "seeds_3": "seeds_3", "sa_solver": "sa_solver",
                  "sa_solver_pece": "sa_solver_pece"}
# ComfyUI's scheduler → sdrt's sigma schedule
_SCHEDULES = {"exponential": "exponential", "normal": "normal", "simple": "simple",
              "sgm_uniform": "sgm_uniform", "ddim_uniform": "ddim_uniform", "beta": "comfy_beta",
              "kl_optimal": "comfy_kl_optimal", "linear_quadratic": "linear_quadratic"}
# ComfyUI's AlignYourStepsScheduler node (custom sampling) by its model_type → sdrt's schedule
AYS_SCHEDULES = {"SD1": "comfy_ays_sd1", "SDXL": "comfy_ays_sdxl"}
SAMPLERS = {
    **{(comfy, "karras"): f"{sid}_karras" for comfy, sid in _SAMPLER_NAMES.items()
       if f"{sid}_karras" in SAMPLER_NAMES},
    **{(comfy, scheduler): f"{sid}_{schedule}" for comfy, sid in _SAMPLER_NAMES.items()
       for scheduler, schedule in _SCHEDULES.items() if sid in SIGMA_SAMPLERS},
    **{("lcm", s): "lcm" for s in _EVEN},
}
# (sampler_name, "AlignYourSteps <model_type>") → sdrt's sampler: what a SamplerCustom with an
# AlignYourStepsScheduler reads as (not a KSampler's scheduler)
_PAIRS = {**SAMPLERS, **{(comfy, f"AlignYourSteps {model_type}"): f"{sid}_{schedule}"
                         for comfy, sid in _SAMPLER_NAMES.items() if sid in SIGMA_SAMPLERS
                         for model_type, schedule in AYS_SCHEDULES.items()}}
# The save nodes; ComfyUI's SaveImageWebsocket (its websocket image example's) sends each
# picture over the prompt's websocket instead of keeping a file (the CLI writes it as any other)
SAVE_WEBSOCKET = "SaveImageWebsocket"
_OUTPUTS = ("SaveImage", "PreviewImage", SAVE_WEBSOCKET)
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
# ComfyUI's custom sampling: a SamplerCustom(Advanced) takes its sampler from a KSamplerSelect
# and its sigmas from a scheduler node, which sdrt reads as a KSampler's sampler_name,
# scheduler, steps and denoise (``_custom_sampler``). The scheduler nodes it takes: ComfyUI's
# BasicScheduler (any scheduler), KarrasScheduler at the SD models' range and rho (its
# defaults: sdrt's karras), SDTurboScheduler for one step of the whole range (the "simple"
# schedule's one step: sigma_max, then 0), AlignYourStepsScheduler (SD1's or SDXL's table:
# sdrt's comfy_ays_sd1, comfy_ays_sdxl).
_CUSTOM = ("SamplerCustom", "SamplerCustomAdvanced")
# The prompt nodes: CLIPTextEncode, and SDXL's CLIPTextEncodeSDXL (text_l for CLIP ViT-L, text_g
# for bigG: sdrt's prompt and prompt_2; its sizes the micro-conditioning, ``_sdxl_text``)
_TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
# An SDXL refiner's: CLIPTextEncodeSDXLRefiner's ascore the aesthetic score (``_refined``)
_REFINER_TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXLRefiner")
KARRAS_DEFAULTS = {"sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}
# LatentUpscale(By)'s upscale_method → sdrt's (A1111's) latent upscaler: the same
# torch.nn.functional.interpolate mode, without antialiasing.
LATENT_UPSCALES = {"nearest-exact": "Latent (nearest-exact)", "bilinear": "Latent",
                   "bicubic": "Latent (bicubic)"}
# ImageScale(By)'s upscale_method → sdrt's image upscaler: PIL's Lanczos, as ComfyUI's.
IMAGE_UPSCALES = {"lanczos": "Lanczos"}
_UPSCALES = {"LatentUpscale": LATENT_UPSCALES, "LatentUpscaleBy": LATENT_UPSCALES,
             "ImageScale": IMAGE_UPSCALES, "ImageScaleBy": IMAGE_UPSCALES}
_APPLY = "ControlNetApplyAdvanced"
ZERO_OUT = "ConditioningZeroOut"  # on the negative prompt's path: zeros, whatever it says
# ComfyUI's inpainting, the sampled latent (``_inpaint``): VAEEncodeForInpaint (the pixels
# greyed under the mask before they are encoded, the mask grown by grow_mask_by; at denoise 1,
# where the grey is noise), SetLatentNoiseMask on a VAEEncode, or InpaintModelConditioning
# (between the prompts and the sampler, whose positive, negative and latent are its three
# outputs; noise_mask true). Each one's mask is a LoadImageMask's or a LoadImage's MASK. The
# sampler keeps the latents outside the mask, and an inpainting model sees the mask and the
# masked picture: sdrt's inpainting of the whole picture, at the sampler's denoise, its result
# decoded as it is (not pasted over the picture, as A1111 pastes it: ``Workflow.mask``).
INPAINT_CONDITIONING = "InpaintModelConditioning"
INPAINT_LATENTS = ("VAEEncodeForInpaint", "SetLatentNoiseMask", INPAINT_CONDITIONING)
MAX_GROW_MASK = 64  # VAEEncodeForInpaint's grow_mask_by, at most
# ComfyUI's outpainting: an ImagePadForOutpaint between the LoadImage and an inpainting node's
# pixels, its MASK the inpainting's mask (``outpaint``); each side's pad at most MAX_PAD.
OUTPAINT = "ImagePadForOutpaint"
MAX_PAD = 8192
# Between an inpainting's mask and its node: ComfyUI's InvertMask (1 - mask) and GrowMask
# (``expand`` pixels of grey dilation, or erosion below 0, by a 3×3 cross, or square without
# tapered_corners; at most MAX_EXPAND), run as ``mask_operations`` runs them.
MASK_OPS = ("InvertMask", "GrowMask")
MAX_EXPAND = 256
# ComfyUI's FreeU nodes on the sampled model: class → (sdrt's FreeU style, its defaults of b1,
# b2, s1, s2)
FREEU_NODES = {"FreeU": ("comfy", (1.1, 1.2, 0.9, 0.2)),
               "FreeU_V2": ("comfy_v2", (1.3, 1.4, 0.9, 0.2))}
# ComfyUI's perturbed-attention guidance node (its "middle" block's self-attention: sdrt's
# pag_scale, as diffusers' "mid" layers)
PAG = "PerturbedAttentionGuidance"
# ComfyUI's rescale of classifier-free guidance (sdrt's guidance_rescale, "comfy" style: the
# stds of the predicted velocities)
RESCALE_CFG = "RescaleCFG"
# ComfyUI's override of the model's objective and noise schedule: its sampling → sdrt's
# prediction type ("lcm": LCM's boundary conditions, which sdrt's lcm sampler applies), and
# zsnr → a zero-terminal-SNR schedule (``request.ZERO_SNR``)
MODEL_SAMPLING = "ModelSamplingDiscrete"
MODEL_SAMPLINGS = {"eps": "epsilon", "v_prediction": "v_prediction", "lcm": "lcm"}
# The model patches sdrt runs, one of each on a model: class → the Workflow field it sets
MODEL_PATCHES = {**{node: "freeu" for node in FREEU_NODES}, PAG: "pag_scale",
                 RESCALE_CFG: "guidance_rescale", MODEL_SAMPLING: "sampling"}
# After an inpainting's VAEDecode, before the save node: the result laid over the init image
# through the inpainting's mask, ungrown, at x 0, y 0 (``composite``), as ComfyUI's inpainting
# workflows keep the pixels outside the mask.
COMPOSITE = "ImageCompositeMasked"
# cubiq's ComfyUI_IPAdapter_plus: the node that applies an IP-Adapter to the sampled model, and
# the settings sdrt runs (diffusers' IP-Adapter: the weight on the attention's output);
# another value is refused by name, as is its optional negative image. ``combine_embeds``
# combines the embeddings of a batch of reference images: with the one image of a LoadImage,
# every way is the image's own.
IPADAPTER = "IPAdapterAdvanced"
IPADAPTER_PLAIN = {"combine_embeds": ("concat", "add", "subtract", "average", "norm average"),
                   "embeds_scaling": ("V only",)}
# cubiq's weight types: how the weight is spread over the UNet's transformer blocks, counted in
# the order they run (``block_scales``); the two "precise" ones, which also swap the image
# tokens in some blocks, are refused. The plain IPAdapter node's three name three of them.
WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input",
                "weak output", "weak middle", "strong middle", "style transfer", "composition",
                "strong style transfer", "style and composition")
SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out",
                       "style transfer": "style transfer"}
# The block-index tables of the "style"/"composition" types (weight w, w_c the composition
# weight, 1 in IPAdapterAdvanced), for SD 1.x (16 transformer blocks) and SDXL (11).
_W, _C = "w", "c"
_STYLE_TABLES = {
    "style transfer": ({i: _W for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, {6: _W}),
    "composition": ({4: (_W, 0.25), 5: _W}, {3: _W}),
    "strong style transfer": ({i: _W for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)},
                              {i: _W for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)}),
    "style and composition": ({**{i: _W for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
                               4: (_C, 0.25), 5: _C}, {3: _C, 6: _W}),
}
# The plain IPAdapter node (its weight_type "standard" is linear), which takes its files from
# an IPAdapterUnifiedLoader: a preset that names them by pattern, found among the files there
# are (``preset_files``; cubiq's patterns, the first of the sorted names that matches).
IPADAPTER_SIMPLE = "IPAdapter"
UNIFIED = "IPAdapterUnifiedLoader"
_ENCODER_H = r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)"
_ENCODER_G = r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)"
# preset → ((SD 1.x adapter pattern, SDXL's; None: none for that family), encoder pattern)
PRESETS = {
    "LIGHT - SD1.5 only (low strength)": ((r"sd15.light.v11\.(safetensors|bin)$", None),
                                          _ENCODER_H),
    "STANDARD (medium strength)": ((r"ip.adapter.sd15\.(safetensors|bin)$",
                                    r"ip.adapter.sdxl.vit.h\.(safetensors|bin)$"), _ENCODER_H),
    "VIT-G (medium strength)": ((r"sd15.vit.g\.(safetensors|bin)$",
                                 r"ip.adapter.sdxl\.(safetensors|bin)$"), _ENCODER_G),
    "PLUS (high strength)": ((r"ip.adapter.plus.sd15\.(safetensors|bin)$",
                              r"plus.sdxl.vit.h\.(safetensors|bin)$"), _ENCODER_H),
    "PLUS FACE (portraits)": ((r"plus.face.sd15\.(safetensors|bin)$",
                               r"plus.face.sdxl.vit.h\.(safetensors|bin)$"), _ENCODER_H),
    "FULL FACE - SD1.5 only (portraits stronger)": ((r"full.face.sd15\.(safetensors|bin)$",
                                                     None), _ENCODER_H),
}
# PrepImageForClipVision (between a LoadImage and the IPAdapterAdvanced): PIL's filters, and
# where the square is cut
PREP = "PrepImageForClipVision"
PREP_FILTERS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
PREP_CROPS = ("top", "bottom", "left", "right", "center", "pad")
# ComfyUI's model upscale: the node that runs a model, the scales that may follow it (with
# ComfyUI's upscale_method list, each run by engine.upscaler.comfy_scale), and the extensions
# an UpscaleModelLoader's model_name drops to name the model as --upscaler-dir does (by stem).
_WITH_MODEL = "ImageUpscaleWithModel"
_IMAGE_SCALES = ("ImageScale", "ImageScaleBy")
SCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
_MODEL_EXTENSIONS = (".safetensors", *PICKLE_SUFFIXES)
# Preprocessor nodes between a LoadImage and a ControlNetApplyAdvanced: class → (sdrt's
# preprocessor, {its input: the setting it is (engine.preprocess.FIELDS)}).
# comfyui_controlnet_aux's CannyEdgePreprocessor runs the OpenCV canny of A1111's extension.
PREPROCESSOR_NODES = {
    "CannyEdgePreprocessor": ("canny", {"resolution": "processor_res",
                                        "low_threshold": "threshold_a",
                                        "high_threshold": "threshold_b"}),
    "ImageInvert": ("invert", {}),
}


@dataclass(frozen=True)
class Control:
    """A ControlNetApplyAdvanced node's settings."""
    name: str  # ControlNetLoader's control_net_name
    image: str  # LoadImage's file name (ComfyUI's input folder)
    strength: float
    start: float  # start_percent
    end: float  # end_percent
    # a preprocessor node's (sdrt's preprocessor, resolution, threshold A, threshold B), as
    # engine.preprocess.settings checks them
    preprocessor: tuple = None


@dataclass(frozen=True)
class ImagePrompt:
    """An IPAdapterAdvanced node's adapter, encoder, reference image and settings."""
    adapter: str  # IPAdapterModelLoader's ipadapter_file (None: the preset's)
    encoder: str  # CLIPVisionLoader's clip_name (None: the preset's)
    image: str  # LoadImage's file name
    weight: float
    start: float  # start_at
    end: float  # end_at
    # a PrepImageForClipVision node's (interpolation, crop_position, sharpening), or None
    prep: tuple = None
    preset: str = None  # an IPAdapterUnifiedLoader's, which finds the files not named
    weight_type: str = "linear"  # ``WEIGHT_TYPES``: the weight per block (``block_scales``)
    # attn_mask: (LoadImageMask's or LoadImage's file name, the channel read), or None
    mask: tuple = None


@dataclass(frozen=True)
class ModelUpscale:
    """An ImageUpscaleWithModel (one pass of an upscale model, at its scale) and the ImageScale
    or ImageScaleBy after it, if any."""
    model: str  # the UpscaleModelLoader's model_name without its folder and extension
    scale: int  # the model's, from its file (``read``'s upscaler_scale)
    method: str = None  # the ImageScale(By)'s upscale_method; None: no ImageScale(By)
    scale_by: float = None  # ImageScaleBy's
    width: int = 0  # ImageScale's width and height (0: in proportion to the other)
    height: int = 0
    crop: str = "disabled"  # ImageScale's

    def scaling(self, width, height):
        """``Upscaler.one_pass``'s (method, width, height, crop) for a picture of ``width`` ×
        ``height``: the size ComfyUI's ImageScale(By) takes the model's output to (method
        None: that output as it is)."""
        w, h = width * self.scale, height * self.scale
        if self.method is None or (self.scale_by is None and not self.width and not self.height):
            return None, w, h, "disabled"  # (an ImageScale to 0 x 0 passes the image on)
        if self.scale_by is not None:
            return self.method, round(w * self.scale_by), round(h * self.scale_by), "disabled"
        return (self.method, self.width or max(1, round(w * self.height / h)),
                self.height or max(1, round(h * self.width / w)), self.crop)

    def run(self, upscaler, images):
        """PIL ``images`` through the loaded model ``upscaler`` and the scale after it."""
        if upscaler.scale != self.scale:
            raise SdrtError(f"upscale model {self.model!r} is x{upscaler.scale} now, "
                            f"x{self.scale} when the workflow was read: its file changed")
        return [upscaler.one_pass([im], *self.scaling(*im.size))[0] for im in images]


@dataclass
class Workflow:
    """What a workflow asks ``sdrt generate`` for."""
    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int = None  # text to image: EmptyLatentImage's; image to image: the image's
    height: int = None
    batch: int = 1
    strength: float = None  # image to image: the KSampler's denoise
    init_image: str = None  # image to image: LoadImage's file name (ComfyUI's input folder)
    clip_skip: int = 0
    checkpoint: str = None  # CheckpointLoaderSimple's ckpt_name
    loras: list = field(default_factory=list)  # [(lora_name, strength)], in load order
    output: str = None  # the SaveImage/PreviewImage node's id
    sampler_node: str = None  # the KSampler's id
    controlnets: list = field(default_factory=list)  # [Control], nearest the prompts first
    filename_prefix: str = "ComfyUI"  # SaveImage's
    hires: Hires = None  # a latent upscale and a second sampler: sdrt's hires fix
    vae: str = None  # a VAELoader's vae_name, which decodes (and encodes) instead
    # a model upscale between the VAEDecode and the save node: the images upscaled after
    upscale: ModelUpscale = None
    ip_adapters: list = field(default_factory=list)  # [ImagePrompt], nearest the checkpoint first
    # SDXL's CLIPTextEncodeSDXL: the bigG prompts where they differ from the ViT-L ones, and
    # the micro-conditioning where it is not the default: (height, width), (top, left)
    prompt_2: str = None
    negative_2: str = None
    original_size: tuple = None
    crop: tuple = None
    target_size: tuple = None
    # the negative's (original size, crop, target size) where they are not the positive's
    # (a CLIPTextEncodeSDXL beside a CLIPTextEncode, or two with other sizes); else None
    negative_sizes: tuple = None
    # SDXL's base and refiner: the refiner's checkpoint name, the steps the base runs of the
    # schedule (its end_at_step), and the refiner's aesthetic scores (None: the defaults)
    refiner: str = None
    refiner_steps: int = None
    aesthetic_score: float = None
    negative_aesthetic_score: float = None
    # inpainting (``INPAINT_LATENTS``): the mask's (file name, channel), as ``comfy_mask``
    # reads it, and the pixels a VAEEncodeForInpaint grows it by (None: no such node)
    mask: tuple = None
    grow_mask: int = None
    # the InvertMask and GrowMask nodes on the mask's way, in the order they run
    # (``mask_operations``): ("invert",) or ("grow", expand, tapered_corners)
    mask_ops: tuple = ()
    # an ImageCompositeMasked between the VAEDecode and the save node: the result laid over the
    # init image through that mask, ungrown (``composite``)
    composite: bool = False
    # a FreeU or FreeU_V2 node's (b1, b2, s1, s2, sdrt's style: "comfy" or "comfy_v2")
    freeu: tuple = None
    pag_scale: float = 0.0  # a PerturbedAttentionGuidance node's scale
    guidance_rescale: float = 0.0  # a RescaleCFG node's multiplier
    # a ModelSamplingDiscrete's (prediction type: MODEL_SAMPLINGS' values, zsnr)
    sampling: tuple = None
    # an ImagePadForOutpaint's (left, top, right, bottom, feathering): the init image on its
    # canvas (``outpaint``), whose MASK is the inpainting's (``mask`` (None, "outpaint"))
    outpaint: tuple = None
    # a ConditioningZeroOut on the negative prompt: its conditioning zeros (the pipeline's
    # zero_out_negative)
    zero_out_negative: bool = False


def load(path):
    """The API-format graph of a workflow file (.json) or of a ComfyUI PNG's "prompt"
    chunk."""
    if path.lower().endswith(".png"):
        from .images import read_image
        text = read_image(path, "workflow image").info.get("prompt")
        if not isinstance(text, str):
            raise SdrtError(f"{path} holds no ComfyUI workflow (no 'prompt' text chunk)")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SdrtError(f"cannot read workflow {path}: {e}") from None
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as e:
        raise SdrtError(f"workflow {path} is not JSON ({e})") from None
    except RecursionError:
        raise SdrtError(f"workflow {path} nests too deeply to be an API-format graph") \
            from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise SdrtError(f"workflow {path} is in ComfyUI's UI format: save it with 'Save (API "
                        f"Format)' (or give the PNG ComfyUI saved)")
    if isinstance(graph, dict) and isinstance(graph.get("prompt"), dict) and not any(
            isinstance(node, dict) and "class_type" in node for node in graph.values()):
        graph = graph["prompt"]  # (a /prompt body, as ComfyUI's script examples post it)
    return graph


def read(graph, upscaler_scale=None) -> Workflow:
    """The settings of an API-format ``graph`` (see the module docstring); ``SdrtError``
    naming the node for anything sdrt would not run as ComfyUI does. ``upscaler_scale(name)``
    is the scale of the upscale model ``name`` (an UpscaleModelLoader's model_name without its
    folder and extension; ``SdrtError`` saying why where there is none); without it, a
    workflow that upscales with a model is refused."""
    if not isinstance(graph, dict) or not graph:
        raise SdrtError(f"workflow must be a JSON object of nodes, got {short_repr(graph)}")
    graph = _custom_samplers(graph)
    nodes = _Nodes(graph)
    outputs = [i for i, n in graph.items()
               if isinstance(n, dict) and n.get("class_type") in _OUTPUTS]
    saved = [i for i in outputs if nodes.kind(i) != "PreviewImage"]
    if len(saved) == 1:  # (previews beside it, e.g. of a hires fix's first pass: not drawn)
        outputs = saved
    if len(outputs) != 1:
        raise SdrtError(f"workflow must have one SaveImage or {SAVE_WEBSOCKET} node (and "
                        f"any PreviewImage nodes, which sdrt does not draw), or one "
                        f"PreviewImage, got {len(saved)} and {len(outputs) - len(saved)}")
    final, image, key = None, outputs[0], "images"
    if nodes.kind(nodes.link(image, key)[0]) in (_WITH_MODEL, *_IMAGE_SCALES):
        # the decoded images upscaled by a model before they are saved
        (final, image), key = _model_upscale(nodes, nodes.link(image, key)[0],
                                             upscaler_scale), "image"
    composite = None
    if nodes.kind(nodes.link(image, key)[0]) == COMPOSITE:  # an inpainting laid over its image
        composite = image = nodes.link(image, key)[0]
        key = "source"
    decode = nodes.follow(image, key, ("VAEDecode",))
    sampler_id = nodes.follow(decode, "samples", _SAMPLER_NODES)
    second = upscale = hires_model = refiner = pixels = None
    latent = nodes.link(sampler_id, "latent_image")[0]
    if nodes.kind(sampler_id) == "KSamplerAdvanced" and nodes.kind(latent) == "KSamplerAdvanced":
        # SDXL's base and refiner: the refiner finishes the base's leftover noise
        refiner, sampler_id = sampler_id, latent
        latent = nodes.link(sampler_id, "latent_image")[0]
    if nodes.kind(latent) == "VAEEncode" and nodes.kind(
            nodes.link(latent, "pixels")[0]) in (*_IMAGE_SCALES, _WITH_MODEL):
        # a hires fix in pixels: this samples the upscaled image of another's latents
        second, upscale = sampler_id, nodes.link(latent, "pixels")[0]
        image = upscale
        if _is_model_upscale(nodes, upscale):
            hires_model, image = _model_upscale(nodes, upscale, upscaler_scale)
        first_decode = nodes.follow(image, "image", ("VAEDecode",))
        for node in (latent, first_decode):
            if nodes.link(node, "vae") != nodes.link(decode, "vae"):
                raise SdrtError(f"workflow node {node} ({nodes.kind(node)}) must take the VAE "
                                f"that decodes the picture (node {decode}'s)")
        sampler_id = nodes.follow(first_decode, "samples", _SAMPLER_NODES)
    elif nodes.kind(latent) in ("LatentUpscale", "LatentUpscaleBy"):
        # a hires fix: this samples the upscaled latents of another
        second, upscale = sampler_id, latent
        sampler_id = nodes.follow(upscale, "samples", _SAMPLER_NODES)
    kind = nodes.kind(sampler_id)
    pair = _pair(nodes, sampler_id)
    checkpoint, loras, prompts, patches = nodes.model_chain(nodes.link(sampler_id, "model"))
    vae = nodes.follow(decode, "vae", ("CheckpointLoaderSimple", "VAELoader"))
    if refiner is not None:  # (sdrt's refiner decodes, with its own VAE or --vae's)
        refined, refiner_texts = _refiner_chain(nodes, refiner, sampler_id)
        if nodes.kind(vae) != "VAELoader" and vae != refined:
            raise SdrtError(f"workflow node {decode} (VAEDecode) must decode with the "
                            f"refiner's checkpoint VAE or a VAELoader's, as sdrt's refiner does")
        vae = checkpoint if vae == refined else vae
    if nodes.kind(vae) == "CheckpointLoaderSimple" and vae != checkpoint:
        raise SdrtError(f"workflow node {decode} (VAEDecode) must decode with the sampled "
                        f"model's checkpoint VAE or a VAELoader's")
    texts, texts_2, sizes, skips, model_only = {}, {}, {}, set(), None
    source = nodes.link(sampler_id, "latent_image")[0]  # (an InpaintModelConditioning's?)
    text_ids, controls, zeroed = _controls(nodes, sampler_id, inpaint=(
        source if nodes.kind(source) == INPAINT_CONDITIONING else None))
    for side, text_id in text_ids.items():
        if nodes.kind(text_id) == "CLIPTextEncodeSDXL":
            texts[side], texts_2[side], sizes[side] = _sdxl_text(nodes, text_id)
        else:
            texts[side] = _text(nodes, text_id, "text")
        skip, clip_loras = nodes.clip_chain(nodes.link(text_id, "clip"), checkpoint)
        # the LoraLoaders of the model's chain (a LoraLoaderModelOnly leaves the CLIP alone,
        # and so does a LoraLoader whose CLIP output no prompt reads)
        wanted = [lora for lora in loras if nodes.kind(lora[0]) == "LoraLoader"]
        read = {lora[0] for lora in clip_loras}
        unread = tuple(lora[0] for lora in wanted if lora[0] not in read)
        if clip_loras != [lora for lora in wanted if lora[0] in read] or \
                model_only not in (None, unread):
            raise SdrtError(f"workflow node {text_id} (CLIPTextEncode) must encode with the "
                            f"LoraLoaders the sampled model has ({_names(wanted)}), got "
                            f"{_names(clip_loras)}")
        model_only = unread
        skips.add(skip)
    if len(skips) > 1:
        raise SdrtError("workflow encodes the prompt and the negative prompt with different "
                        "CLIPSetLastLayer settings; sdrt takes one clip skip")
    loras = [(node, name, ((scale if isinstance(scale, (int, float)) else scale[0]), 0.0)
              if node in (model_only or ()) else scale) for node, name, scale in loras]
    flow = Workflow(prompt=texts["positive"], negative=texts["negative"],
                    seed=_number(nodes, sampler_id,
                                 "noise_seed" if kind == "KSamplerAdvanced" else "seed", int),
                    steps=_number(nodes, sampler_id, "steps", int),
                    guidance=float(_number(nodes, sampler_id, "cfg", float)),
                    sampler=_PAIRS[pair], clip_skip=skips.pop(),
                    checkpoint=nodes.inputs(checkpoint).get("ckpt_name"),
                    loras=[(name, scale) for _, name, scale in loras],
                    output=outputs[0], sampler_node=sampler_id, controlnets=controls,
                    upscale=final, ip_adapters=prompts, zero_out_negative=zeroed, **patches)
    if (flow.sampling or ("",))[0] == "lcm" and flow.sampler != "lcm":
        raise SdrtError(f"workflow node {sampler_id} ({kind}): a model sampled as lcm "
                        f"({MODEL_SAMPLING}) runs sdrt's lcm sampler only (sampler_name lcm), "
                        f"got {pair[0]}")
    prefix = nodes.inputs(outputs[0]).get("filename_prefix", "ComfyUI")
    if isinstance(prefix, str) and prefix:
        flow.filename_prefix = prefix
    if texts_2:  # (SDXL's second prompts where they say something else; a CLIPTextEncode's
        # text is both)
        bigg = {side: texts_2.get(side, texts[side]) for side in texts}
        flow.prompt_2 = bigg["positive"] if bigg["positive"] != flow.prompt else None
        flow.negative_2 = bigg["negative"] if bigg["negative"] != flow.negative else None
        if "positive" in sizes:
            flow.original_size, flow.crop, flow.target_size = sizes["positive"]
    latent = nodes.follow(sampler_id, "latent_image",
                          ("EmptyLatentImage", "VAEEncode", *INPAINT_LATENTS))
    empty = nodes.kind(latent) == "EmptyLatentImage"
    if refiner is not None:
        flow.refiner = nodes.inputs(refined).get("ckpt_name")
        flow.refiner_steps = _refined(nodes, refiner, sampler_id, flow, empty)
        denoise = 1.0
    elif kind == "KSamplerAdvanced":
        denoise = _advanced(nodes, sampler_id, flow.steps, empty)
    else:
        denoise = float(_number(nodes, sampler_id, "denoise", float, default=1.0))
    if empty:
        if denoise != 1:
            raise SdrtError(f"workflow node {sampler_id} (KSampler): denoise {denoise:g} on an "
                            f"empty latent; sdrt runs text to image at denoise 1")
        flow.width = _number(nodes, latent, "width", int)
        flow.height = _number(nodes, latent, "height", int)
        flow.batch = _number(nodes, latent, "batch_size", int, default=1)
    else:
        encode = latent
        if nodes.kind(latent) == "SetLatentNoiseMask":
            encode = nodes.follow(latent, "samples", ("VAEEncode",))
        if nodes.follow(encode, "vae", ("CheckpointLoaderSimple", "VAELoader")) != vae:
            raise SdrtError(f"workflow node {encode} ({nodes.kind(encode)}) must encode with "
                            f"the VAE that decodes (node {vae}'s)")
        image = pixels = nodes.follow(encode, "pixels", ("LoadImage", OUTPAINT))
        if nodes.kind(pixels) == OUTPAINT:  # the picture on a larger canvas, to paint around
            flow.outpaint = _outpaint(nodes, pixels, nodes.kind(latent) in INPAINT_LATENTS)
            image = nodes.follow(pixels, "image", ("LoadImage",))
        flow.init_image = nodes.inputs(image).get("image")
        flow.strength = denoise
        if nodes.kind(latent) in INPAINT_LATENTS:
            flow.mask, flow.grow_mask, flow.mask_ops = _inpaint(nodes, latent, sampler_id,
                                                                denoise)
            if (flow.mask[0] is None) != (flow.outpaint is not None) or (
                    flow.outpaint is not None and flow.mask[1] != pixels):
                raise SdrtError(f"workflow node {latent} ({nodes.kind(latent)}): mask must be "
                                f"the MASK of the {OUTPAINT} node its pixels come from, and "
                                f"only then a {OUTPAINT}'s")
    if composite is not None:
        flow.composite = _composite(nodes, composite, pixels, flow)
    if flow.outpaint is not None:  # (its MASK: no file)
        flow.mask = (None, "outpaint")
    if refiner is not None:
        flow.aesthetic_score, flow.negative_aesthetic_score = _aesthetic_scores(
            nodes, refiner_texts, flow)
    if len(sizes) == 1 or sizes and sizes["positive"] != sizes["negative"]:
        # The negative conditioned on sizes of its own: a CLIPTextEncode's are the image's
        # (ComfyUI's default: the latent's size, no crop).
        flow.negative_sizes = sizes.get("negative")
        if flow.negative_sizes is None:
            if flow.width is None:
                raise SdrtError(f"workflow node {text_ids['negative']} (CLIPTextEncode) "
                                f"conditions on the image's size beside a CLIPTextEncodeSDXL "
                                f"prompt; sdrt takes that beside an EmptyLatentImage only "
                                f"(not yet an init image): use CLIPTextEncodeSDXL for both")
            image = (flow.height, flow.width)
            flow.negative_sizes = (image, (0, 0), image)
    if flow.width is not None:  # (sizes that are the image's and no crop: the defaults)
        image = (flow.height, flow.width)
        flow.original_size = None if flow.original_size == image else flow.original_size
        flow.target_size = None if flow.target_size == image else flow.target_size
        flow.crop = None if flow.crop == (0, 0) else flow.crop
    if second is not None:
        flow.hires = _hires(nodes, sampler_id, second, upscale, flow, hires_model)
    if nodes.kind(vae) == "VAELoader":
        flow.vae = nodes.inputs(vae).get("vae_name")
        if not isinstance(flow.vae, str) or not flow.vae:
            raise SdrtError(f"workflow node {vae} (VAELoader): vae_name must be a file name, "
                            f"got {short_repr(flow.vae)}")
    return flow


def _custom_samplers(graph):
    """``graph`` with each SamplerCustom(Advanced) node's inputs read as a KSampler's (model,
    positive, negative, cfg, seed, sampler_name, scheduler, steps, denoise, latent_image; the
    node and its class kept, the graph copied); ``SdrtError`` naming the node for parts sdrt
    does not run."""
    custom = [i for i, n in graph.items() if isinstance(n, dict) and n.get("class_type") in _CUSTOM]
    if not custom:
        return graph
    graph = dict(graph)
    nodes = _Nodes(graph)
    for node_id, node in graph.items():  # a sampler's denoised_output is not its picture
        for key, value in ((node.get("inputs") or {}).items() if isinstance(node, dict) else ()):
            if (isinstance(value, list) and len(value) == 2 and str(value[0]) in custom
                    and value[1] != 0):
                raise SdrtError(f"workflow node {node_id} ({nodes.kind(node_id)}): {key} takes "
                                f"node {value[0]}'s denoised_output; sdrt gives a sampler's "
                                f"output")
    for node_id in custom:
        graph[node_id] = {**graph[node_id], "inputs": _custom_sampler(nodes, node_id)}
    return graph


def _custom_sampler(nodes, node_id):
    """A SamplerCustom(Advanced)'s inputs as a KSampler's (see ``_custom_samplers``)."""
    k, where = nodes.inputs(node_id), f"workflow node {node_id} ({nodes.kind(node_id)})"
    if nodes.kind(node_id) == "SamplerCustom":
        if k.get("add_noise", True) is not True:
            raise SdrtError(f"{where}: add_noise {short_repr(k.get('add_noise'))}: sdrt samples "
                            f"from noise it adds (add_noise true)")
        out = {key: k.get(key) for key in ("model", "positive", "negative", "cfg")}
        out["seed"] = k.get("noise_seed")
    else:
        noise = nodes.follow(node_id, "noise", ("RandomNoise",))
        guider = nodes.follow(node_id, "guider", ("CFGGuider", "BasicGuider"))
        g = nodes.inputs(guider)
        if nodes.kind(guider) == "CFGGuider":
            out = {key: g.get(key) for key in ("model", "positive", "negative", "cfg")}
        else:  # no guidance: the prompt alone (its negative unused at cfg 1)
            out = {"model": g.get("model"), "positive": g.get("conditioning"),
                   "negative": g.get("conditioning"), "cfg": 1.0}
        out["seed"] = nodes.inputs(noise).get("noise_seed")
    select = nodes.follow(node_id, "sampler", ("KSamplerSelect",))
    out["sampler_name"] = nodes.inputs(select).get("sampler_name")
    sigmas = nodes.follow(node_id, "sigmas", ("BasicScheduler", "KarrasScheduler",
                                              "SDTurboScheduler", "AlignYourStepsScheduler"))
    s, kind = nodes.inputs(sigmas), nodes.kind(sigmas)
    out.update(steps=s.get("steps"), denoise=s.get("denoise", 1.0))
    if kind == "BasicScheduler":
        if s.get("model") != out["model"]:
            raise SdrtError(f"workflow node {sigmas} (BasicScheduler) must schedule the sampled "
                            f"model (node {node_id}'s)")
        out["scheduler"] = s.get("scheduler")
    elif kind == "KarrasScheduler":
        given = {key: s.get(key) for key in KARRAS_DEFAULTS}
        if any(not isinstance(v, (int, float)) or not math.isclose(v, KARRAS_DEFAULTS[key],
                                                                   rel_tol=1e-6)
               for key, v in given.items()):
            raise SdrtError(f"workflow node {sigmas} (KarrasScheduler): sdrt runs Karras "
                            f"levels over the model's range, sigma_max "
                            f"{KARRAS_DEFAULTS['sigma_max']}, sigma_min "
                            f"{KARRAS_DEFAULTS['sigma_min']}, rho 7; got {given}")
        out.update(scheduler="karras", denoise=1.0)
    elif kind == "AlignYourStepsScheduler":
        if s.get("model_type") not in AYS_SCHEDULES:
            raise SdrtError(f"workflow node {sigmas} (AlignYourStepsScheduler): model_type must "
                            f"be {' or '.join(AYS_SCHEDULES)}, got "
                            f"{short_repr(s.get('model_type'))}")
        out["scheduler"] = f"AlignYourSteps {s['model_type']}"
    else:
        if s.get("steps") != 1 or s.get("denoise", 1.0) != 1:
            raise SdrtError(f"workflow node {sigmas} (SDTurboScheduler): sdrt runs its one "
                            f"step of the whole range (steps 1, denoise 1), got steps "
                            f"{short_repr(s.get('steps'))}, denoise {short_repr(s.get('denoise'))}")
        out["scheduler"] = "simple"
    out["latent_image"] = k.get("latent_image")
    return out


def _text(nodes, node_id, key):
    text = nodes.inputs(node_id).get(key)
    if not isinstance(text, str):
        raise SdrtError(f"workflow node {node_id} ({nodes.kind(node_id)}): {key} must be a "
                        f"string, got {short_repr(text)}")
    return text


def _sdxl_text(nodes, node_id):
    """A CLIPTextEncodeSDXL's (text_l, text_g, ((height, width), (crop_h, crop_w),
    (target_height, target_width))): sdrt's prompt, prompt_2 and SDXL micro-conditioning
    (original_size, crops_coords_top_left, target_size), each in diffusers' order."""
    number = lambda key: _number(nodes, node_id, key, int)  # noqa: E731
    sizes = ((number("height"), number("width")), (number("crop_h"), number("crop_w")),
             (number("target_height"), number("target_width")))
    return _text(nodes, node_id, "text_l"), _text(nodes, node_id, "text_g"), sizes


def _refiner_chain(nodes, refiner, base):
    """(checkpoint node, {side: text node}) of an SDXL refiner's KSamplerAdvanced
    (``refiner``): its model straight from a CheckpointLoaderSimple, its prompts through no
    ControlNet and with its CLIP, the base's texts."""
    where = f"workflow node {refiner} (KSamplerAdvanced)"
    checkpoint, loras, prompts, patches = nodes.model_chain(nodes.link(refiner, "model"))
    if loras or prompts or patches:
        raise SdrtError(f"{where}: sdrt's refiner runs the refiner checkpoint as it is (no "
                        f"LoRA, IP-Adapter or model patch on it)")
    text_ids, controls, zeroed = _controls(nodes, refiner, _REFINER_TEXT_NODES)
    if controls or zeroed:
        raise SdrtError(f"{where}: sdrt's refiner runs no ControlNet or {ZERO_OUT}")
    base_ids, _, _ = _controls(nodes, base)
    for side, text_id in text_ids.items():
        base_text = nodes.inputs(base_ids[side]).get(
            "text_l" if nodes.kind(base_ids[side]) == "CLIPTextEncodeSDXL" else "text")
        if _text(nodes, text_id, "text") != base_text:
            raise SdrtError(f"workflow node {text_id} ({nodes.kind(text_id)}): sdrt's refiner "
                            f"takes the base's {side} prompt ({short_repr(base_text)})")
        skip, _ = nodes.clip_chain(nodes.link(text_id, "clip"), checkpoint)
        if skip:
            raise SdrtError(f"workflow node {text_id} ({nodes.kind(text_id)}): sdrt's refiner "
                            f"encodes with the refiner's last layer (no CLIPSetLastLayer)")
    return checkpoint, text_ids


def _refined(nodes, refiner, base, flow, empty):
    """The base's steps before the switch, of an SDXL base KSamplerAdvanced that stops
    at end_at_step E of its steps with its leftover noise, and a refiner KSamplerAdvanced that
    adds none and runs the same schedule (steps, sampler, scheduler, cfg) from E to its end:
    sdrt's --refiner, switching after the base's E steps."""
    where = f"workflow node {refiner} (KSamplerAdvanced)"
    b, r = nodes.inputs(base), nodes.inputs(refiner)
    steps = flow.steps
    end = _number(nodes, base, "end_at_step", int, default=10000)
    if b.get("add_noise", "enable") != "enable" or b.get(
            "return_with_leftover_noise") != "enable" or not 0 < end < steps or not empty or \
            _number(nodes, base, "start_at_step", int, default=0):
        raise SdrtError(f"workflow node {base} (KSamplerAdvanced): an SDXL base before a "
                        f"refiner must add noise to an empty latent from step 0 and stop at "
                        f"end_at_step, before its steps ({steps}), with its leftover noise")
    if r.get("add_noise") != "disable" or _number(nodes, refiner, "start_at_step", int) != end \
            or _number(nodes, refiner, "end_at_step", int, default=10000) < steps:
        raise SdrtError(f"{where}: the refiner must add no noise and run from the base's "
                        f"end_at_step ({end}) to the end")
    for key, kind in (("steps", int), ("cfg", float)):
        if _number(nodes, refiner, key, kind) != _number(nodes, base, key, kind):
            raise SdrtError(f"{where}: {key} must be the base's ({b.get(key)})")
    if _pair(nodes, refiner) != _pair(nodes, base):
        raise SdrtError(f"{where}: sampler_name and scheduler must be the base's")
    return end


def _aesthetic_scores(nodes, text_ids, flow):
    """The refiner's (aesthetic score, negative aesthetic score) from its text nodes
    (``text_ids``, by side): a CLIPTextEncodeSDXLRefiner's ascore (its sizes the image's), or
    None (sdrt's defaults, 6 and 2.5, as ComfyUI's)."""
    scores = []
    for side in ("positive", "negative"):
        node = text_ids[side]
        if nodes.kind(node) != "CLIPTextEncodeSDXLRefiner":
            scores.append(None)
            continue
        size = (_number(nodes, node, "height", int), _number(nodes, node, "width", int))
        if size != (flow.height, flow.width):
            raise SdrtError(f"workflow node {node} (CLIPTextEncodeSDXLRefiner): width and "
                            f"height must be the image's ({flow.width}x{flow.height}): sdrt's "
                            f"refiner conditions on the image's size")
        scores.append(float(_number(nodes, node, "ascore", float)))
    return tuple(scores)


def _inpaint(nodes, latent, sampler_id, denoise):
    """The (mask file, channel), grow_mask and mask operations of an inpainting latent node
    (``latent``, of ``INPAINT_LATENTS``), checked."""
    kind = nodes.kind(latent)
    where = f"workflow node {latent} ({kind})"
    grow = None
    if kind == "VAEEncodeForInpaint":
        if denoise != 1:
            raise SdrtError(f"workflow node {sampler_id} ({nodes.kind(sampler_id)}): denoise "
                            f"{denoise:g} on {where}, whose masked pixels are greyed: sdrt "
                            f"runs it at denoise 1 (SetLatentNoiseMask or "
                            f"{INPAINT_CONDITIONING} keep the picture under a lower denoise)")
        grow = _number(nodes, latent, "grow_mask_by", int, default=6)
        if not 0 <= grow <= MAX_GROW_MASK:
            raise SdrtError(f"{where}: grow_mask_by must be an integer from 0 to "
                            f"{MAX_GROW_MASK}, got {grow}")
    elif kind == INPAINT_CONDITIONING:
        if nodes.inputs(latent).get("noise_mask", True) is not True:
            raise SdrtError(f"{where}: noise_mask {short_repr(nodes.inputs(latent)['noise_mask'])}"
                            f": sdrt keeps the latents outside the mask (noise_mask true)")
        if nodes.link(sampler_id, "latent_image")[1] != 2:
            raise SdrtError(f"workflow node {sampler_id} ({nodes.kind(sampler_id)}): "
                            f"latent_image must be node {latent}'s latent (output 2)")
    file, channel, ops = _mask_chain(nodes, latent, "mask")
    return (file, channel), grow, ops


def _mask_chain(nodes, node_id, key):
    """(file name, channel, operations) of the MASK a node's ``key`` takes through any
    InvertMask and GrowMask nodes (``MASK_OPS``), the operations in the order they run."""
    ops = []
    while nodes.kind(nodes.link(node_id, key)[0]) in MASK_OPS:
        node_id, key = nodes.link(node_id, key)[0], "mask"
        if nodes.kind(node_id) == "InvertMask":
            ops.append(("invert",))
            continue
        expand = _number(nodes, node_id, "expand", int, default=0)
        tapered = nodes.inputs(node_id).get("tapered_corners", True)
        if abs(expand) > MAX_EXPAND or not isinstance(tapered, bool):
            raise SdrtError(f"workflow node {node_id} (GrowMask): expand must be an integer "
                            f"from -{MAX_EXPAND} to {MAX_EXPAND} and tapered_corners true or "
                            f"false, got {expand} and {short_repr(tapered)}")
        ops.append(("grow", expand, tapered))
    return (*_mask_file(nodes, node_id, key), tuple(ops[::-1]))


def mask_operations(mask, ops):
    """A MASK (float (H, W), ``comfy_mask``'s) through ComfyUI's InvertMask and GrowMask
    nodes (``Workflow.mask_ops``): invert is 1 - mask; grow by e > 0 is e rounds of grey
    dilation (the maximum over a 3×3 cross, or the whole 3×3 square without tapered corners;
    outside the picture counts as its nearest edge pixel, as scipy's reflecting border),
    e < 0 as many of erosion (the minimum). float32 (H, W)."""
    import numpy as np
    mask = np.asarray(mask, np.float32)
    for op in ops:
        if op[0] == "invert":
            mask = 1 - mask
            continue
        _, expand, tapered = op
        pick = np.maximum if expand > 0 else np.minimum
        for _ in range(abs(expand)):
            p = np.pad(mask, 1, mode="edge")
            h, w = mask.shape
            out = mask
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)) + (
                    () if tapered else ((-1, -1), (-1, 1), (1, -1), (1, 1))):
                out = pick(out, p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
            mask = out
    return mask


def _outpaint(nodes, node_id, inpainting):
    """An ImagePadForOutpaint's (left, top, right, bottom, feathering), checked."""
    where = f"workflow node {node_id} ({OUTPAINT})"
    if not inpainting:
        raise SdrtError(f"{where}: sdrt paints around a picture only when inpainting through "
                        f"its MASK (VAEEncodeForInpaint, SetLatentNoiseMask or "
                        f"{INPAINT_CONDITIONING})")
    pad = tuple(_number(nodes, node_id, k, int, default=d) for k, d in (
        ("left", 0), ("top", 0), ("right", 0), ("bottom", 0), ("feathering", 40)))
    if not all(0 <= p <= MAX_PAD for p in pad):
        raise SdrtError(f"{where}: left, top, right, bottom and feathering must be integers "
                        f"from 0 to {MAX_PAD}, got {', '.join(map(str, pad))}")
    return pad


def outpaint(image, pad, max_side):
    """ComfyUI's ImagePadForOutpaint on a PIL image (read as LoadImage reads it): (the picture
    on a mid-grey canvas grown by ``pad``'s left, top, right and bottom pixels, PIL RGB (the
    grey 8-bit 128), its MASK float32 (H, W)): 1 on the new pixels; on the picture's, where
    ``pad``'s feathering f is under half its sides, ((f - d) / f)² within f of a padded side
    (d the distance to it, counted from 0 at its first row or column on the top and left and
    from 1 at its last on the bottom and right), else 0. A canvas with a side past
    ``max_side`` is refused before it is made."""
    import numpy as np
    from PIL import Image
    left, top, right, bottom, feathering = pad
    picture = comfy_image(image)
    w, h = picture.size
    if max(w + left + right, h + top + bottom) > max_side:
        raise SdrtError(f"ImagePadForOutpaint pads the {w}x{h} image to "
                        f"{w + left + right}x{h + top + bottom}; each side must be at most "
                        f"{max_side} (SDRT_MAX_SIDE)")
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), (128, 128, 128))
    canvas.paste(picture, (left, top))
    mask = np.ones((canvas.height, canvas.width), np.float32)
    inner = np.zeros((h, w), np.float32)
    if 0 < feathering and 2 * feathering < min(h, w):
        rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
        d = np.minimum(np.minimum(rows if top else h, h - rows if bottom else h),
                       np.minimum(cols if left else w, w - cols if right else w))
        inner = np.where(d < feathering, ((feathering - d) / feathering) ** 2, 0)
    mask[top:top + h, left:left + w] = inner
    return canvas, mask


def _composite(nodes, node_id, image, flow):
    """Checks an ImageCompositeMasked (``node_id``) of the decoded inpainting over its init
    image (the LoadImage node ``image``, or the ImagePadForOutpaint's canvas) through its mask
    at x 0, y 0; True."""
    where = f"workflow node {node_id} ({COMPOSITE})"
    if flow.mask is None:
        raise SdrtError(f"{where}: sdrt lays a result over its picture only when inpainting "
                        f"(VAEEncodeForInpaint, SetLatentNoiseMask or {INPAINT_CONDITIONING})")
    if nodes.link(node_id, "destination") != (image, 0):
        raise SdrtError(f"{where}: destination must be the inpainted picture (node {image}'s "
                        f"IMAGE)")
    if nodes.inputs(node_id).get("mask") is None or _mask_chain(nodes, node_id, "mask") != \
            (*flow.mask, flow.mask_ops):
        raise SdrtError(f"{where}: mask must be the inpainting's ({flow.mask[0]!r}, "
                        f"{flow.mask[1]}, through the same mask nodes)")
    x, y = (_number(nodes, node_id, k, int, default=0) for k in ("x", "y"))
    if x or y or nodes.inputs(node_id).get("resize_source", False) is not False:
        raise SdrtError(f"{where}: sdrt lays the result at x 0, y 0 at its own size (x 0, y 0, "
                        f"resize_source false), got x {x}, y {y}, resize_source "
                        f"{short_repr(nodes.inputs(node_id).get('resize_source'))}")
    return True


def composite(destination, source, mask):
    """ComfyUI's ImageCompositeMasked at x 0, y 0: ``source`` (PIL) laid over ``destination``
    (PIL, read as LoadImage reads it) from its top-left corner through ``mask`` (float (H, W)
    in [0, 1], ``comfy_mask``'s, scaled bilinearly to the source's size), within the
    destination. An RGB image of the destination's size, rounded to 8 bits."""
    import numpy as np
    from PIL import Image
    out = np.asarray(comfy_image(destination), np.float32).copy()
    top = np.asarray(source.convert("RGB"), np.float32)
    h, w = min(top.shape[0], out.shape[0]), min(top.shape[1], out.shape[1])
    weight = inpaint_mask(mask, top.shape[1], top.shape[0])[:h, :w, None]
    out[:h, :w] = top[:h, :w] * weight + out[:h, :w] * (1 - weight)
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8))


def workflow_masks(source, channel, ops, width, height, grow=None):
    """(the MASK as the workflow's mask nodes leave it, the mask its sampler repaints through
    at ``width`` × ``height``): ``source`` a PIL image read by ``channel`` (``comfy_mask``) or
    an outpainting canvas's MASK (float (H, W)), through ``ops`` (``mask_operations``), then
    ``inpaint_mask`` with ``grow``."""
    read = mask_operations(comfy_mask(source, channel) if hasattr(source, "getbands")
                           else source, ops)
    return read, inpaint_mask(read, width, height, grow)


def inpaint_mask(mask, width, height, grow=None):
    """The mask an inpainting workflow repaints through, at the picture's ``width`` ×
    ``height``: ``mask`` (float (H, W) in [0, 1], ``comfy_mask``'s) scaled there bilinearly
    (torch's, without antialiasing, as ComfyUI scales a MASK to its image). With ``grow`` (a
    VAEEncodeForInpaint's grow_mask_by), rounded and grown as that node grows it: a
    ``grow`` × ``grow`` box summed over the rounded mask, padded by ceil((grow - 1) / 2) and
    cut to the picture (so an even box grows it one pixel more down and right than up and
    left), clipped to 1. float32 (height, width)."""
    import numpy as np
    import torch
    x = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    if x.shape[2:] != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear")
    if grow:
        x = torch.nn.functional.conv2d(x.round(), torch.ones(1, 1, grow, grow),
                                       padding=math.ceil((grow - 1) / 2))
        x = x[..., :height, :width].clamp(0, 1)
    if grow is not None:
        x = x.round()
    return x[0, 0].numpy()


def _pair(nodes, sampler_id):
    """A sampler node's (sampler_name, scheduler), one sdrt runs."""
    k = nodes.inputs(sampler_id)
    pair = (k.get("sampler_name"), k.get("scheduler"))
    if pair not in _PAIRS:
        raise SdrtError(f"workflow node {sampler_id} ({nodes.kind(sampler_id)}): sampler_name "
                        f"{short_repr(pair[0])} with scheduler {short_repr(pair[1])} has no sdrt "
                        f"sampler; sdrt runs {', '.join(_SAMPLER_NAMES)} on "
                        f"{', '.join(['karras', *_SCHEDULES])} (lcm on {', '.join(_EVEN)})")
    return pair


def _hires(nodes, first, second, upscale, flow, model=None):
    """ComfyUI's hires fix, first sampler → LatentUpscale(By) → second sampler (or in pixels:
    VAEDecode → ImageScale(By), or ``model``'s upscale → VAEEncode), as sdrt's (A1111's) hires
    fix: the second sampler's steps and denoise (or start_at_step) are its steps and strength,
    its sampler the hires sampler; it must sample the first's model with the same prompts and
    cfg (the second pass's noise comes from the first's generator, as A1111 draws it, not from
    its own seed). With a model, the second pass is at the size VAEEncode cuts the upscaled
    picture to (multiples of 8, about its centre)."""
    where = f"workflow node {second} ({nodes.kind(second)})"
    for key in ("model", "positive", "negative"):
        if nodes.link(second, key) != nodes.link(first, key):
            raise SdrtError(f"{where}: a hires fix's second sampler must take the first's "
                            f"{key} (node {first}'s), got {nodes.link(second, key)}")
    if _number(nodes, second, "cfg", float) != flow.guidance:
        raise SdrtError(f"{where}: a hires fix's second sampler must take the first's cfg "
                        f"({flow.guidance:g})")
    if flow.width is None:
        raise SdrtError(f"{where}: sdrt's hires fix redraws text to image; node {first} samples "
                        f"an image")
    if model is not None:
        scaling = model.scaling(flow.width, flow.height)
        w, h = scaling[1:3]
        if w < 8 or h < 8:
            raise SdrtError(f"workflow node {upscale} ({nodes.kind(upscale)}) makes the "
                            f"{flow.width}x{flow.height} picture {w}x{h}, which VAEEncode "
                            f"cuts to nothing (multiples of 8)")
        size = dict(upscaler=model.model, resize_x=w // 8 * 8, resize_y=h // 8 * 8,
                    comfy_upscale=scaling)
    else:
        size = _image_size(nodes, upscale, flow)
    steps = _number(nodes, second, "steps", int)
    if nodes.kind(second) == "KSamplerAdvanced":
        strength = _advanced(nodes, second, steps, False)
        steps -= _number(nodes, second, "start_at_step", int, default=0)  # the steps it runs
    else:
        strength = float(_number(nodes, second, "denoise", float, default=1.0))
    sampler = _PAIRS[_pair(nodes, second)]
    return Hires(steps=steps, strength=strength,
                 sampler=None if sampler == flow.sampler else sampler, **size)


def _image_size(nodes, upscale, flow):
    """The hires fix's upscaler and size (``Hires`` fields) of a LatentUpscale(By) or an
    ImageScale(By) of the first picture."""
    methods = _UPSCALES[nodes.kind(upscale)]
    method = nodes.inputs(upscale).get("upscale_method")
    if method not in methods:
        raise SdrtError(f"workflow node {upscale} ({nodes.kind(upscale)}): upscale_method "
                        f"{short_repr(method)}: sdrt upscales "
                        f"{'latents' if methods is LATENT_UPSCALES else 'images'} by "
                        f"{', '.join(methods)}")
    size = {"upscaler": methods[method]}
    if nodes.kind(upscale).endswith("By"):
        size["scale"] = float(_number(nodes, upscale, "scale_by", float))
    else:
        w, h = (_number(nodes, upscale, key, int) for key in ("width", "height"))
        crop = nodes.inputs(upscale).get("crop", "disabled")
        if crop not in ("disabled", "center") or (
                crop == "disabled" and w and h and w * flow.height != h * flow.width):
            raise SdrtError(f"workflow node {upscale} ({nodes.kind(upscale)}): crop "
                            f"{short_repr(crop)} "
                            f"to {w}x{h}: sdrt keeps the {flow.width}x{flow.height} image's "
                            f"shape (crop \"center\" cuts it to another)")
        size.update(resize_x=w, resize_y=h)
    return size


def _is_model_upscale(nodes, node_id):
    """Whether ``node_id`` is an ImageUpscaleWithModel or an ImageScale(By) of one."""
    if nodes.kind(node_id) in _IMAGE_SCALES:
        node_id = nodes.link(node_id, "image")[0]
    return nodes.kind(node_id) == _WITH_MODEL


def _model_upscale(nodes, node_id, upscaler_scale):
    """The model upscale that ends at ``node_id`` (an ImageUpscaleWithModel, or an ImageScale
    or ImageScaleBy of one): (``ModelUpscale``, the ImageUpscaleWithModel node, whose image
    input the picture comes from)."""
    scale_node = None
    if nodes.kind(node_id) in _IMAGE_SCALES:
        scale_node, node_id = node_id, nodes.follow(node_id, "image", (_WITH_MODEL,))
    loader = nodes.follow(node_id, "upscale_model", ("UpscaleModelLoader",))
    where = f"workflow node {loader} (UpscaleModelLoader)"
    file = nodes.inputs(loader).get("model_name")
    if not isinstance(file, str) or not file.strip():
        raise SdrtError(f"{where}: model_name must be a file name, got {short_repr(file)}")
    name = file.replace("\\", "/").rsplit("/", 1)[-1]
    if name.lower().endswith(_MODEL_EXTENSIONS):
        name = name.rsplit(".", 1)[0]
    if upscaler_scale is None:
        raise SdrtError(f"{where} loads {file!r}: reading a workflow that upscales with a model "
                        f"needs the upscale models, and none were given")
    try:
        scale = upscaler_scale(name)
    except SdrtError as e:
        raise SdrtError(f"{where}: model_name {short_repr(file)}: {e}") from None
    if scale_node is None:
        return ModelUpscale(name, scale), node_id
    where = f"workflow node {scale_node} ({nodes.kind(scale_node)})"
    values = nodes.inputs(scale_node)
    method = values.get("upscale_method")
    if method not in SCALE_METHODS:
        raise SdrtError(f"{where}: upscale_method must be one of {', '.join(SCALE_METHODS)}, "
                        f"got {short_repr(method)}")
    if nodes.kind(scale_node) == "ImageScaleBy":
        by = float(_number(nodes, scale_node, "scale_by", float))
        if not (math.isfinite(by) and by > 0):
            raise SdrtError(f"{where}: scale_by must be a positive number, got {by:g}")
        return ModelUpscale(name, scale, method, scale_by=by), node_id
    w, h = (_number(nodes, scale_node, key, int) for key in ("width", "height"))
    crop = values.get("crop", "disabled")
    if w < 0 or h < 0 or crop not in ("disabled", "center"):
        raise SdrtError(f"{where}: width and height must be 0 or more and crop \"disabled\" or "
                        f"\"center\", got {w}, {h} and {short_repr(crop)}")
    return ModelUpscale(name, scale, method, width=w, height=h, crop=crop), node_id


def _advanced(nodes, sampler_id, steps, empty):
    """A KSamplerAdvanced's part of its schedule as sdrt's strength: steps start_at_step to
    the last of a ``steps``-step schedule, noise added, none left over. On an image that is
    sdrt's image to image at strength (steps - start) / steps, which keeps those steps (to the
    ulp above where int(steps * strength) would round down); on an empty latent, the whole
    schedule from step 0."""
    where = f"workflow node {sampler_id} (KSamplerAdvanced)"
    k = nodes.inputs(sampler_id)
    if k.get("add_noise", "enable") != "enable":
        raise SdrtError(f"{where}: add_noise {short_repr(k.get('add_noise'))}: sdrt samples "
                        f"from noise it adds (add_noise \"enable\")")
    start = _number(nodes, sampler_id, "start_at_step", int, default=0)
    end = _number(nodes, sampler_id, "end_at_step", int, default=10000)
    if end < steps:
        raise SdrtError(f"{where}: end_at_step {end} stops before the last of its {steps} "
                        f"steps; sdrt runs a schedule to its end")
    if not 0 <= start < steps or (empty and start):
        raise SdrtError(f"{where}: start_at_step must be 0 on an empty latent and below steps "
                        f"({steps}) on an image, got {start}")
    strength = (steps - start) / steps
    while int(steps * strength) < steps - start:
        strength = math.nextafter(strength, 2.0)
    return strength


def _controls(nodes, sampler_id, kinds=_TEXT_NODES, inpaint=None):
    """The KSampler's prompts through any ControlNetApplyAdvanced nodes: ({"positive": text
    node, "negative": text node}, [Control] nearest the prompts first, zeroed). Each such node must
    condition both prompts (its outputs 0 and 1 to the next node's positive and negative), and
    the prompts be nodes of ``kinds``. ``inpaint``: the sampler's InpaintModelConditioning,
    which the prompts must pass through in the same way. One ConditioningZeroOut may stand
    on the negative's path: the third value says whether one does."""
    links = {side: nodes.link(sampler_id, side) for side in ("positive", "negative")}
    controls, seen, through, zeroed = [], set(), inpaint is None, False
    while True:
        if nodes.kind(links["negative"][0]) == ZERO_OUT and not zeroed:
            links["negative"], zeroed = nodes.link(links["negative"][0], "conditioning"), True
            continue
        (pos, pos_slot), (neg, neg_slot) = links["positive"], links["negative"]
        if not through and inpaint in (pos, neg):
            if pos != neg or (pos_slot, neg_slot) != (0, 1):
                raise SdrtError(f"workflow node {sampler_id} ({nodes.kind(sampler_id)}) must "
                                f"take node {inpaint}'s ({INPAINT_CONDITIONING}) positive and "
                                f"negative outputs as its positive and negative")
            links, through = {side: nodes.link(inpaint, side) for side in links}, True
            continue
        if not any(nodes.kind(node) in (_APPLY, "ControlNetApply") and node not in seen
                   for node in (pos, neg)):
            break
        node = pos if nodes.kind(pos) in (_APPLY, "ControlNetApply") else neg
        seen.add(node)
        if nodes.kind(node) == "ControlNetApply" or pos != neg or (pos_slot, neg_slot) != (0, 1):
            raise SdrtError(f"workflow node {node} ({nodes.kind(node)}) must condition both the "
                            f"positive and the negative prompt, as sdrt applies a ControlNet: "
                            f"use ControlNetApplyAdvanced with its two outputs to the positive "
                            f"and negative inputs")
        loader = nodes.follow(node, "control_net", ("ControlNetLoader",))
        image = nodes.follow(node, "image", ("LoadImage", *PREPROCESSOR_NODES))
        preprocessor = None
        if nodes.kind(image) in PREPROCESSOR_NODES:
            preprocessor = _preprocessor(nodes, image)
            image = nodes.follow(image, "image", ("LoadImage",))
        name, picture = (nodes.inputs(loader).get("control_net_name"),
                         nodes.inputs(image).get("image"))
        for what, value in (("control_net_name", name), ("image", picture)):
            if not isinstance(value, str) or not value:
                raise SdrtError(f"workflow node {loader if what == 'control_net_name' else image}"
                                f": {what} must be a file name, got {short_repr(value)}")
        control = Control(name, picture, _number(nodes, node, "strength", float),
                          _number(nodes, node, "start_percent", float, default=0.0),
                          _number(nodes, node, "end_percent", float, default=1.0),
                          preprocessor)
        if not 0 <= control.start < control.end <= 1:
            raise SdrtError(f"workflow node {node} ({_APPLY}): start_percent and end_percent "
                            f"must satisfy 0 <= start < end <= 1, got {control.start:g} and "
                            f"{control.end:g}")
        controls.append(control)
        links = {side: nodes.link(node, side) for side in ("positive", "negative")}
    if not through:
        raise SdrtError(f"workflow node {sampler_id} ({nodes.kind(sampler_id)}) samples node "
                        f"{inpaint}'s ({INPAINT_CONDITIONING}) latent, so its prompts must come "
                        f"through that node's positive and negative outputs")
    for side, (node, _) in links.items():
        if nodes.kind(node) not in kinds:
            raise SdrtError(f"workflow node {node} ({nodes.kind(node)}) is not supported as "
                            f"{nodes.kind(sampler_id)}'s {side}: sdrt takes "
                            f"{' or '.join(kinds)}, through {_APPLY} nodes, there")
    return {side: node for side, (node, _) in links.items()}, controls[::-1], zeroed


def _preset(nodes, node_id):
    """An IPAdapterUnifiedLoader's preset, checked."""
    where = f"workflow node {node_id} ({UNIFIED})"
    preset = nodes.inputs(node_id).get("preset")
    if preset not in PRESETS:
        faceid = ("; FaceID reads an insightface embedding, which sdrt does not compute"
                  if isinstance(preset, str) and "FACEID" in preset.upper() else "")
        raise SdrtError(f"{where}: preset must be one of {', '.join(PRESETS)}{faceid}, got "
                        f"{short_repr(preset)}")
    if nodes.inputs(node_id).get("ipadapter") is not None:
        raise SdrtError(f"{where}: sdrt does not chain unified loaders (its ipadapter input); "
                        f"remove it")
    return preset


def preset_files(preset, sdxl, adapters, encoders=None):
    """(adapter, encoder): the first of the sorted file names ``adapters`` and ``encoders``
    that an IPAdapterUnifiedLoader ``preset`` finds for an SDXL model (``sdxl``) or an SD 1.x
    one, as cubiq's loader searches ComfyUI's ipadapter and clip_vision folders (``encoders``
    None: the encoder is not looked for, None)."""
    import re
    (sd1, xl), encoder = PRESETS[preset]
    pattern = xl if sdxl else sd1
    if pattern is None:
        raise SdrtError(f"IPAdapterUnifiedLoader preset {preset!r} has no adapter for "
                        f"{'SDXL' if sdxl else 'SD 1.x'} models")
    found = []
    for names, what, wanted in ((adapters, "adapter", pattern), (encoders, "encoder", encoder)):
        if names is None:
            found.append(None)
            continue
        match = [n for n in sorted(names) if re.search(wanted, n, re.IGNORECASE)]
        if not match:
            raise SdrtError(f"IPAdapterUnifiedLoader preset {preset!r} finds no {what} among "
                            f"{', '.join(sorted(names)) or 'none'} (a name matching "
                            f"{wanted!r})")
        found.append(match[0])
    return tuple(found)


def _image_prompt(nodes, node_id):
    """An IPAdapterAdvanced (or IPAdapter) node's ``ImagePrompt``, checked."""
    kind = nodes.kind(node_id)
    where = f"workflow node {node_id} ({kind})"
    inputs = nodes.inputs(node_id)
    plain = {} if kind == IPADAPTER_SIMPLE else IPADAPTER_PLAIN
    for key, values in plain.items():
        if inputs.get(key, values[0]) not in values:
            raise SdrtError(f"{where}: {key} must be {' or '.join(map(repr, values))} (sdrt "
                            f"runs diffusers' IP-Adapter), got {short_repr(inputs.get(key))}")
    types = SIMPLE_WEIGHT_TYPES if kind == IPADAPTER_SIMPLE else {t: t for t in WEIGHT_TYPES}
    weight_type = inputs.get("weight_type", "standard" if kind == IPADAPTER_SIMPLE else "linear")
    if weight_type not in types:
        raise SdrtError(f"{where}: weight_type must be one of {', '.join(types)}, got "
                        f"{short_repr(weight_type)}")
    if inputs.get("image_negative") is not None:
        raise SdrtError(f"{where}: sdrt does not run an IP-Adapter's image_negative; remove it")
    mask = None if inputs.get("attn_mask") is None else _mask_file(nodes, node_id,
                                                                 "attn_mask")
    loaders = (UNIFIED,) if kind == IPADAPTER_SIMPLE else ("IPAdapterModelLoader", UNIFIED)
    loader = nodes.follow(node_id, "ipadapter", loaders)
    preset = _preset(nodes, loader) if nodes.kind(loader) == UNIFIED else None
    encoder = None
    if preset is None or inputs.get("clip_vision") is not None:
        encoder = nodes.follow(node_id, "clip_vision", ("CLIPVisionLoader",))
    image = nodes.follow(node_id, "image", ("LoadImage", PREP))
    prep = None
    if nodes.kind(image) == PREP:
        values = nodes.inputs(image)
        prep = (values.get("interpolation", "LANCZOS"), values.get("crop_position", "center"),
                _number(nodes, image, "sharpening", float, default=0.0))
        for key, value, allowed in (("interpolation", prep[0], PREP_FILTERS),
                                    ("crop_position", prep[1], PREP_CROPS)):
            if value not in allowed:
                raise SdrtError(f"workflow node {image} ({PREP}): {key} must be one of "
                                f"{', '.join(allowed)}, got {short_repr(value)}")
        if not 0 <= prep[2] <= 1:
            raise SdrtError(f"workflow node {image} ({PREP}): sharpening must be in [0, 1], "
                            f"got {prep[2]:g}")
        image = nodes.follow(image, "image", ("LoadImage",))
    files = {"ipadapter_file": None, "clip_name": None}
    for node, key in ((loader, "ipadapter_file"), (encoder, "clip_name"), (image, "image")):
        if node is None or (key == "ipadapter_file" and preset is not None):
            continue  # (the preset's)
        files[key] = nodes.inputs(node).get(key)
        if not isinstance(files[key], str) or not files[key]:
            raise SdrtError(f"workflow node {node} ({nodes.kind(node)}): {key} must be a file "
                            f"name, got {short_repr(files[key])}")
    prompt = ImagePrompt(files["ipadapter_file"], files["clip_name"], files["image"],
                         _number(nodes, node_id, "weight", float, default=1.0),
                         _number(nodes, node_id, "start_at", float, default=0.0),
                         _number(nodes, node_id, "end_at", float, default=1.0), prep, preset,
                         types[weight_type], mask)
    if not 0 <= prompt.start < prompt.end <= 1:
        raise SdrtError(f"{where}: start_at and end_at must satisfy 0 <= start < end <= 1, "
                        f"got {prompt.start:g} and {prompt.end:g}")
    return prompt


def block_scales(weight_type, weight, places, sdxl):
    """cubiq's ``weight_type`` at ``weight`` as diffusers' per-block scale dict (what
    ``ip_adapter_scale`` takes) over the UNet's transformer blocks ``places`` ((part, block,
    attention) of each, part "down", "mid" or "up"), counted in the order they run as cubiq
    counts them (``layers`` 11 for an SDXL adapter, ``sdxl``, else 16); a plain number for
    "linear". A block a "style"/"composition" table does not name gets 0."""
    if weight_type == "linear":
        return weight
    order = sorted(set(places), key=lambda p: (("down", "mid", "up").index(p[0]), p[1], p[2]))
    layers = 11 if sdxl else 16
    weak = {"weak input": ("down",), "weak middle": ("mid",), "weak output": ("up",),
            "strong middle": ("down", "up")}
    ramps = {"ease in": lambda t: 1 - t / layers, "ease out": lambda t: t / layers,
             "ease in-out": lambda t: 1 - abs(t - layers / 2) / (layers / 2),
             "reverse in-out": lambda t: abs(t - layers / 2) / (layers / 2)}
    out = {"down": {}, "up": {}}
    for t, (part, block, _) in enumerate(order):
        if weight_type in ramps:
            value = weight * (0.05 + 0.95 * ramps[weight_type](t))
        elif weight_type in weak:
            value = weight * 0.2 if part in weak[weight_type] else weight
        else:
            entry = _STYLE_TABLES[weight_type][sdxl].get(t, 0.0)
            kind, factor = entry if isinstance(entry, tuple) else (entry, 1.0)
            value = 0.0 if kind == 0.0 else (weight if kind == _W else 1.0) * factor
        if part == "mid":
            out["mid"] = value
        else:
            out[part].setdefault(f"block_{block}", []).append(value)
    return out


def adapter_scale(weight_type, weight, unet, adapter):
    """An IP-Adapter node's ``ip_adapter_scale`` on ``unet``: ``block_scales`` over its
    transformer blocks, by cubiq's SDXL tables for an adapter (``ip_adapter.file_config``'s
    config) of SDXL's cross-attention width, 2048."""
    if weight_type == "linear":
        return weight
    from .ip_adapter import block_places
    return block_scales(weight_type, weight, block_places(unet),
                        adapter.cross_attention_dim == 2048)


# The channels LoadImageMask reads (alpha inverted, as ComfyUI's: a MASK is 1 where it acts)
MASK_CHANNELS = ("alpha", "red", "green", "blue")


def _mask_file(nodes, node_id, key):
    """(file name, channel) of the MASK a node's ``key`` takes: a LoadImageMask's, or a
    LoadImage's MASK output (its alpha)."""
    source, slot = nodes.link(node_id, key)
    kind = nodes.kind(source)
    if kind == "LoadImageMask":
        channel = nodes.inputs(source).get("channel", "alpha")
        if channel not in MASK_CHANNELS:
            raise SdrtError(f"workflow node {source} (LoadImageMask): channel must be one of "
                            f"{', '.join(MASK_CHANNELS)}, got {short_repr(channel)}")
    elif kind == "LoadImage" and slot == 1:
        channel = "alpha"
    elif kind == OUTPAINT and slot == 1 and key == "mask":  # (an inpainting's: its canvas)
        return None, source
    else:
        raise SdrtError(f"workflow node {source} ({kind}) is not supported as "
                        f"{nodes.kind(node_id)}'s {key}: sdrt takes LoadImageMask or "
                        f"LoadImage's MASK there")
    name = nodes.inputs(source).get("image")
    if not isinstance(name, str) or not name:
        raise SdrtError(f"workflow node {source} ({kind}): image must be a file name, got "
                        f"{short_repr(name)}")
    return name, channel


def comfy_mask(image, channel):
    """A MASK as ComfyUI's LoadImageMask (and LoadImage's MASK: ``channel`` "alpha") reads
    it from a PIL image: the channel in [0, 1], the alpha inverted (an image without alpha
    gives 0: the adapter acts nowhere). float32 (H, W)."""
    import numpy as np
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.getbands() != ("R", "G", "B", "A"):
        if image.mode == "I":
            image = image.point(lambda v: v * (1 / 255))
        image = image.convert("RGBA")  # (no alpha: opaque, a MASK of 0)
    band = channel[0].upper()
    mask = np.asarray(image.getchannel(band), np.float32) / 255
    return 1 - mask if band == "A" else mask


def comfy_image(image):
    """A PIL image as ComfyUI's LoadImage gives its IMAGE: 8-bit RGB, 16-bit greys scaled to
    8 bits, an alpha channel dropped (not laid over white: the pixels under a mask drawn in
    the alpha stay what they were)."""
    from .images import to_rgb8
    return to_rgb8(image) if image.mode == "I" else image.convert("RGB")


def clip_vision_image(image, size, prep=None):
    """A reference image (PIL) as cubiq's IPAdapterAdvanced hands it to the CLIP image encoder
    of input ``size`` (224 for the real ones): ``prep`` (a PrepImageForClipVision's
    (interpolation, crop_position, sharpening), or None) first, then ComfyUI's
    ``clip_preprocess``: the shorter side to ``size`` (torch's antialiased bicubic), the
    centre cut (the offsets floored), rounded to 8 bits. A ``size`` × ``size`` RGB image, which
    the encoder's own preprocessing then takes as it is."""
    import numpy as np
    import torch
    from PIL import Image

    x = torch.from_numpy(np.array(comfy_image(image), np.float32) / 255).permute(2, 0, 1)[None]
    if prep is not None:
        x = _prep_for_clip_vision(x, size, *prep)
    if x.shape[2:] != (size, size):
        scale = size / min(x.shape[2:])
        x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[2]),
                                                     round(scale * x.shape[3])),
                                            mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    pixels = torch.clip(255 * x, 0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels[0].permute(1, 2, 0).numpy())


def _prep_for_clip_vision(x, size, interpolation, crop, sharpening):
    """PrepImageForClipVision on (1, 3, H, W) float32 in [0, 1]: the square cut at ``crop``
    (or the image padded with black to a square: "pad"), PIL's ``interpolation`` to ``size``
    (through 8 bits, as torchvision's ToPILImage truncates), then AMD's contrast-adaptive
    sharpening by ``sharpening``."""
    import numpy as np
    import torch
    from PIL import Image
    h, w = x.shape[2:]
    if crop == "pad":
        if h != w:
            pad = abs(h - w) // 2
            x = torch.nn.functional.pad(x, (pad, pad, 0, 0) if h > w else (0, 0, pad, pad))
    else:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        top = {"top": 0, "bottom": h - side}.get(crop, top)
        left = {"left": 0, "right": w - side}.get(crop, left)
        x = x[:, :, top:top + side, left:left + side]
    picture = Image.fromarray((x[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy())
    picture = picture.resize((size, size), resample=getattr(Image.Resampling, interpolation))
    x = torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1)[None]
    return _sharpen(x, sharpening) if sharpening > 0 else x


def _sharpen(x, amount):
    """Contrast-adaptive sharpening (AMD FidelityFX CAS, as cubiq's nodes run it) of
    (1, 3, H, W) in [0, 1]: each pixel's cross neighbours pulled by a weight that shrinks
    where the 3×3 neighbourhood's contrast is high."""
    import torch
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[2:]
    at = lambda dy, dx: p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    cross = torch.stack([at(-1, 0), at(0, -1), at(0, 0), at(0, 1), at(1, 0)])
    diagonal = torch.stack([at(-1, -1), at(-1, 1), at(1, -1), at(1, 1)])
    low = cross.min(0)[0].clamp(min=0) + diagonal.min(0)[0].clamp(min=0)
    high = cross.max(0)[0].clamp(max=1) + diagonal.max(0)[0].clamp(max=1)
    amp = torch.sqrt(torch.minimum(low, 2 - high) / high)
    weight = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    out = ((at(-1, 0) + at(0, -1) + at(0, 1) + at(1, 0)) * weight + at(0, 0)) / (1 + 4 * weight)
    return torch.nan_to_num(out).clamp(0, 1)


def _preprocessor(nodes, node_id):
    """A preprocessor node's (sdrt's preprocessor name, resolution, threshold A, threshold
    B), checked (``engine.preprocess.settings``)."""
    from .preprocess import FIELDS, get, settings
    module, inputs = PREPROCESSOR_NODES[nodes.kind(node_id)]
    by_field = {field: key for key, field in inputs.items()}
    values = nodes.inputs(node_id)
    pre = get(module)
    where = f"workflow node {node_id} ({nodes.kind(node_id)}): "
    return (module, *settings(pre, *(values.get(by_field.get(f)) for f in FIELDS),
                              names=tuple(where + by_field.get(f, f) for f in FIELDS)))


def _freeu(nodes, node_id):
    """A FreeU or FreeU_V2 node's ``Workflow.freeu``, checked (``freeu.FreeU``)."""
    from .freeu import FreeU
    kind = nodes.kind(node_id)
    values = [_number(nodes, node_id, k, float, default=d)
              for k, d in zip(("b1", "b2", "s1", "s2"), FREEU_NODES[kind][1])]
    try:
        FreeU(*values, FREEU_NODES[kind][0])
    except SdrtError as e:
        raise SdrtError(f"workflow node {node_id} ({kind}): {e}") from None
    return (*values, FREEU_NODES[kind][0])


def _model_patch(nodes, node_id):
    """The Workflow value of a MODEL_PATCHES node, checked: a FreeU node's ``freeu``, a
    PerturbedAttentionGuidance's scale (its "middle" block 0: sdrt's mid-block perturbation),
    a RescaleCFG's multiplier, a ModelSamplingDiscrete's ``Workflow.sampling``."""
    from .request import MAX_PAG_SCALE
    kind = nodes.kind(node_id)
    if kind in FREEU_NODES:
        return _freeu(nodes, node_id)
    if kind == MODEL_SAMPLING:
        inputs = nodes.inputs(node_id)
        sampling, zsnr = inputs.get("sampling", "eps"), inputs.get("zsnr", False)
        if sampling not in MODEL_SAMPLINGS:
            raise SdrtError(f"workflow node {node_id} ({kind}): sdrt runs sampling "
                            f"{', '.join(MODEL_SAMPLINGS)}, got {short_repr(sampling)}")
        if not isinstance(zsnr, bool):
            raise SdrtError(f"workflow node {node_id} ({kind}): zsnr must be true or false, "
                            f"got {short_repr(zsnr)}")
        return MODEL_SAMPLINGS[sampling], zsnr
    key, default, top = ("scale", 3.0, MAX_PAG_SCALE) if kind == PAG else ("multiplier", 0.7, 1)
    value = _number(nodes, node_id, key, float, default=default)
    if not (math.isfinite(value) and 0 <= value <= top):
        raise SdrtError(f"workflow node {node_id} ({kind}): {key} must be a number from 0 to "
                        f"{top:g}, got {value:g}")
    return value


def scheduler_fields(sampling):
    """((field, value), ...) of the scheduler config a ``Workflow.sampling`` sets (its
    prediction type, a zero-terminal-SNR schedule); () for None."""
    from .request import ZERO_SNR
    if sampling is None:
        return ()
    kind, zsnr = sampling
    fields = {} if kind == "lcm" else {"prediction_type": kind}
    return tuple({**fields, **(ZERO_SNR if zsnr else {})}.items())


def _names(loras):
    return ", ".join(f"{name} (node {node})" for node, name, _ in loras) or "none"


def _number(nodes, node_id, key, kind, default=None):
    value = nodes.inputs(node_id).get(key, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
    if not ok or (kind is int and value != int(value)):
        raise SdrtError(f"workflow node {node_id} ({nodes.kind(node_id)}): {key} must be "
                        f"{'an integer' if kind is int else 'a number'}, got {short_repr(value)}")
    return kind(value)


# The outputs of the nodes sdrt reads that have more than one, by slot (every other node's
# is slot 0), and the type each input that links to one of them takes.
_SLOTS = {"CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"), "LoraLoader": ("MODEL", "CLIP"),
            "LoadImage": ("IMAGE", "MASK"), "ImagePadForOutpaint": ("IMAGE", "MASK"),
            "InpaintModelConditioning": ("CONDITIONING", "CONDITIONING", "LATENT"),
            "ControlNetApplyAdvanced": ("CONDITIONING", "CONDITIONING"),
            "IPAdapterUnifiedLoader": ("MODEL", "IPADAPTER"),
            "SamplerCustom": ("LATENT", "LATENT"), "SamplerCustomAdvanced": ("LATENT", "LATENT")}
_LINK_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "pixels": "IMAGE",
               "image": "IMAGE", "source": "IMAGE", "destination": "IMAGE", "mask": "MASK",
               "attn_mask": "MASK", "samples": "LATENT", "latent_image": "LATENT",
               "ipadapter": "IPADAPTER"}


class _Nodes:
    """The graph, with links followed and checked."""

    def __init__(self, graph):
        self.graph = graph

    def kind(self, node_id):
        return self.graph[node_id].get("class_type")

    def inputs(self, node_id):
        inputs = self.graph[node_id].get("inputs")
        if not isinstance(inputs, dict):
            raise SdrtError(f"workflow node {node_id} has no inputs object")
        return inputs

    def link(self, node_id, key):
        """The node ``key`` of ``node_id`` comes from: (id, output slot), an output that node
        has, of the type ``key`` takes (``_SLOTS``, ``_LINK_TYPES``)."""
        value = self.inputs(node_id).get(key)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
                and not isinstance(value[1], bool)):
            raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}): {key} must be a "
                            f"link [node, output], got {short_repr(value)}")
        source, slot = str(value[0]), value[1]
        if not isinstance(self.graph.get(source), dict):
            raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}): {key} links to "
                            f"node {source}, which the workflow does not have")
        outputs = _SLOTS.get(self.kind(source))
        want = _LINK_TYPES.get(key)
        if not 0 <= slot < (len(outputs) if outputs else 1) or \
                (outputs and want in outputs and outputs[slot] != want):
            has = (", ".join(f"{i} {t}" for i, t in enumerate(outputs)) if outputs else
                   "0 only")
            raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}): {key} links to "
                            f"output {slot} of node {source} ({self.kind(source)}), whose "
                            f"outputs are {has}{f'; {key} takes its {want}' if want else ''}")
        return source, slot

    def follow(self, node_id, key, kinds):
        """The node ``key`` comes from, which must be one of ``kinds``."""
        source, _ = self.link(node_id, key)
        if self.kind(source) not in kinds:
            raise SdrtError(f"workflow node {source} ({self.kind(source)}) is not supported as "
                            f"{self.kind(node_id)}'s {key}: sdrt takes {' or '.join(kinds)} "
                            f"there")
        return source

    def lora_chain(self, node_id, key):
        """The LoraLoader (and, along "model" links, LoraLoaderModelOnly) nodes from
        ``node_id`` back along their ``key`` ("model" or "clip") links: (the node past them,
        [(lora node, lora_name, scale)] in load order), the scale one number where the model's
        and the CLIP's strengths agree, else (the model's, the CLIP's), as sdrt's LoRAs take
        it (a LoraLoaderModelOnly's CLIP strength is 0)."""
        loras = []
        kinds = ("LoraLoader", "LoraLoaderModelOnly") if key == "model" else ("LoraLoader",)
        while self.kind(node_id) in kinds:
            model = _number(self, node_id, "strength_model", float)
            clip = (_number(self, node_id, "strength_clip", float)
                    if self.kind(node_id) == "LoraLoader" else 0.0)
            loras.append((node_id, self.inputs(node_id).get("lora_name"),
                          model if model == clip else (model, clip)))
            node_id, _ = self.link(node_id, key)
        return node_id, loras[::-1]

    def model_chain(self, link):
        """(checkpoint node, [(lora node, lora_name, scale)] in load order, [ImagePrompt]
        nearest the checkpoint first, {Workflow field: value} of the MODEL_PATCHES) of a MODEL
        link."""
        node_id, loras, prompts, patches = link[0], [], [], {}
        while True:
            node_id, more = self.lora_chain(node_id, "model")
            loras = more + loras
            if self.kind(node_id) in (IPADAPTER, IPADAPTER_SIMPLE):
                prompts.append(_image_prompt(self, node_id))
            elif self.kind(node_id) == UNIFIED:  # (the model passes through it)
                _preset(self, node_id)
            elif self.kind(node_id) in MODEL_PATCHES:
                field = MODEL_PATCHES[self.kind(node_id)]
                if field in patches:
                    raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}): sdrt runs "
                                    f"one {'FreeU' if field == 'freeu' else self.kind(node_id)} "
                                    f"node on a model")
                patches[field] = _model_patch(self, node_id)
            else:
                break
            node_id, _ = self.link(node_id, "model")
        if self.kind(node_id) != "CheckpointLoaderSimple":
            raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}) is not supported "
                            f"as the sampled model: sdrt takes CheckpointLoaderSimple, "
                            f"LoraLoader, LoraLoaderModelOnly, {IPADAPTER}, {IPADAPTER_SIMPLE}, "
                            f"{UNIFIED}, FreeU, FreeU_V2, {PAG}, {RESCALE_CFG} and "
                            f"{MODEL_SAMPLING} there")
        return node_id, loras, prompts[::-1], patches

    def clip_chain(self, link, checkpoint):
        """(clip skip, [(lora node, lora_name, scale)]) of a CLIP link that leads to
        ``checkpoint``."""
        node_id, _ = link
        skip = 0
        if self.kind(node_id) == "CLIPSetLastLayer":
            layer = _number(self, node_id, "stop_at_clip_layer", int)
            if layer > -1:
                raise SdrtError(f"workflow node {node_id} (CLIPSetLastLayer): "
                                f"stop_at_clip_layer must be -1 or below, got {layer}")
            skip = -layer - 1
            node_id, _ = self.link(node_id, "clip")
        node_id, loras = self.lora_chain(node_id, "clip")
        if node_id != checkpoint:
            raise SdrtError(f"workflow node {node_id} ({self.kind(node_id)}) is not supported "
                            f"as a text encoder: sdrt takes the sampled model's checkpoint, "
                            f"CLIPSetLastLayer and LoraLoader there")
        return skip, loras


def comfy_hint(image, width, height):
    """A ControlNet's control image (PIL) as ComfyUI brings it to the latents' size in pixels
    (``width`` × ``height``): cut to that aspect ratio about its centre (the cut rounded as
    Python rounds), then nearest-exact scaled (torch's ``interpolate``, as ComfyUI's
    ``common_upscale`` with its ControlNets' default ``nearest-exact``). A PIL RGB image."""
    import numpy as np
    import torch
    from PIL import Image

    from .images import to_rgb8
    x = torch.from_numpy(np.array(to_rgb8(image))).permute(2, 0, 1)[None].float()
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    left = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect \
        else 0
    top = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect \
        else 0
    x = x[..., top:old_h - top, left:old_w - left]
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="nearest-exact")
    return Image.fromarray(x[0].permute(1, 2, 0).to(torch.uint8).numpy())
