"""One walk of a model's layout: every sdrt kernel launch its real modules make at a real shape.

    from sdrt.benchmarks.launches import record_launches
    launches = record_launches("sd15", networks=("unet",), conv_path="unfused")

The engine's own modules (``engine/unet.py``, ``vae.py``, ``clip.py``, built from
``engine.configs``) run a forward at the model's real size, called as the pipeline calls them:

- the UNet at batch 2 (classifier-free guidance; 1 for the distilled models that run without
  it), with the family's conditioning as named inputs: text states 77 × the text encoders'
  summed width, and for SDXL the pooled embedding and the micro-conditioning numbers;
- the VAE decoder at batch 1, in float32 where the pipeline upcasts it (SDXL's VAE,
  ``force_upcast``), else in float16;
- each of the family's text encoders (SD 1.x/2.x one, SDXL two, the refiner the second) at
  the UNet's batch (prompt and negative prompt), SDXL's through ``encode`` (penultimate states
  and the pooled output in one pass);

in float16 as on a GPU. Image sides: SD 1.5 and 2.1-base 512², SD 2.1 768², SDXL 1024²
(128² latents), the Turbo models 512². Nothing of that size is computed:

- every tensor lives on the ``meta`` device (shapes, strides and memory formats only), so
  PyTorch's own ops (linears, cuDNN's convolutions, interpolation) cost nothing; a dispatch
  mode gives meta convolutions the output layout cuDNN would (channels_last in, channels_last
  out), since layouts decide the kernels' strides;
- the ops in ``sdrt.kernels`` take their Triton path (``SDRT_BACKEND=triton`` for the walk)
  and their launchers run unchanged: they check inputs, allocate outputs and pick blocks
  exactly as on a GPU;
- a fake Triton driver, whose target is ``GPUTarget("cuda", 90, 32)`` (Hopper), is active:
  Triton specialises each launch's arguments as it would on the GPU (pointer alignment,
  integers divisible by 16 or equal to 1), compiles the kernel for sm_90 with the real
  compiler (ptxas included) on a cache miss, and the "launch" records the call and returns.

Each ``Launch`` names the Triton kernel, the sdrt op that launched it (the innermost public
op on the Python stack: ``group_norm``, ``attention``, ...), the op's tensor arguments
(shape, strides, dtype), the kernel's specialisation (signature, constexprs, attributes,
num_warps, num_stages) and the grid; ``launch.compiled`` is Triton's ``CompiledKernel``
(cubin, PTX, metadata), ``launch.compile_s`` the wall seconds its first launch spent
compiling and ``compile_cpu_s`` the CPU seconds (this process and ptxas: unlike wall time,
not inflated by other work on a shared machine); both 0 on later launches of the same
specialisation, and small when Triton's cache is warm.
``op_calls(launches)`` folds them back into op calls for benchmarks.

Meta tensors have a data pointer of 0, so every tensor argument is taken as 16-byte aligned:
true of the caching allocator's blocks and of the views the engine passes (q, k, v views of
a projection start at its first element).

The ``conv_path`` picks how ResNet blocks run conv2d(silu(group_norm(x))) + add: ``"fused"``
(sdrt's Triton kernel) or ``"unfused"`` (sdrt's group_norm, then cuDNN): on a GPU the
engine's ``ConvPathChooser`` may pick either per shape, so a report covers both.
"""
import contextlib
import dataclasses
import os
import sys
import time

import torch

# Image side of each model's walk (``engine.configs.MODELS``' names).
MODEL_SIZES = {"sd15": 512, "sd21": 768, "sd21-base": 512, "sd-turbo": 512, "sdxl": 1024,
               "sdxl-turbo": 512, "sdxl-refiner": 1024}
# Distilled to run without classifier-free guidance: UNet and text encoder at batch 1.
NO_GUIDANCE = ("sd-turbo", "sdxl-turbo")
NETWORKS = ("unet", "vae_decoder", "text_encoder", "text_encoder_2")  # a model walks its own
CONV_PATHS = ("fused", "unfused")
UNET_BATCH = 2      # classifier-free guidance: one call runs the prompt and the negative
TEXT_TOKENS = 77
SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size) of H100/H200
FAKE_DEVICE = "sdrt-fake-sm90"


