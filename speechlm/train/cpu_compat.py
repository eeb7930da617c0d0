"""Run Megatron-Bridge's real training loop and converters on a machine without CUDA.

The one place that adapts Megatron to CPU (tests, CI, the embedded demo). `apply()` must run
before the first `import megatron.bridge`; it does nothing when CUDA and TransformerEngine are
present, so no line of it is active on a GPU node. On a GPU without TransformerEngine it applies
only the TE-less parts (`_apply_no_te`, docs/gpu.md). What it replaces and why: docs/cpu_mode.md.

megatron-core has no device abstraction: it asserts CUDA, creates tensors with
`device="cuda"`, uses CUDA streams, events and the CUDA RNG, and checks tensor types such as
`'torch.cuda.FloatTensor'`. Rather than patching ~15 call sites one by one, we let Megatron
believe a CUDA device exists and route every CUDA request to the CPU: a TorchFunctionMode maps
`device="cuda"` (and `.cuda()`, `.to("cuda")`) to CPU, streams and events become no-ops, the
CUDA RNG is the CPU generator, and `Tensor.type()` reports CUDA type names so the optimizer and
gradient-clipping code paths run unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import types
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# The releases this module was written and tested against. Patching other releases blindly
# could silently change what Megatron computes, so anything else is refused.
SUPPORTED_VERSIONS = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}

_REAL_CUDA_AVAILABLE = torch.cuda.is_available
_APPLIED = False
_NO_TE_APPLIED = False


class UnsupportedMegatronVersion(RuntimeError):
    pass


def cuda_present() -> bool:
    """True when a real CUDA device is usable (unaffected by `apply()`)."""
    return _REAL_CUDA_AVAILABLE()


def is_active() -> bool:
    return _APPLIED


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def no_te_active() -> bool:
    """True when `apply()` found a GPU without TransformerEngine and made it usable (`_apply_no_te`)."""
    return _NO_TE_APPLIED


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Refuse megatron-core/bridge releases this module was not written for."""
    if installed is None:
        installed = {}
        for pkg in SUPPORTED_VERSIONS:
            try:
                installed[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                installed[pkg] = "not installed"
    wrong = {p: v for p, v in installed.items() if SUPPORTED_VERSIONS.get(p) != v}
    if wrong:
        found = ", ".join(f"{p} {v}" for p, v in wrong.items())
        want = ", ".join(f"{p}=={v}" for p, v in SUPPORTED_VERSIONS.items())
        raise UnsupportedMegatronVersion(
            f"speechlm's CPU mode was written for {want} but found {found}. It patches Megatron "
            "internals, so it refuses other releases rather than risk wrong results. Run "
            "`bash scripts/setup.sh` to install the pinned versions, or run on a GPU, where the "
            "CPU mode is not used."
        )


def apply() -> bool:
    """Adapt Megatron to CPU if there is no CUDA device. Returns True if the CPU mode is active."""
    global _APPLIED
    if _APPLIED:
        return True
    if cuda_present():
        if not te_installed():
            _apply_no_te()
        return False
    if spawned_child():
        # A child that multiprocessing spawned imports the parent's main module, hence this module.
        # Megatron spawns two per rank: its checkpoint writer's result-queue manager (at the first
        # save, which waits until the child has imported) and the persistent async-save worker. They
        # need torch.cuda on the CPU (the worker calls torch.cuda.set_device), not Megatron's
        # patches, whose imports cost each run's first save ~15 s (docs/cpu_mode.md).
        _route_torch_cuda_to_cpu()
        _APPLIED = True
        return True
    check_versions()
    _stub_missing_modules()
    _route_cuda_to_cpu()
    _patch_distributed_optimizer()
    _patch_cpu_adam()
    _patch_bridge()
    keep_freed_memory()
    _APPLIED = True
    return True


def _apply_no_te() -> None:
    """A GPU without TransformerEngine (a bare machine: PyTorch plus the megatron wheels, see
    docs/gpu.md): the parts of the CPU mode that are about TE/Apex or the PyPI wheels being absent,
    none of the CUDA-to-CPU routing. The model then takes the local layer spec
    (speechlm.train.megatron_env.adapt_provider)."""
    global _NO_TE_APPLIED
    if _NO_TE_APPLIED:
        return
    check_versions()
    _stub_missing_modules()
    # `megatron.bridge.training.setup` imports Bridge's HF-dataset SFT and Energon (multimodal)
    # builders, hence HF `datasets` (with pyarrow, ~70 MB of wheels) and megatron-energon, at
    # module level; pretraining, our SFT and the converters never call them. A bare machine
    # without them gets stand-ins that fail when used.
    for name in _UNUSED_DATA_PACKAGES:
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _Missing(name)
    if importlib.util.find_spec("modelopt") is None:
        _stand_in_for_modelopt()
    _patch_distributed_optimizer()
    _patch_dataset_helpers()
    _NO_TE_APPLIED = True


_UNUSED_DATA_PACKAGES = ("datasets", "megatron.energon", "PIL")


def _stand_in_for_modelopt() -> None:
    # Bridge imports nvidia-modelopt (distillation, quantization) at module level and asks it on
    # every step and save whether the model is a distillation model / has modelopt state. Its
    # import needs scipy and PuLP (~50 MB of wheels). For a model modelopt never converted the
    # real answers are "no" and "nothing to save or restore": the stand-in gives exactly those.
    names = ("modelopt", "modelopt.torch", "modelopt.torch.opt", "modelopt.torch.opt.plugins",
             "modelopt.torch.distill", "modelopt.torch.distill.plugins", "modelopt.torch.distill.plugins.megatron")
    modules = {name: _Missing(name) for name in names}
    for name, module in modules.items():
        module.__path__ = []
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    plugins = modules["modelopt.torch.opt.plugins"]
    plugins.save_modelopt_state = plugins.save_sharded_modelopt_state = lambda *a, **k: None
    plugins.restore_modelopt_state = lambda *a, **k: None
    modules["modelopt.torch.distill"].DistillationModel = type("DistillationModel", (), {})
    modules["modelopt.torch.distill.plugins.megatron"].get_tensor_shapes_adjust_fn_for_distillation = lambda *a, **k: None
    sys.modules.update(modules)


class _Missing(types.ModuleType):
    """A module that is not installed: importable, any attribute another stand-in (a class for
    CamelCase names, so modules can subclass or isinstance-check it), any call or instance fails."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        root = self.__name__.split(".")[0]
        if name[:1].isupper():
            def fail(*args, **kwargs):
                raise RuntimeError(f"{root} is not installed (speechlm.train.cpu_compat stand-in)")

            value = type(name, (), {"__init__": fail})
        else:
            value = _Missing(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__.split('.')[0]} is not installed (speechlm.train.cpu_compat stand-in)")


# --- modules that cannot be installed without CUDA ------------------------------------------------


def _stub_missing_modules() -> None:
    # `megatron.bridge.training.pretrain` imports `nvidia_resiliency_ext.inprocess.CallWrapper`
    # unconditionally, only used for in-process restart (off). PyPI's 0.4.1 breaks
    # `import megatron.core` (it asserts >= 0.6), so the symbol is stubbed instead.
    try:
        import nvidia_resiliency_ext.inprocess  # noqa: F401
    except ImportError:
        nre = types.ModuleType("nvidia_resiliency_ext")
        nre.__path__ = []
        inprocess = types.ModuleType("nvidia_resiliency_ext.inprocess")
        inprocess.CallWrapper = type("CallWrapper", (), {})
        nre.inprocess = inprocess
        sys.modules.update({nre.__name__: nre, inprocess.__name__: inprocess})

    # TransformerEngine needs CUDA to build. `megatron.bridge.peft.lora_layers` imports it at
    # module level (LoRA only); megatron-core probes it with try/except and falls back to its
    # local layers. So first import every megatron-core module that probes TE (they record
    # HAVE_TE=False), then install a stand-in that can be imported but not used.
    import megatron.core

    root = Path(megatron.core.__file__).parent.parent
    probe = re.compile(r"^\s*(import|from) transformer_engine", re.M)
    for sub in ("core", "training"):
        for path in sorted((root / sub).rglob("*.py")):
            if probe.search(path.read_text(errors="ignore")):
                parts = path.relative_to(root.parent).with_suffix("").parts
                importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("TransformerEngine is not installed (speechlm.train.cpu_compat stand-in)")

    class _Namespace(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            value = _Namespace(f"{self.__name__}.{name}") if name in ("pytorch", "ops") else type(name, (_Unavailable,), {})
            setattr(self, name, value)
            return value

    te = _Namespace("transformer_engine")
    te.__path__ = []
    sys.modules["transformer_engine"] = te
    sys.modules["transformer_engine.pytorch"] = te.pytorch


# --- CUDA -> CPU ----------------------------------------------------------------------------------


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA placement requests to the CPU; reports CUDA tensor type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or _is_index(kwargs["device"])):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and (_is_cuda(args[1]) or _is_index(args[1])):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer and clip_grads check e.g. `param.type() == 'torch.cuda.FloatTensor'`.
            name = func(*args)
            return "torch.cuda." + name[len("torch."):] if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


def _is_index(device) -> bool:  # torch.cuda.current_device() style integer device
    return isinstance(device, int) and not isinstance(device, bool)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _Event()

    def is_capturing(self) -> bool:
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_MODE: _CudaToCpu | None = None


def spawned_child() -> bool:
    """True in a process that multiprocessing started with the 'spawn' method (its command line)."""
    return "--multiprocessing-fork" in getattr(sys, "orig_argv", ())


def _route_cuda_to_cpu() -> None:
    _route_torch_cuda_to_cpu()
    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _route_torch_cuda_to_cpu() -> None:
    global _MODE
    cuda = torch.cuda
    cuda.is_available = lambda: True  # bridge's initialize_megatron asserts it
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    for name in ("reset_peak_memory_stats", "reset_max_memory_allocated"):
        setattr(cuda, name, lambda *a, **k: None)
    cuda.memory_stats = lambda *a, **k: {}
    cuda.mem_get_info = lambda *a, **k: (0, 0)
    cuda.get_device_name = lambda *a, **k: "cpu"
    cuda.is_current_stream_capturing = lambda: False
    # RNG: the CUDA generator is the CPU one.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # Streams and events: CPU work is synchronous.
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.set_stream = lambda s: None
    torch.accelerator.current_stream = lambda *a, **k: _Stream()
    torch.nn.Module.cuda = lambda self, *a, **k: self
    _MODE = _CudaToCpu()
    _MODE.__enter__()


def _patch_distributed_optimizer() -> None:
    # Without TE/Apex, megatron-core's DistributedOptimizer wraps torch's Adam, whose state (and
    # its 'step') exists only after a first step. Loading a checkpoint builds the state-dict
    # template from that state, so give it dummy values first, as megatron-core's own
    # fsdp_dtensor path does; the load then overwrites them in place.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None):
        if is_loading and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict or {}, is_loading, sharding_type, metadata)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict

    # After such a load, torch Adam's per-parameter 'step' holds the dummy step's count (1)
    # instead of the checkpoint's, so Adam's bias correction restarts and a resumed run drifts
    # from an uninterrupted one. The true count is in each param group (megatron-core saves it
    # there for TE-less Adam): give every parameter its own tensor with that count.
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for group in self.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    DistributedOptimizer.load_state_dict = load_state_dict


def _patch_cpu_adam() -> None:
    # Without TE/Apex megatron-core builds torch's AdamW with no foreach/fused choice, and on CPU
    # tensors torch then runs its per-tensor Python loop (~10 % of a tiny model's step). torch's
    # fused CPU kernel does the same update in one pass per tensor.
    import megatron.core.optimizer as mcore_optimizer

    original = mcore_optimizer._get_megatron_optimizer_based_on_param_groups

    def build(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
        return optimizer

    mcore_optimizer._get_megatron_optimizer_based_on_param_groups = build


def keep_freed_memory() -> bool:
    """Serve large CPU tensors from the heap and keep freed memory for reuse (glibc's mallopt).

    A step of the 193,792-row output layer allocates several ~100 MB tensors (logits, their
    softmax and gradients). glibc maps anything that large afresh with mmap and unmaps it on
    free, so every step page-faults and zero-fills each of them again. With mmap off and no
    trimming they come from the heap, which grows for the first few steps (torch's 64-byte
    aligned blocks do not always fit a freed one) and is then reused without a page fault;
    the price is a larger resident size (docs/cpu_mode.md). bench/cpu_allocator.py measures the
    two side by side. Returns False where the C library is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _patch_bridge() -> None:
    import megatron.bridge.training.setup as bridge_setup

    _patch_dataset_helpers()
    # The JIT warm-up compiles fused GPU kernels with device="cuda" tensors; nothing to warm on CPU.
    bridge_setup.set_jit_fusion_options = lambda *a, **k: None


def _patch_dataset_helpers() -> None:
    import megatron.bridge.training.initialize as bridge_init
    import megatron.core.datasets as mcore_datasets

    # The PyPI megatron-core wheel ships the compiled dataset helper but no Makefile, and
    # bridge runs `make` unconditionally. A source install (the NeMo container) has both.
    if not (Path(mcore_datasets.__file__).parent / "Makefile").exists():
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (fail here if truly missing)

        bridge_init.compile_helpers = lambda: None
