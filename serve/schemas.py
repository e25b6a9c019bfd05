"""Pydantic models of every request and response body (what ``/docs`` shows).

Types are strict (``"7"`` is not a number, ``true`` is not an integer; form fields, which are
text, excepted); ranges and everything
else are checked once, by ``GenerationRequest.check`` and the pipeline's model checks, with the
API's own field names in the messages. Fields a client may send that do not change the
picture (OpenAI's ``quality``, A1111's ``do_not_save_samples``, ...) are accepted and ignored;
those of A1111 features sdrt does not have (``restore_faces``, scripts
but SD upscale, ...) are accepted at their "off" values and refused otherwise.
"""
from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

_REQUEST = ConfigDict(strict=True, extra="ignore")
# A1111's models coerce as its pydantic does: 0/1 for booleans, 5.0 or "5" for integers
# (published payloads and client libraries send them so); a fraction for an integer is refused.
_A1111_REQUEST = ConfigDict(strict=False, extra="ignore")


# -- OpenAI Images API ---------------------------------------------------------------------------

class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, and sdrt's extras."""
    model_config = _REQUEST
    prompt: str
    model: Optional[str] = Field(None, description="ignored: the server runs one model")
    n: int = Field(1, description="images to generate")
    size: Optional[str] = Field(None, description="'WIDTHxHEIGHT', or 'auto' (the model's "
                                                  "native size)")
    response_format: Optional[Literal["b64_json", "url"]] = Field(
        None, description="b64_json only: the server keeps no images to link to")
    output_format: Optional[str] = Field(None, description="png only")
    background: Optional[str] = Field(None, description="auto or opaque (sdrt draws no "
                                                        "transparency)")
    user: Optional[str] = None
    # sdrt's extras (the OpenAI SDK sends them with extra_body=...)
    negative_prompt: Optional[str] = None
    steps: Optional[int] = Field(None, description="denoising steps (default: the server's)")
    guidance_scale: Optional[float] = Field(
        None, description="CFG scale (default 7.5, or the built-in model's own without --model)")
    sampler: Optional[str] = Field(None, description="an sdrt sampler id or an A1111 label")
    seed: Optional[int] = Field(None, description="seed of the first image, the i-th image "
                                                  "uses seed + i; -1 or absent: random")
    guidance_rescale: Optional[float] = Field(
        None, description="diffusers' guidance_rescale, 0 to 1 (default 0: off)")


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits`` (multipart/form-data): OpenAI's fields besides the ``image``
    and ``mask`` files, and sdrt's extras. Form fields arrive as text, so numbers are read
    from it (``"25"`` is 25)."""
    model_config = ConfigDict(strict=False, extra="ignore")
    size: Optional[str] = Field(None, description="'WIDTHxHEIGHT', or 'auto' (the image's "
                                                  "size)")
    strength: Optional[float] = Field(
        None, description="how much of the image to repaint, in (0, 1]; default 1 with a "
                          "mask (the masked part is drawn anew), 0.8 without one")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: Optional[str] = None


class ImagesResponse(BaseModel):
    """As OpenAI's: ``created`` (Unix seconds), ``data[].b64_json`` (PNG)."""
    created: int
    data: List[ImageData]
    output_format: Literal["png"] = "png"


# -- AUTOMATIC1111 API ---------------------------------------------------------------------------