@dataclasses.dataclass(frozen=True)
class Launch:
    """One Triton kernel launch made by an sdrt op."""
    network: str            # "unet", "vae_decoder", "text_encoder", "text_encoder_2"
    op: str                 # the public sdrt op that launched it ("group_norm", ...)
    op_args: tuple          # the op's arguments: (name, TensorArg | value), in call order
    op_call: int            # serial number of the op call (a call may launch several kernels)
    kernel: str             # the Triton kernel's name ("_attention_kernel")
    signature: tuple        # ((arg, type), ...): "*fp16", "i32", "constexpr", ...
    constants: tuple        # ((arg, value), ...): the constexpr values
    attrs: tuple            # ((arg, Triton's attributes), ...): tt.divisibility 16 ...
    num_warps: int
    num_stages: int
    grid: tuple
    compile_s: float = dataclasses.field(compare=False)
    compile_cpu_s: float = dataclasses.field(compare=False)  # this process + ptxas, CPU
    compiled: object = dataclasses.field(compare=False, repr=False)  # triton CompiledKernel

    @property
    def key(self):
        """What makes a distinct compiled kernel: two launches with equal keys share a binary."""
        return (self.kernel, self.signature, self.constants, self.attrs, self.num_warps,
                self.num_stages)


@dataclasses.dataclass(frozen=True)
class TensorArg:
    shape: tuple
    stride: tuple
    dtype: str

    @classmethod
    def of(cls, t):
        return cls(tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""))

    @property
    def channels_last(self):
        return len(self.shape) == 4 and self.stride[1] == 1 and self.shape[1] > 1


@dataclasses.dataclass(frozen=True)
class OpCall:
    network: str
    op: str
    args: tuple             # (name, TensorArg | value)

    def arg(self, name):
        return dict(self.args).get(name)


def op_calls(launches):
    """The op calls behind ``launches``, in order, one per call (not per kernel)."""
    seen, calls = set(), []
    for la in launches:
        if (la.network, la.op_call) not in seen:
            seen.add((la.network, la.op_call))
            calls.append(OpCall(la.network, la.op, la.op_args))
    return calls


def unique(launches):
    """One launch per distinct compiled kernel (``Launch.key``), first seen first, with the
    number of launches it stands for."""
    out = {}
    for la in launches:
        if la.key in out:
            out[la.key][1] += 1
        else:
            out[la.key] = [la, 1]
    return [(la, n) for la, n in out.values()]


# ----------------------------------------------------------------------------------------------
# The fake driver.
class _Recorder:
    """Collects launches; the fake driver's launcher calls ``record``."""

    def __init__(self):
        self.launches = []
        self.network = None
        self.run_started = None   # (wall, CPU) clocks at the start of the JIT run in progress
        self._op_frame = None     # the frame of the op call now launching (kept alive)
        self._op_call = 0
        self._op_codes = None

    def op_codes(self):
        if self._op_codes is None:
            from sdrt import kernels
            from sdrt.kernels import conv_autotune
            fns = [getattr(kernels, name) for name in kernels.__all__]
            fns.append(conv_autotune.group_norm_then_conv2d)
            self._op_codes = {f.__code__: f.__name__ for f in fns if hasattr(f, "__code__")}
        return self._op_codes

    def _find_op(self):
        """(name, frame) of the innermost public sdrt op on the stack."""
        codes = self.op_codes()
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code in codes:
                return codes[frame.f_code], frame
            frame = frame.f_back
        return "?", None

    def record(self, src, metadata, grid, compile_s, compile_cpu_s, compiled):
        op, frame = self._find_op()
        if frame is None or frame is not self._op_frame:
            self._op_call += 1
            self._op_frame = frame
        op_args = ()
        if frame is not None:
            code = frame.f_code
            names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            op_args = tuple((n, _describe(frame.f_locals[n])) for n in names
                            if n in frame.f_locals)
        fn = src.fn
        names = fn.arg_names
        sig = tuple((n, str(src.signature.get(n, "constexpr"))) for n in names)
        consts = tuple(sorted((names[k[0]], _plain(v)) for k, v in src.constants.items()
                              if len(k) == 1))
        attrs = tuple(sorted((names[k[0]], _plain(v)) for k, v in src.attrs.items()
                             if len(k) == 1))
        self.launches.append(Launch(
            self.network, op, op_args, self._op_call, metadata.name, sig, consts, attrs,
            metadata.num_warps, metadata.num_stages, tuple(grid), compile_s, compile_cpu_s,
            compiled))


def _plain(v):
    v = getattr(v, "value", v)  # tl.constexpr → its value
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _describe(v):
    if isinstance(v, torch.Tensor):
        return TensorArg.of(v)
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return type(v).__name__


class _FakeUtils:
    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): registers are read from the
        # cubin by the report; the thread limit is the hardware's.
        return None, None, 0, 0, 1024

    def get_device_properties(self, device):
        # H100 / H200: 227 KB of shared memory a block, 132 SMs.
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


class _FakeLauncher:
    """Stands in for a compiled kernel's launcher: records the launch, runs nothing."""

    def __init__(self, recorder, src, metadata, compiled):
        # Created on the first launch of a freshly compiled (or cache-loaded) kernel: the time
        # since this JIT run began is the compile.
        self.recorder, self.src, self.metadata, self.compiled = recorder, src, metadata, compiled
        wall, cpu = recorder.run_started or _clocks()
        now_wall, now_cpu = _clocks()
        self.first_compile = (now_wall - wall, now_cpu - cpu)

    def __call__(self, *args):
        # (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook,
        #  exit hook, *kernel arguments): only the grid is kept.
        (wall, cpu), self.first_compile = self.first_compile, (0.0, 0.0)
        self.recorder.record(self.src, self.metadata, args[:3], wall, cpu, self.compiled)


def _clocks():
    """(wall seconds, CPU seconds of this process and its finished children: ptxas)."""
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def _compiled_kernel_on_stack():
    """The CompiledKernel creating its launcher: ``self`` of CompiledKernel._init_handles."""
    frame = sys._getframe(2)
    while frame is not None:
        for name in ("self", "kernel"):
            k = frame.f_locals.get(name)
            if hasattr(k, "asm") and hasattr(k, "metadata"):
                return k
        frame = frame.f_back
    raise RuntimeError("fake_hopper: no CompiledKernel above the launcher (Triton changed?)")


class _FakeHopperDriver:
    """A Triton driver with no GPU behind it: target sm_90, launches recorded, not run.

    Duck-typed rather than derived from ``triton.backends.driver.DriverBase``, whose abstract
    methods differ between Triton releases: these are the calls Triton 3.6-3.9 make of the
    active driver while specialising, compiling and launching a kernel.
    """

    def __init__(self, recorder):
        from triton.backends.compiler import GPUTarget
        self.recorder = recorder
        self.utils = _FakeUtils()
        self.target = GPUTarget(*SM90)

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_current_device(self):
        # Triton caches compiled kernels per device key, launcher included: a key no real
        # device has keeps these recording launchers from ever serving a real launch.
        return FAKE_DEVICE

    def set_current_device(self, device):
        pass

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_current_stream(self, device=None):
        # JITFunction.run calls this once, before it binds, compiles and launches.
        self.recorder.run_started = _clocks()
        return 0

    def launcher_cls(self, src, metadata):
        return _FakeLauncher(self.recorder, src, metadata, _compiled_kernel_on_stack())

    def map_python_to_cpp_type(self, ty):
        return ty

    def assemble_tensormap_to_arg(self, tensormaps_info, args):
        return args

    def get_benchmarker(self):
        raise RuntimeError("the fake sm_90 driver cannot time kernels")

    def get_device_interface(self):
        raise RuntimeError("the fake sm_90 driver has no device")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the fake sm_90 driver has no device")