class A1111Request(BaseModel):
    """What ``POST /sdapi/v1/txt2img`` and ``/img2img`` share, with A1111's field names and
    defaults."""
    model_config = _A1111_REQUEST
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random; the i-th image uses seed + i")
    subseed: int = Field(-1, description="A1111's variation seed (-1: random); the i-th image's "
                                         "noise moves towards subseed + i's")
    subseed_strength: float = Field(0.0, description="how far (0: off, to 1)")
    sampler_name: Optional[str] = Field(None, description="an A1111 label, e.g. 'Euler a'")
    sampler_index: Optional[str] = Field(None, description="older name of sampler_name")
    scheduler: Optional[str] = Field(None, description="A1111 1.9's schedule type: Automatic "
                                                       "(the sampler's default, as A1111's), "
                                                       "Uniform, Karras or Exponential")
    batch_size: int = 1
    n_iter: int = 1
    steps: Optional[int] = None
    cfg_scale: Optional[float] = Field(
        None, description="default 7 (A1111's), or the built-in model's own without --model")
    width: Optional[int] = Field(None, description="default: the model's native size")
    height: Optional[int] = Field(None, description="default: the model's native size")
    override_settings: Optional[Dict[str, object]] = Field(
        None, description="the A1111 settings sdrt has, for this request: "
                          "CLIP_stop_at_last_layers (clip skip), sd_vae (a --vae-dir VAE), "
                          "sd_model_checkpoint (the loaded model), samples_format (png); "
                          "any other is a 400")
    send_images: bool = True
    # A1111's sampler settings: sdrt runs A1111's defaults (eta 1 for the samplers with noise,
    # 0 for DDIM; no churn; noise multiplier 1), and refuses other values where the sampler
    # reads them (engine/infotext.py: sampler_setting_problem)
    eta: Optional[float] = None
    s_churn: Optional[float] = None
    s_noise: Optional[float] = None
    # A1111 settings of the picture sdrt runs
    tiling: Optional[bool] = Field(None, description="seamless images: the UNet's and the VAE's "
                                                     "convolutions wrap around")
    seed_resize_from_h: Optional[int] = Field(
        None, description="with seed_resize_from_w: centre the noise the seed draws at that "
                          "size in this one's (-1 or 0: off)")
    seed_resize_from_w: Optional[int] = None
    styles: Optional[List[str]] = Field(None, description="styles of the server's --styles-file "
                                                         "(GET /sdapi/v1/prompt-styles), "
                                                         "applied to the prompts in order")
    # A1111 features that change the picture and that sdrt does not have: accepted at their
    # "off" values (false, null, 0, -1, empty), refused with a 400 naming the field otherwise.
    restore_faces: Optional[bool] = None
    script_name: Optional[str] = Field(None, description="'SD upscale' (img2img) or off")
    script_args: Optional[List[object]] = Field(
        None, description="SD upscale's [info (ignored), overlap (0 to 256 pixels), upscaler "
                          "(an index into GET /sdapi/v1/upscalers or a name), scale (1 to 8)]; "
                          "ignored without a script")
    alwayson_scripts: Optional[Dict[str, object]] = None
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None


class Txt2ImgRequest(A1111Request):
    """``POST /sdapi/v1/txt2img``, with A1111's hires fix (``enable_hr``)."""
    enable_hr: bool = False
    denoising_strength: Optional[float] = Field(None, description="the hires fix's (0.75)")
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = Field(None, description="Latent (default), Latent "
                                                         "(antialiased), Latent (bicubic), "
                                                         "Latent (bicubic antialiased), Latent "
                                                         "(nearest), Latent (nearest-exact), "
                                                         "Lanczos, Nearest or an upscale model "
                                                         "of --upscaler-dir (GET "
                                                         "/sdapi/v1/upscalers)")
    hr_second_pass_steps: int = Field(0, description="0: steps")
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: Optional[str] = Field(None, description="null or '': sampler_name")
    hr_scheduler: Optional[str] = Field(None, description="the second pass's schedule type "
                                                          "(Automatic, Uniform, Karras, "
                                                          "Exponential or Use same scheduler)")
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: Optional[str] = Field(None, description="null, '' or 'Use same "
                                                                "checkpoint' only")


class Img2ImgRequest(A1111Request):
    """``POST /sdapi/v1/img2img``: as txt2img, plus the init images and strength."""
    init_images: List[str] = Field(..., description="base64 images (a data: URL prefix is "
                                                    "allowed); image i serves image i mod n")
    denoising_strength: float = 0.75
    mask: Optional[str] = Field(None, description="base64 mask: inpaint, repainting where it "
                                                  "is white (or opaque, in a PNG with "
                                                  "transparency)")
    mask_blur: int = Field(4, description="the mask's Gaussian blur, in pixels (0 to 64)")
    inpainting_mask_invert: int = Field(0, description="1: repaint where the mask is black")
    inpainting_fill: int = Field(0, description="what the masked part starts from: 0 fill (its "
                                                "surroundings' colours), 1 original (the init "
                                                "image), 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="true: inpaint only the mask's region "
                                                     "(grown by inpaint_full_res_padding) at "
                                                     "width x height and paste it back; false: "
                                                     "the whole picture")
    inpaint_full_res_padding: int = Field(0, description="pixels of context around the mask "
                                                         "(0 to 256)")
    resize_mode: int = Field(0, description="how each init image is brought to width x "
                                            "height: 0 just resize, 1 crop and resize, 2 "
                                            "resize and fill, 3 just resize (latent "
                                            "upscale)")
    initial_noise_multiplier: Optional[float] = Field(
        None, description="the initial noise times this, 0 to 10 (A1111's noise multiplier; "
                          "null: 1)")