@contextlib.contextmanager
def fake_hopper(cache_dir=None):
    """Within the block, Triton compiles every launch for sm_90 and records it instead of
    running it. Yields the recorder (``.launches``). ``cache_dir``: Triton's cache for the
    block (a fresh folder measures cold compiles).

    TRITON_INTERPRET must be unset when triton.language is first imported in this process:
    under the interpreter nothing compiles.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("fake_hopper: TRITON_INTERPRET is set; the compiler would not run. "
                           "Run in a process without it (see tests/test_sm90_report.py).")
    from triton import knobs
    from triton.runtime.driver import driver
    recorder = _Recorder()
    fake = _FakeHopperDriver(recorder)
    saved_env = {k: os.environ.get(k) for k in ("SDRT_BACKEND", "TRITON_CACHE_DIR")}
    saved_cache = knobs.cache.dir
    # Put back exactly what was active, possibly nothing yet: asking DriverConfig for its
    # default would try to create the CUDA driver, which fails on a machine without a GPU.
    previous = driver._active
    try:
        os.environ["SDRT_BACKEND"] = "triton"
        if cache_dir is not None:
            os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
            knobs.cache.dir = str(cache_dir)
        driver.set_active(fake)
        yield recorder
    finally:
        driver._active = previous
        knobs.cache.dir = saved_cache
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# The models.
def cudnn_layout_mode():
    """A dispatch mode giving meta convolutions cuDNN's output layout.

    PyTorch's meta convolution returns a contiguous tensor whatever its input; cuDNN returns
    channels_last when the input (or weight) is channels_last. The layout decides strides,
    and with them the kernels' specialisations, for everything downstream of a convolution.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    cl = torch.channels_last

    def channels_last(t):
        return t.dim() == 4 and t.is_contiguous(memory_format=cl) and not t.is_contiguous()

    class CudnnLayout(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.convolution.default and (channels_last(args[0])
                                                                or channels_last(args[1])):
                out = out.contiguous(memory_format=cl)
            return out

    return CudnnLayout()


def _conv_path_fn(conv_path):
    from sdrt.kernels import conv_autotune, group_norm_silu_conv2d
    if conv_path == "fused":
        return group_norm_silu_conv2d
    if conv_path == "unfused":
        return conv_autotune.group_norm_then_conv2d
    raise ValueError(f"conv_path must be one of {CONV_PATHS}, got {conv_path!r}")


def _check_model(model):
    if model not in MODEL_SIZES:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_SIZES)}")


def family(model):
    """The model's ``engine.families.Family``, read from its configs as a folder of it reads."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.tiny import config_family
    _check_model(model)
    return config_family(model_config(model))


def model_networks(model):
    """The networks a walk of ``model`` runs by default: the UNet, the VAE decoder and the
    family's text encoders (SDXL: two; its refiner: the second only)."""
    return ("unet", "vae_decoder", *family(model).text_encoders)


def uses_guidance(model):
    """Whether ``model`` runs with classifier-free guidance (UNet batch 2)."""
    _check_model(model)
    return model not in NO_GUIDANCE


def vae_upcast(model, dtype=torch.float16):
    """Whether the pipeline decodes ``model``'s latents in float32 although it runs in
    ``dtype``, as it does with no ``vae_dtype`` given (``pipeline.default_vae_dtype``: SDXL's
    VAE, ``force_upcast``, in a float16 run)."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.pipeline import default_vae_dtype
    force_upcast = model_config(model)["vae"].get("force_upcast", True)
    return default_vae_dtype(family(model), dtype, force_upcast) != dtype


def conditioning(model, batch, dtype):
    """The UNet's conditioning for a walk on the meta device, shaped as the static runtime's
    buffers: text states (B, 77, Σ text encoders' widths: SDXL 768 + 1280) and, for a family
    that has them, the pooled embedding (B, projection_dim of the pooling encoder) and the
    micro-conditioning numbers (B, K: SDXL 6, the refiner 5)."""
    from sdrt.engine.conditioning import Conditioning
    from sdrt.engine.configs import model_config
    cfg, fam = model_config(model), family(model)
    meta = dict(device="meta", dtype=dtype)
    width = sum(cfg[c]["hidden_size"] for c in fam.text_encoders)
    pooled = cfg[fam.pooled]["projection_dim"] if fam.pooled else None
    return Conditioning(
        torch.empty(batch, TEXT_TOKENS, width, **meta),
        torch.empty(batch, pooled, **meta) if pooled else None,
        torch.empty(batch, fam.num_time_ids, **meta) if fam.time_ids else None)


def _networks(model, dtype, vae_dtype=None):
    """{network: () → (module, forward, args, kwargs)} on the meta device at the model's
    benchmark size, each called as the pipeline calls it."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.loading import build
    fam = family(model)
    cfg = model_config(model)
    side = MODEL_SIZES[model]
    batch = UNET_BATCH if uses_guidance(model) else 1
    meta = dict(device="meta", dtype=dtype)
    if vae_dtype is None:
        vae_dtype = torch.float32 if vae_upcast(model, dtype) else dtype

    def unet():
        m = build("unet", cfg["unet"]).to(dtype)
        latent = side // 8
        x = torch.empty(batch, m.config.in_channels, latent, latent, **meta)
        t = torch.empty((), device="meta", dtype=torch.float32)
        return m, m.forward, (x, t), conditioning(model, batch, dtype).unet_inputs()

    def vae_decoder():
        m = build("vae", cfg["vae"]).to(vae_dtype)
        f = m.config.scale_factor
        z = torch.empty(1, m.config.latent_channels, side // f, side // f, device="meta",
                        dtype=vae_dtype)
        return m, m.decode, (z,), {}

    def text_encoder(component):
        def make():
            m = build(component, cfg[component]).to(dtype)
            ids = torch.zeros(batch, TEXT_TOKENS, device="meta", dtype=torch.long)
            if fam.penultimate:  # SDXL: states and the pooled output in one pass
                return m, m.encode, (ids,), {"clip_skip": 1, "final_norm": False}
            return m, m.forward, (ids,), {}
        return make

    makers = {"unet": unet, "vae_decoder": vae_decoder}
    makers.update({c: text_encoder(c) for c in fam.text_encoders})
    return makers


def record_launches(model="sd15", networks=None, conv_path="fused", dtype=torch.float16,
                    cache_dir=None, vae_dtype=None):
    """Every Triton launch of one forward of each of ``networks`` (default: the model's,
    ``model_networks``) of ``model`` (a name in ``MODEL_SIZES``), in launch order, with
    ``conv_path`` ("fused" or "unfused") for the GroupNorm+SiLU+conv of every ResNet block and
    output head.

    The UNet runs at batch 2 (1 for a model without guidance) with the family's conditioning
    (``conditioning``); the VAE decoder in ``vae_dtype`` or, by default, as the pipeline runs
    it by default: in float32 where it upcasts it (``vae_upcast``), else in ``dtype``
    (``vae_dtype=dtype`` walks it as a VAE with ``force_upcast`` false runs; bf16 as
    ``--vae-dtype bf16`` does).

    Compiles each distinct specialisation for sm_90 on the way (``cache_dir``: Triton's
    cache to use; None keeps the default). Needs triton and a process without
    TRITON_INTERPRET.
    """
    from sdrt.engine.layers import use_conv_chooser
    makers = _networks(model, dtype, vae_dtype)
    networks = model_networks(model) if networks is None else tuple(networks)
    bad = [n for n in networks if n not in makers]
    if bad:
        raise ValueError(f"unknown network {bad[0]!r} for {model}; choose from "
                         f"{', '.join(makers)}")
    conv = _conv_path_fn(conv_path)
    with fake_hopper(cache_dir) as rec, torch.no_grad(), cudnn_layout_mode():
        for name in networks:
            module, forward, args, kwargs = makers[name]()
            use_conv_chooser(module, conv)  # the engine's own way to pick the conv path
            rec.network = name
            forward(*args, **kwargs)
    return list(rec.launches)