class A1111Response(BaseModel):
    images: List[str]
    parameters: Dict[str, object]
    info: str = Field(..., description="a JSON string, as A1111 returns it")


class SamplerItem(BaseModel):
    name: str
    aliases: List[str]
    options: Dict[str, str] = {}


class SchedulerItem(BaseModel):
    """As A1111's ``GET /sdapi/v1/schedulers``."""
    name: str
    label: str
    aliases: Optional[List[str]] = None
    default_rho: float = -1.0
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    """An upscaler, as A1111 lists them: an image upscaler (no model file), or an upscale model
    of --upscaler-dir with its family (ESRGAN, RealESRGAN), file and scale (null where the file
    is not one sdrt runs)."""
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = 4


class ExtrasRequest(BaseModel):
    """A1111's Extras fields (``ExtrasBaseRequest``), with its defaults."""
    model_config = _A1111_REQUEST
    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: scale to cover "
                                            "upscaling_resize_w x upscaling_resize_h")
    show_extras_results: bool = Field(True, description="ignored: the images are returned")
    gfpgan_visibility: float = Field(0, description="0 only: face restoration is not "
                                                    "supported")
    codeformer_visibility: float = Field(0, description="0 only: face restoration is not "
                                                        "supported")
    codeformer_weight: float = Field(0, description="0 to 1; unused at visibility 0")
    upscaling_resize: float = Field(2, description="the scale, 1 to 8 (resize_mode 0)")
    upscaling_resize_w: int = Field(512, description="the width to cover (resize_mode 1)")
    upscaling_resize_h: int = Field(512, description="the height to cover (resize_mode 1)")
    upscaling_crop: bool = Field(True, description="resize_mode 1: cut the result to exactly "
                                                   "w x h about its centre")
    upscaler_1: str = Field("None", description="None (the image as it is), Lanczos, Nearest "
                                                "or an upscale model of --upscaler-dir (GET "
                                                "/sdapi/v1/upscalers)")
    upscaler_2: str = Field("None", description="another upscaler, blended over upscaler_1's "
                                                "result")
    extras_upscaler_2_visibility: float = Field(0, description="upscaler_2's weight, 0 to 1")
    upscale_first: bool = Field(False, description="ignored: there is no face restoration to "
                                                   "order it with")


class ExtrasSingleImageRequest(ExtrasRequest):
    """``POST /sdapi/v1/extra-single-image``."""
    image: str = Field("", description="a base64 image (a data: URL prefix is allowed)")


class FileData(BaseModel):
    model_config = _REQUEST
    data: str = Field(..., description="a base64 image (a data: URL prefix is allowed)")
    name: str


class ExtrasBatchImagesRequest(ExtrasRequest):
    """``POST /sdapi/v1/extra-batch-images``."""
    imageList: List[FileData]


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(..., description="what was done, as A1111's HTML paragraph")
    image: str = Field(..., description="a base64 PNG with A1111's postprocessing text")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field(..., description="the last image's, as A1111's")
    images: List[str]


class PromptStyleItem(BaseModel):
    name: str
    prompt: str
    negative_prompt: str


class LatentUpscaleModeItem(BaseModel):
    name: str


class SdModelItem(BaseModel):
    title: str
    model_name: str
    hash: Optional[str]
    sha256: Optional[str]
    filename: str
    config: Optional[str] = None


# -- the server's own ----------------------------------------------------------------------------

class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "stopping"]
    model: Optional[str] = None
    pid: int = 0  # tells replicas apart (Ray Serve)
    queue_depth: int = 0
    static_plans: List[str] = []
    detail: Optional[str] = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape (its SDK reads it), with the message also as ``detail`` (what
    FastAPI and A1111 clients read)."""
    error: ErrorBody
    detail: str
